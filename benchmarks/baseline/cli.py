"""Squish vs mlx_lm, side by side on the same artifact: start-up, load, latency,
memory, prefix cache, concurrency and the quantization table, checked against
benchmarks/contracts.toml. Results: benchmarks/results/<UTC stamp>_baseline/.

examples:
  scripts/run_baseline.sh                      best local model, standard profile
  scripts/run_baseline.sh --quick --check      smoke run, exit 1 naming each violated contract
  scripts/run_baseline.sh --full --models qwen2.5:1.5b,qwen3:8b
  scripts/run_baseline.sh --check-results benchmarks/results/20250101T000000Z_baseline
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.baseline import contracts as C
from benchmarks.baseline import metrics as M
from benchmarks.baseline import plots, quality, report
from benchmarks.baseline.runner import EXPERIMENTS, PROFILES, ModelRun, import_times, log
from benchmarks.baseline.systems import MLX_LM, SQUISH, specs, squish_serve_available
from benchmarks.common import ROOT, machine, result_dir, thermal_state


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="run_baseline.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke run: fewest samples, short generations")
    size.add_argument("--full", action="store_true",
                      help="most samples, longest prompts; also reruns benchmarks/quant_quality.py")
    ap.add_argument("--models", help="comma-separated catalog names, artifact names or folders "
                                     "(default: the best local model)")
    ap.add_argument("--check", action="store_true", help="exit 1 if any applicable contract is violated")
    ap.add_argument("--strict", action="store_true",
                    help="with --check: an inconclusive contract (missed, not significantly) also fails")
    ap.add_argument("--check-results", type=Path, metavar="DIR",
                    help="check an existing result folder against the contracts; run nothing")
    ap.add_argument("--contracts", type=Path, default=C.DEFAULT_FILE, help="contracts file (default: %(default)s)")
    ap.add_argument("--name", default="baseline", help="result folder suffix (default: baseline)")
    ap.add_argument("--seed", type=int, default=0, help="seed for prompts and sampling (default 0)")
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS),
                    help="comma-separated subset of %(default)s; contracts on the others are "
                         "'not measured in this run'")
    ap.add_argument("--squish-cmd", help="command that serves the model, with {python} {model} {port} "
                                         "(default: '{python} -m squish serve {model} --port {port} --rate-limit 0')")
    ap.add_argument("--squish-dry-run-cmd", help="command for the start-up RSS measurement, with {python} "
                                                 "{model} (default: '{python} -m squish serve {model} --dry-run')")
    return ap.parse_args(argv)


def resolve_models(arg: str | None) -> list[Path]:
    from squish.errors import InputError
    from squish.models import default_model_path, resolve_model

    if arg:
        return [resolve_model(name.strip()) for name in arg.split(",") if name.strip()]
    try:
        return [resolve_model(None)]
    except InputError:
        log("no local model: building the default one first")
        return [default_model_path(build_if_missing=True)]


def model_info(path: Path) -> dict:
    from squish.models import describe

    info = describe(path)
    bits = info.bits
    if bits is None:
        q = json.loads((path / "config.json").read_text()).get("quantization") or {}
        bits = q.get("bits")
    label = f"{info.catalog_name} INT{bits}" if info.catalog_name and bits else path.name
    return {"label": label, "path": str(path), "catalog": info.catalog_name, "bits": bits,
            "size_bytes": sum(p.stat().st_size for p in path.glob("model*.safetensors"))}


def check_existing(folder: Path, contracts_file: Path, strict: bool) -> int:
    data = json.loads((folder / "results.json").read_text())
    verdicts = C.evaluate(C.load(contracts_file), data["machine"], data["models"],
                          data.get("global", {}).get("metrics", {}))
    return _print_check(verdicts, strict)


def _print_check(verdicts: list[C.Verdict], strict: bool) -> int:
    for v in verdicts:
        print(v.line())
    bad = C.failures(verdicts, strict)
    if bad:
        print(f"{len(bad)} contract violation(s): " + ", ".join(
            v.contract.id + (f" [{v.model}]" if v.model else "") for v in bad), file=sys.stderr)
        return 1
    print("all applicable contracts hold", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    try:
        contracts = C.load(a.contracts)
    except (OSError, C.ContractError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.check_results:
        return check_existing(a.check_results, a.contracts, a.strict)
    t_start = time.perf_counter()
    profile = PROFILES["quick" if a.quick else "full" if a.full else "standard"]
    experiments = tuple(e.strip() for e in a.experiments.split(",") if e.strip())
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        print(f"error: --experiments: unknown {unknown}; choose from {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    try:
        models = resolve_models(a.models)
    except Exception as e:  # noqa: BLE001 - InputError/SystemFailure: report and stop
        print(f"error: {e}", file=sys.stderr)
        return 2
    mach = machine()
    backend = mach["backend"]
    notes = []
    systems = [SQUISH, MLX_LM]
    if not a.squish_cmd and not squish_serve_available():
        systems = [MLX_LM]
        notes.append("`squish serve` is not available in this checkout (no squish.cli.serve): Squish's "
                     "server-side metrics are not measured; mlx_lm's are reported alone.")
    if a.squish_cmd:
        notes.append(f"Squish served by a custom command: `{a.squish_cmd}`.")
    if backend == "cpu":
        notes.append(f"CPU backend: the long prompt is scaled down to {profile.long_tokens('cpu')} tokens "
                     f"(~{profile.long_tokens_gpu} on Metal/CUDA); MLX on CPU is far slower than on a GPU.")
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
        pycache = Path.home() / ".cache" / "squish-bench" / "pycache"
        os.environ["PYTHONPYCACHEPREFIX"] = str(pycache)
        notes.append("This environment turned Python's bytecode cache off (PYTHONDONTWRITEBYTECODE); every "
                     f"process of both systems ran with it on (PYTHONPYCACHEPREFIX={pycache}), as an installed "
                     "Python has it, so start-up figures are not dominated by compiling modules from source.")
    if not profile.inproc_runs:
        notes.append(f"Profile {profile.name}: mlx_lm's in-process `stream_generate` floor is skipped "
                     "(run without --quick for it).")
    sys_specs = specs(a.squish_cmd, a.squish_dry_run_cmd)
    out = result_dir(a.name)
    log(f"results: {out}")
    config = {"argv": argv, "profile": asdict(profile), "seed": a.seed, "systems": systems,
              "experiments": list(experiments),
              "commands": {s: {"serve": sp.serve_cmd, "dry_run": sp.dry_run_cmd} for s, sp in sys_specs.items()},
              "contracts_file": str(a.contracts), "models": [str(m) for m in models], "machine": mach}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    global_raw = {}
    if "startup" in experiments:
        log("import times ...")
        global_raw["import"] = import_times(profile.import_runs)
    global_metrics = M.derive({}, global_raw)
    global_metrics = {k: v for k, v in global_metrics.items() if k.startswith("startup.import")}
    if "startup" not in experiments:
        global_metrics["startup.import_s"] = {"skipped": "experiment 'startup' was not part of this run (--experiments)"}
    model_rows = []
    plot_files: list[str] = []
    for path in models:
        info = model_info(path)
        run = ModelRun(path, sys_specs, systems, profile, backend, out, a.seed)
        raw = run.run(experiments)
        metrics = M.derive(raw, global_raw)
        row = {**info, "long_prompt_tokens": profile.long_tokens(backend), "raw": raw, "metrics": metrics,
               "floor": M.inproc_floor(raw), "errors": raw.get("errors", {})}
        model_rows.append(row)
        for fn in (plots.latency, plots.concurrency):
            try:
                p = fn(raw, out, info["label"])
                if p:
                    plot_files.append(p.name)
            except Exception as e:  # noqa: BLE001 - a plot must not lose the numbers
                row["errors"][f"plot_{fn.__name__}"] = str(e)
    q = quality.latest(rerun=a.full)
    verdicts = C.evaluate(contracts, mach, model_rows, global_metrics)
    mach["thermal_end"] = thermal_state()
    stamp = out.name.split("_", 1)[0]
    md = report.render(stamp=stamp, machine=mach, profile=asdict(profile),
                       argv=["scripts/run_baseline.sh", *map(shlex.quote, argv)], models=model_rows,
                       global_metrics=global_metrics, verdicts=verdicts, quality=q, notes=notes, plots=plot_files)
    results = {"stamp": stamp, "profile": asdict(profile), "machine": mach, "systems": systems,
               "global": {"raw": global_raw, "metrics": global_metrics}, "models": model_rows,
               "contracts": [{"id": v.contract.id, "status": v.status, "model": v.model, "value": v.value,
                              "detail": v.detail} for v in verdicts],
               "quality": q, "wall_s": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "report.md").write_text(md)
    for m in model_rows:
        print(f"## {m['label']}\n\n{report.headline_table(m['metrics'])}\n")
    print(f"results: {out.relative_to(ROOT)} ({time.perf_counter() - t_start:.0f} s)")
    if a.check:
        return _print_check(verdicts, a.strict)
    return 0
