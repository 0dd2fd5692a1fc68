"""Standing reliability figures (issue 15): fuzz, flood, soak, disconnect storm, faults.

Every part drives a real ``squish serve`` subprocess (``benchmarks/hardening/``):

- ``fuzz``: schemathesis over the served ``/openapi.json``, every route it lists, on a tiny
  random-weight model (``tests/tiny.py``): 0 responses >= 500 other than a 503 with
  Retry-After or a 504, 0 responses that break the documented schema;
- ``flood``: 1,000 requests from one client (no API key: the bucket is its address) ->
  429 with Retry-After, while a second client on 127.0.0.2 is still served and
  ``/health`` stays ok (tiny model);
- ``soak``: 500 mixed requests (streamed, whole, tools, JSON, completions, early
  disconnects) at concurrency 8 on ``--model`` -> 0 unexpected statuses, idle RSS after
  warm-up grows < 5%, nothing in flight at the end;
- ``storm``: 100 clients in flight disconnect at once -> nothing in flight within 1 s
  (``--model`` when given, else the tiny model);
- ``faults``: kill -9 during a build, disk full during a build, a shard changed under a
  running server (SmolLM2 GGUF from its PyPI wheel; a tiny sharded artifact).

    python -m benchmarks.reliability --model <SmolLM2 INT4 artifact>       # every part
    python -m benchmarks.reliability --parts fuzz,flood,storm              # no real model needed
    python -m benchmarks.reliability --quick --parts fuzz,flood,storm      # a smoke run

Writes benchmarks/results/<UTC stamp>_reliability/: config.json, results.json, report.md,
each server's log and each build's log. Exit code 1 when a part failed (named in the report).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, result_dir  # noqa: E402

PARTS = ("fuzz", "flood", "soak", "storm", "faults")
KEY = "reliability-key"
MiB = 2**20


def tiny_artifact(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import make_tiny_artifact

    return make_tiny_artifact(folder / "tiny-4bit")


def run_fuzz(args, out: Path, tiny: Path) -> dict:
    from benchmarks.hardening import fuzz
    from benchmarks.hardening.server import Server

    with Server(tiny, "--max-tokens", str(args.fuzz_cap * 2), "--rate-limit", "0", "--request-timeout", "60",
                api_key=KEY, log=out / "server_fuzz.log") as s:
        res = fuzz.run(s, cases=args.fuzz_cases, cap=args.fuzz_cap, seed=args.seed)
    res["server_log_tracebacks"] = (out / "server_fuzz.log").read_text().count("Traceback")
    if res["server_log_tracebacks"]:
        res["failures"].append(f"{res['server_log_tracebacks']} tracebacks in the server log")
    return res


def run_flood(args, out: Path, tiny: Path) -> dict:
    from benchmarks.hardening import flood
    from benchmarks.hardening.server import Server

    with Server(tiny, "--max-tokens", "16", log=out / "server_flood.log") as s:
        return flood.run(s, requests=args.flood_requests)


def run_soak(args, out: Path, tiny: Path) -> dict:
    from benchmarks.hardening import soak
    from benchmarks.hardening.server import Server

    model = tiny if str(args.model) == "tiny" else args.model
    kinds = tuple(k for k in args.soak_kinds.split(",") if k) or None
    with Server(model, "--rate-limit", "0", *args.soak_server_args.split(), log=out / "server_soak.log") as s:
        res = soak.run(s, requests=args.soak_requests, concurrency=args.concurrency, rounds=args.soak_rounds,
                       seed=args.seed, kinds=kinds)
        res["server_ready_s"] = s.ready_s
    return res


def run_storm(args, out: Path, tiny: Path) -> dict:
    from benchmarks.hardening import storm
    from benchmarks.hardening.server import Server

    model = tiny if args.model is None or str(args.model) == "tiny" else args.model
    with Server(model, "--rate-limit", "0", "--max-queue", str(args.storm_clients), "--max-tokens", "256",
                log=out / "server_storm.log") as s:
        res = storm.run(s, clients=args.storm_clients, max_tokens=200)
    res["model"] = str(model)
    return res


def run_faults(args, out: Path, tiny: Path) -> dict:
    from benchmarks.hardening import faults

    work = Path(tempfile.mkdtemp(prefix="squish-faults-"))
    res = {}
    try:
        gguf = faults.smollm2_gguf()
        for name, fn in (("kill9", lambda: faults.kill9(work, gguf)), ("disk_full", lambda: faults.disk_full(work, gguf)),
                         ("shard_changed", lambda: faults.shard_changed(work))):
            try:
                res[name] = fn()
            except Exception:  # noqa: BLE001 - one fault experiment failing must not hide the others
                res[name] = {"failures": [f"the experiment failed: {traceback.format_exc()[-1500:]}"]}
        for log_file in work.glob("*.log"):
            (out / f"faults_{log_file.name}").write_text(log_file.read_text()[-20000:])
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    res["failures"] = [f"{k}: {f}" for k, v in res.items() for f in v.get("failures", [])]
    return res


RUNNERS = {"fuzz": run_fuzz, "flood": run_flood, "soak": run_soak, "storm": run_storm, "faults": run_faults}


def _mib(x) -> str:
    return "-" if x is None else f"{x / MiB:.1f}"


def report(config: dict, results: dict) -> str:
    lines = ["# Reliability figures", "",
             f"Command: `{config['command']}`  ", f"Machine: {config['machine'].get('chip')}, "
             f"{config['machine'].get('cpu_logical_cores')} logical cores, backend {config['machine'].get('backend')}, "
             f"load average at start {config['machine'].get('loadavg')} (shared machine: runs may be under contention).",
             "", "| part | verdict | figures |", "|---|---|---|"]
    for part, r in results.items():
        verdict = "pass" if not r.get("failures") else "**FAIL**"
        lines.append(f"| {part} | {verdict} | {_figures(part, r)} |")
    for part, r in results.items():
        if r.get("failures"):
            lines += ["", f"## {part}: failures", ""] + [f"- {f}" for f in r["failures"][:30]]
    if "fuzz" in results and "statuses_by_operation" in results["fuzz"]:
        lines += ["", "## fuzz: statuses by operation", "", "| operation | statuses |", "|---|---|"]
        for op, st in results["fuzz"]["statuses_by_operation"].items():
            lines.append(f"| `{op}` | {', '.join(f'{k}: {v}' for k, v in st.items())} |")
        why = results["fuzz"].get("positive_rejected_400_why") or {}
        if why:
            lines += ["", "Schema-valid requests refused with a 400 (rules JSON Schema does not express; "
                      "not failures):", ""] + [f"- {n} x {m}" for m, n in why.items()]
    if "soak" in results and "checkpoints" in results["soak"]:
        lines += ["", "## soak: idle checkpoints", "",
                  "| after requests | RSS MiB | MLX active MiB | MLX cache MiB | prefix cache MiB |", "|---|---|---|---|---|"]
        for c in results["soak"]["checkpoints"]:
            lines.append(f"| {c['after_requests']} | {_mib(c['rss_bytes'])} | {_mib(c['mlx_active_bytes'])} | "
                         f"{_mib(c['mlx_cache_bytes'])} | {_mib(c['prefix_cache_bytes'])} |")
    return "\n".join(lines) + "\n"


def _figures(part: str, r: dict) -> str:
    try:
        if part == "fuzz":
            return (f"{r['cases']} cases over {r['operations_in_schema']} operations in {r['elapsed_s']:.0f} s; "
                    f"5xx failures {r['responses_5xx_failures']} (allowed 503/504: {sum(r['responses_5xx_allowed'].values())}); "
                    f"schema failures {r['schema_failures']}; generation replies 2xx {r['generation_replies_2xx']}")
        if part == "flood":
            a, b, h = r["a"], r["b"], r["health"]
            return (f"A: {a['statuses']} in {a['seconds']:.1f} s (admitted {a['admitted']} <= {a['admitted_bound']:.1f}; "
                    f"Retry-After on every 429: {a['retry_after_missing_or_bad'] == 0}); B ({b['address']}): "
                    f"{b['statuses']}, p50 {b['latency_s']['p50']:.2f} s; /health ok {h['ok']}/{h['ok'] + h['bad']}")
        if part == "soak":
            kinds = ", ".join(f"{k} {v['ok']}/{v['n']}" for k, v in sorted(r["kinds"].items()))
            return (f"{r['requests']} requests at concurrency {r['concurrency']} in {r['elapsed_s']:.0f} s ({kinds}); "
                    f"unexpected {r['unexpected']}; idle RSS {_mib(r['checkpoints'][0]['rss_bytes'])} -> "
                    f"{_mib(r['checkpoints'][-1]['rss_bytes'])} MiB ({r['rss_growth_after_warmup']:+.1%}); "
                    f"peak {_mib(r['rss_peak_bytes'])} MiB; end in-flight {r['end']['inflight']}")
        if part == "storm":
            return (f"{r['clients']} clients in flight; in-flight 0 after {r['in_flight_zero_after_s']} s "
                    f"(bound {r['bound_s']} s); cancelled (499) {r['cancelled_499']:.0f}")
        if part == "faults":
            k, d, s = r.get("kill9", {}), r.get("disk_full", {}), r.get("shard_changed", {})
            return (f"kill -9: killed at {k.get('killed_after_s')} s, left {k.get('left_after_kill')}, "
                    f"rebuild rc {k.get('rebuild_rc')}; disk full ({d.get('mode')}): rc {d.get('rc')}, "
                    f"left {d.get('left')}; shard changed: verify rc {s.get('verify_after', {}).get('rc')}, names "
                    f"{s.get('changed')}: {s.get('changed', '?') in s.get('verify_after', {}).get('output', '')}")
    except (KeyError, TypeError, IndexError) as exc:
        return f"(incomplete: {exc!r})"
    return ""


def _stop_on_sigterm() -> None:
    """SIGTERM (``timeout``, a CI runner) ends the run through SystemExit, so the servers are
    stopped and temporary folders removed, as on Ctrl-C."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv=None) -> int:
    _stop_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--model", type=Path, help="artifact for the soak and the storm (SmolLM2 INT4); "
                    "'tiny' for the tiny random model")
    ap.add_argument("--fuzz-cases", type=int, default=1000)
    ap.add_argument("--fuzz-cap", type=int, default=8, help="largest token budget a fuzzed request keeps")
    ap.add_argument("--flood-requests", type=int, default=1000)
    ap.add_argument("--soak-requests", type=int, default=500)
    ap.add_argument("--soak-rounds", type=int, default=5, help="idle RSS checkpoints; the first is the warm-up")
    ap.add_argument("--soak-kinds", default="", help="comma-separated request kinds of the soak "
                    "(default: all of benchmarks/hardening/soak.py's MIX)")
    ap.add_argument("--soak-server-args", default="", help="extra `squish serve` options for the soak, "
                    "e.g. '--prefix-cache-mb 1'")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--storm-clients", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke sizes: 300 fuzz cases, 300 flood requests, "
                    "40 soak requests, 20 storm clients")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if args.quick:
        args.fuzz_cases, args.flood_requests, args.soak_requests, args.storm_clients = 300, 300, 40, 20
        args.soak_rounds = 2
    if "soak" in parts and args.model is None:
        ap.error("--parts soak needs --model <artifact>")
    out = result_dir("reliability")
    config = {"command": "python -m benchmarks.reliability " + " ".join(argv if argv is not None else sys.argv[1:]),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "parts": parts, "machine": machine()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="squish-reliability-") as tmp:
        tiny = tiny_artifact(Path(tmp))
        for part in parts:
            t0 = time.monotonic()
            print(f"== {part}", file=sys.stderr, flush=True)
            try:
                results[part] = RUNNERS[part](args, out, tiny)
            except Exception:  # noqa: BLE001 - the run goes on; the report names what failed
                tb = traceback.format_exc()
                (out / f"error_{part}.txt").write_text(tb)
                results[part] = {"failures": [f"the part failed to run: {tb.splitlines()[-1]}"]}
            results[part]["part_seconds"] = time.monotonic() - t0
            (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    config["machine_at_end"] = {"loadavg": machine().get("loadavg")}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "report.md").write_text(report(config, results))
    print(report(config, results))
    print(f"results: {out}", file=sys.stderr)
    return 1 if any(r.get("failures") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
