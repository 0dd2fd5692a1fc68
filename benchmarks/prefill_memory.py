"""What a long prompt costs in memory beyond its KV cache: the prefill's working memory,
by prefill chunk size (issue 13, "memory grows with the KV only").

Loads an artifact with ``mlx_lm.load`` (the model classes Squish's engine runs), prefills
one ``--context``-token prompt in chunks of each ``--steps`` size into a fresh prompt
cache, and reports from MLX's allocator: the KV cache left after the prefill, the peak
above the loaded weights, and their difference (the transient working memory: the
chunk's activations and attention scores). Squish serves with 512-token chunks.

    .venv/bin/python -m benchmarks.prefill_memory --model <artifact> [--context 2048] [--steps 512,256,128]

Results: benchmarks/results/<UTC stamp>_prefill_memory/ (results.json, report.md).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(model, context: int, step: int) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    ids = mx.array([[(i * 7919) % 20000 + 100 for i in range(context)]])  # arbitrary, fixed
    cache = make_prompt_cache(model)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for i in range(0, context, step):
        model(ids[:, i:i + step], cache=cache)
        mx.eval([c.state for c in cache])
    kv = mx.get_active_memory() - base
    peak = mx.get_peak_memory() - base
    return {"step": step, "kv_mb": round(kv / 1e6, 1), "peak_above_weights_mb": round(peak / 1e6, 1),
            "transient_mb": round((peak - kv) / 1e6, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", default="512,256,128")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)

    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(a.model)
    mx.eval(model.parameters())
    measure(model, min(a.context, 64), 64)  # warm-up: first-call allocations out of the way
    rows = []
    for step in (int(s) for s in a.steps.split(",")):
        rows.append(measure(model, a.context, step))
        print(rows[-1], flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = Path(a.out) / f"{stamp}_prefill_memory"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "results.json").write_text(json.dumps(
        {"model": a.model, "context": a.context, "device": str(mx.default_device()),
         "mlx": mx.__version__, "rows": rows}, indent=1))
    lines = [f"# Prefill working memory ({dest.name})", "",
             f"Model `{a.model}`, one {a.context}-token prompt, MLX allocator figures (MB = 10^6 bytes).", "",
             "| prefill chunk | KV cache | peak above weights | transient |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['kv_mb']} | {r['peak_above_weights_mb']} | {r['transient_mb']} |" for r in rows]
    (dest / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
