"""Tiny random-weight Hugging Face model folders for structure tests.

Weights are random (seeded) but shaped exactly like the real architectures;
the tokenizer is a small byte-level BPE trained on a few sentences, with a
ChatML chat template. Good for shape/dtype/round-trip contracts, never for
quality claims.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Apples, bananas and cherries are fruits. Numbers: 12345 and 678.",
    "def main():\n    return 42\n",
] * 20


def write_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "chat_template": CHATML, "model_max_length": 512,
    }))


# Tiny configs per family: every field mlx_lm's ModelArgs needs, shapes a 64-group quantizer
# accepts (hidden 128, intermediate 256, 2 blocks). The catalog's families first, then
# others mlx_lm runs with different block structure: fused q/k/v and gate/up (phi3),
# LayerNorm + GELU MLP with biases (starcoder2), Gemma norms with soft-capped logits
# (gemma2, gemma3_text), scaled residuals (granite), mixtures of experts (qwen3_moe,
# qwen2_moe with a shared expert, mixtral).
_GEMMA = {"head_dim": 32, "query_pre_attn_scalar": 32, "rms_norm_eps": 1e-6}
ARCHS = {
    "llama": {"model_type": "llama", "rope_traditional": False},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3", "head_dim": 32},
    "gemma3_text": {"model_type": "gemma3_text", **_GEMMA, "sliding_window": 16,
                    "sliding_window_pattern": 2, "rope_local_base_freq": 10000.0},
    "phi3": {"model_type": "phi3", "tie_word_embeddings": False, "pad_token_id": 0},
    "starcoder2": {"model_type": "starcoder2", "norm_epsilon": 1e-5},
    "gemma2": {"model_type": "gemma2", **_GEMMA, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
    "granite": {"model_type": "granite", "logits_scaling": 2.0, "attention_multiplier": 0.2,
                "embedding_multiplier": 4.0, "residual_multiplier": 0.5, "attention_bias": False,
                "mlp_bias": False},
    "qwen3_moe": {"model_type": "qwen3_moe", "head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": 128,
                  "norm_topk_prob": True},
    "qwen2_moe": {"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256},
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
}
MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral")


def tiny_config(arch: str, *, vocab_size: int = 384, tied: bool = True) -> dict:
    return {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "eos_token_id": 2,
        "bos_token_id": 1,
        **ARCHS[arch],
    }


def make_hf_folder(path: Path, arch: str, *, dtype: str | None = None, tied: bool = True, seed: int = 0) -> Path:
    """Write config.json, model.safetensors (HF naming) and tokenizer files. bfloat16 weights,
    except float32 for MoE families (MLX's CPU gather_mm runs float32 only)."""
    dtype = dtype or ("float32" if arch in MOE_ARCHS else "bfloat16")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, tied=tied)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    weights = {k: (v * 2.0).astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path, config["vocab_size"])
    return path


def make_tiny_artifact(path: Path, arch: str = "llama", *, bits: int = 4, group_size: int = 64,
                       shard_bytes: int | None = None, manifest: dict | None = None) -> Path:
    """A tiny quantized artifact written through ArtifactWriter (round-to-nearest,
    no calibration): for loader/writer contract tests, not for quality."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from squish.quant.writer import SHARD_BYTES, ArtifactWriter

    src = make_hf_folder(path.parent / f".src-{path.name}", arch, dtype="float32")
    config = json.loads((src / "config.json").read_text())
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    model.load_weights(str(src / "model.safetensors"))
    nn.quantize(model, group_size=group_size, bits=bits)
    quant = {"group_size": group_size, "bits": bits, "mode": "affine"}
    with ArtifactWriter(path, shard_bytes=shard_bytes or SHARD_BYTES) as w:
        for k, v in tree_flatten(model.parameters()):
            mx.eval(v)
            w.add(k, v)
        w.copy_tokenizer(src)
        w.write_config({**config, "quantization": quant, "quantization_config": quant})
        w.close_weights()
        w.commit(manifest or {"name": path.name, "quantization": {"bits": bits, "group_size": group_size,
                                                                   "experimental": bits == 3},
                              "quality": {"passed": True}, "source": {"kind": "test"}})
    return path
