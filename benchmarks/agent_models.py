"""A scripted thinking model for the agent-loop benchmark: known output, real compute.

The tiny reasoning model of the tests (``tests/tiny_reasoning.py``) is a bigram machine:
attention and MLP outputs are zero, so each position's logits depend on its own token,
and greedy decoding after ``<|im_start|>assistant\\n`` writes
``<think>Let me think.</think>\\n\\nThe answer is 42!<|im_end|>``. Its Qwen3-style chat
template renders tools natively and drops earlier reasoning from the history, as
Qwen3's does. This module builds the same machine (same tokenizer, template and
script) at a size whose prefill dominates TTFT (``LAYOUT``: 12 layers, hidden 256, float32):
the attention and MLP still run, their outputs are multiplied by zero weights. So a benchmark knows exactly which tokens
the model generated ("as the model saw them"), and TTFT still measures prefill.

    .venv/bin/python -m benchmarks.agent_models [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DEFAULT_DIR = Path.home() / ".cache" / "squish-bench" / "artifacts"
# ~9M parameters in float32: a 400-token prefill is ~7.5 GFLOP, seconds on a 2-core CPU, so TTFT
# is prefill, not HTTP. ``layout`` takes SmolLM2-135M's (hidden 576, 30 layers, 9 / 3 heads,
# intermediate 1536) where compute allows.
LAYOUT = {"hidden": 256, "layers": 12, "heads": 4, "kv_heads": 2, "intermediate": 768}


def build_reasoning_model(out_dir: Path = DEFAULT_DIR, layout: dict | None = None) -> Path:
    """The scripted thinking model's folder (a plain mlx_lm folder, float32), cached."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    import tiny_reasoning as tr

    lay = {**LAYOUT, **(layout or {})}
    name = "scripted-reasoning-" + "-".join(f"{k}{v}" for k, v in sorted(lay.items()))
    path = Path(out_dir) / name
    if (path / "model.safetensors").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    info = tr._write_tokenizer(tmp)
    vocab, hidden = info["vocab"], lay["hidden"]
    config = {
        "model_type": "qwen3", "hidden_size": hidden, "num_hidden_layers": lay["layers"],
        "intermediate_size": lay["intermediate"], "num_attention_heads": lay["heads"],
        "num_key_value_heads": lay["kv_heads"], "head_dim": hidden // lay["heads"], "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "vocab_size": vocab,
        "tie_word_embeddings": False, "eos_token_id": info["eos"],
    }
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    embed = mx.random.normal((vocab, hidden))
    embed = embed / mx.linalg.norm(embed, axis=-1, keepdims=True) * (hidden ** 0.5)  # unit RMS rows
    head = mx.zeros((vocab, hidden))
    chain = info["chain"]
    head[mx.array(chain[1:])] = embed[mx.array(chain[:-1])] * (50.0 / hidden)  # next script token: logit ~50
    for k in list(weights):
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            weights[k] = mx.zeros_like(weights[k])  # the residual stream stays the token's embedding
        elif k.endswith("norm.weight"):
            weights[k] = mx.ones_like(weights[k])
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = head
    mx.save_safetensors(str(tmp / "model.safetensors"), {k: v.astype(mx.float32) for k, v in weights.items()},
                        metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tmp.rename(path)
    return path


def script_ids(path: Path) -> list[int]:
    """The token ids the model writes after ``<|im_start|>assistant\\n`` (EOS included)."""
    from tokenizers import Tokenizer

    import tiny_reasoning as tr

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return [tok.encode(p, add_special_tokens=False).ids[0] for p in tr.SCRIPT[1:]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    a = ap.parse_args(argv)
    print(build_reasoning_model(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
