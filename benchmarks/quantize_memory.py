"""Peak memory of calibrated quantization on a qwen2.5-1.5B-shaped model.

The reference is random bf16 weights, written once to safetensors files and
opened lazily with ``mx.load`` (as a Hugging Face folder is), with the real shapes: 28 layers,
hidden 1536, intermediate 8960, 12 heads / 2 kv heads, vocab 151936, qwen2
(q/k/v biases), tied embeddings. Calibration: random tokens (default 4 x 128).
Emitted tensors are counted and dropped (the artifact writer streams them to
disk), so the number measured is the quantizer's own working set.

    .venv/bin/python benchmarks/quantize_memory.py --layers 2     # reduced, ~minutes
    .venv/bin/python benchmarks/quantize_memory.py                # all 28 layers (long on 2 cores)
    .venv/bin/python benchmarks/quantize_memory.py --layers 2 --numpy-passes-only

Prints peak RSS, RSS after every layer (flat = memory does not grow with
depth) and the bf16 size of the full model; writes
benchmarks/results/<UTC timestamp>_quantize_memory/results.json.

``--numpy-passes`` also measures the build's two whole-model passes that touch
the full vocabulary (the 152k x 1536 embedding / tied head), both through the
model's own mlx_lm graph with numpy products, one block in float32 at a time:
self-generated calibration text (``calibrate``, 2 samples of 32 tokens, a
byte-level stand-in tokenizer) and the quality gate's distribution metrics
(``evaluate.compare_models``, 2 windows of 256 tokens; the float reference on
both sides, since this benchmark writes no artifact). Each phase's peak is its
own (VmHWM is reset before it through /proc/self/clear_refs, Linux only).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from squish.quant.quantize import QuantSpec, quantize_model  # noqa: E402
from squish.quant.reference import Reference  # noqa: E402

QWEN25_15B = {
    "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
}


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
    return out


def write_random_weights(cfg: dict, workdir: Path, seed: int = 0) -> None:
    """Random bf16 weights, one safetensors file per tensor (reused by later runs)."""
    shp = shapes(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    for i, (name, s) in enumerate(shp.items()):
        f = workdir / f"{name}.safetensors"
        if f.exists():
            continue
        if name.endswith("norm.weight"):
            a = mx.ones(s, dtype=mx.bfloat16)
        else:  # row chunks keep the float32 draw small; the file holds bf16
            key = mx.random.key(seed * 100003 + i)
            rows = [(mx.random.normal((min(4096, s[0] - r),) + s[1:], key=mx.random.split(key, s[0] // 4096 + 1)[r // 4096]) * 0.02)
                    .astype(mx.bfloat16) for r in range(0, s[0], 4096)]
            a = mx.concatenate(rows) if len(rows) > 1 else rows[0]
        mx.save_safetensors(str(f.with_suffix(".tmp.safetensors")), {name: a})
        f.with_suffix(".tmp.safetensors").rename(f)
        del a
        mx.clear_cache()


def random_reference(cfg: dict, workdir: Path) -> Reference:
    """The weights of :func:`write_random_weights`, opened with ``mx.load`` (lazy): the
    quantizer reads them exactly as it reads a Hugging Face folder's shards. They are
    written by a child process first if missing, so writing them does not count in
    this process's peak RSS."""
    shp = shapes(cfg)
    if not all((workdir / f"{name}.safetensors").exists() for name in shp):
        print(f"writing random bf16 weights to {workdir} (once) ...", flush=True)
        subprocess.run([sys.executable, __file__, "--layers", str(cfg["num_hidden_layers"]),
                        "--workdir", str(workdir), "--write-weights-only"], check=True)

    def tensors():
        return {name: mx.load(str(workdir / f"{name}.safetensors"))[name] for name in shp}

    return Reference(name="random-qwen2.5-1.5b", config=cfg, tokenizer_dir=Path("."),
                     source={"kind": "random"}, load_tensors=tensors)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def hwm_mb() -> float:
    return _status_mb("VmHWM")


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class ByteTokenizer:
    """A stand-in tokenizer for the random model: one id per byte, no chat template."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + b for b in text.encode()]


def numpy_passes(ref: Reference, cfg: dict) -> dict:
    """Peak RSS of the vocabulary-wide numpy passes (see the module docstring)."""
    import numpy as np

    from squish.quant import calibrate, evaluate

    out = {}
    mx.clear_cache()
    before = rss_mb()
    reset_hwm()
    t = time.perf_counter()
    calibrate.calibration_tokens(ref, ByteTokenizer(), calib_file=None, n_samples=2, seq_len=32, seed=0)
    out["calibration_text"] = {"rss_before_mb": round(before, 1), "peak_mb": round(hwm_mb(), 1),
                               "seconds": round(time.perf_counter() - t, 1)}
    mx.clear_cache()
    before = rss_mb()
    reset_hwm()
    t = time.perf_counter()
    toks = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 256))
    evaluate.compare_models(ref, None, toks, quant_ref=ref)
    out["gate_metrics"] = {"rss_before_mb": round(before, 1), "peak_mb": round(hwm_mb(), 1),
                           "seconds": round(time.perf_counter() - t, 1)}
    for k, v in out.items():
        print(f"{k}: peak RSS {v['peak_mb']:.0f} MB (from {v['rss_before_mb']:.0f} MB), {v['seconds']:.0f} s", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28, help="decoder layers to build (28 = full model)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default="squish")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--workdir", default="/tmp/squish-bench-quantize-memory",
                    help="where the random bf16 weights are written once (~3 GB for all 28 layers)")
    ap.add_argument("--write-weights-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--numpy-passes", action="store_true",
                    help="also measure the calibration-text and quality-gate passes over the full vocabulary")
    ap.add_argument("--numpy-passes-only", action="store_true", help="measure only those passes (no quantization)")
    a = ap.parse_args(argv)

    cfg = dict(QWEN25_15B, num_hidden_layers=a.layers)
    if a.write_weights_only:
        write_random_weights(cfg, Path(a.workdir))
        return 0
    full = shapes(QWEN25_15B)
    n_full = sum(int(mx.prod(mx.array(s)).item()) if s else 1 for s in full.values())
    ref = random_reference(cfg, Path(a.workdir))
    if a.numpy_passes_only:
        res = {"shape": "qwen2.5-1.5B", "layers_built": a.layers, "numpy_passes": numpy_passes(ref, cfg),
               "embedding_float32_mb": round(QWEN25_15B["vocab_size"] * QWEN25_15B["hidden_size"] * 4 / 2**20, 1),
               "embedding_bf16_mb": round(QWEN25_15B["vocab_size"] * QWEN25_15B["hidden_size"] * 2 / 2**20, 1)}
        return _write(a, res)
    calib = mx.random.randint(0, cfg["vocab_size"], (a.samples, a.seq_len), key=mx.random.key(1))
    start = rss_mb()
    per_layer = []
    emitted = {"bytes": 0, "tensors": 0}
    t0 = time.perf_counter()

    def emit(name, arr):
        emitted["bytes"] += arr.nbytes
        emitted["tensors"] += 1

    def progress(stage, done, total):
        per_layer.append({"layer": done, "rss_mb": round(rss_mb(), 1), "s": round(time.perf_counter() - t0, 1)})
        print(f"  layer {done}/{total}: RSS {per_layer[-1]['rss_mb']:.0f} MB, {per_layer[-1]['s']:.0f} s", flush=True)

    outcome = quantize_model(ref, calib, QuantSpec(a.bits, 64, "float32"), emit, progress, method=a.method)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {
        "shape": "qwen2.5-1.5B", "layers_built": a.layers, "layers_full": QWEN25_15B["num_hidden_layers"],
        "calibration": [a.samples, a.seq_len], "bits": a.bits, "method": outcome.recipe["method"],
        "peak_rss_mb": round(peak, 1), "rss_at_start_mb": round(start, 1),
        "bf16_full_model_mb": round(n_full * 2 / 2**20, 1),
        "one_layer_float32_mb": round(sum(
            int(mx.prod(mx.array(s)).item()) for k, s in full.items() if k.startswith("model.layers.0.")
        ) * 4 / 2**20, 1),
        "embedding_float32_mb": round(QWEN25_15B["vocab_size"] * QWEN25_15B["hidden_size"] * 4 / 2**20, 1),
        "emitted_mb": round(emitted["bytes"] / 2**20, 1),
        "seconds": round(time.perf_counter() - t0, 1), "per_layer": per_layer,
        "timings": outcome.recipe["timings_s"],
    }
    print(json.dumps({k: v for k, v in res.items() if k != "per_layer"}, indent=1))
    print(f"peak RSS {res['peak_rss_mb']:.0f} MB vs bf16 model {res['bf16_full_model_mb']:.0f} MB "
          f"({res['peak_rss_mb'] / res['bf16_full_model_mb']:.2f}x), {a.layers}/{QWEN25_15B['num_hidden_layers']} layers built")
    if a.numpy_passes:
        res["numpy_passes"] = numpy_passes(ref, cfg)
    return _write(a, res)


def _write(a, res: dict) -> int:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = Path(a.out) / f"{stamp}_quantize_memory"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "results.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
