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


ARCHS = {
    "llama": {"model_type": "llama", "rope_traditional": False},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3", "head_dim": 32},
}


def tiny_config(arch: str, *, vocab_size: int = 384, tied: bool = True) -> dict:
    return {
        **ARCHS[arch],
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
    }


def make_hf_folder(path: Path, arch: str, *, dtype: str = "bfloat16", tied: bool = True, seed: int = 0) -> Path:
    """Write config.json, model.safetensors (HF naming) and tokenizer files."""
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
