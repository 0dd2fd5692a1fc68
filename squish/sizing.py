"""How much memory a model needs to serve, and whether it fits this machine.

need = weights + KV cache for ``DEFAULT_CONTEXT`` tokens of one sequence + ``RUNTIME_OVERHEAD``
fits when need <= ``MEMORY_SHARE`` x the machine's total memory

- Weights of a catalog model as Squish builds it (INT4, group 64, the embedding and an untied
  lm_head at 8 bits; scales and biases in the build dtype); of a local folder: its size on disk.
- KV cache: 2 (K and V) x layers x KV heads x head dim x bytes per element per token, in the
  activation dtype (2 bytes on Metal/CUDA, 4 on MLX's CPU backend where builds are float32).
- ``RUNTIME_OVERHEAD``: activations of a prefill chunk, the default prompt cache, Python, MLX
  and the tokenizer.
- ``MEMORY_SHARE``: macOS lets the GPU wire only part of unified memory (about two thirds to three
  quarters by default) and the user's other applications need the rest, so a model may take
  60% of the total.

Total memory rather than currently available memory decides, so the zero-config choice is the
same on every run of the same machine. docs/models.md has the resulting table; a test checks
that the table matches this code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONTEXT = 8192  # tokens: a long prompt plus `squish serve`'s default --max-tokens (4096)
RUNTIME_OVERHEAD = 1 << 30
MEMORY_SHARE = 0.6
GROUP_SIZE = 64
GB = 1e9


@dataclass(frozen=True)
class Shape:
    """The few numbers of an architecture that decide its memory."""

    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)


def build_weight_bytes(params: float, shape: Shape, dtype_bytes: int = 2, bits: int = 4) -> int:
    """Bytes of a Squish g64 build at ``bits``: ``bits``-bit linears, an embedding (and lm_head
    if untied) of at least 8 bits, a scale and a bias per group of 64 in the build dtype."""
    per_weight = 2 * dtype_bytes / GROUP_SIZE
    embed = shape.embedding_params()
    return int((params - embed) * (bits / 8 + per_weight) + embed * (max(bits, 8) / 8 + per_weight))


def need_bytes(weight_bytes: int, kv_per_token: int, context: int = DEFAULT_CONTEXT) -> int:
    return int(weight_bytes + kv_per_token * context + RUNTIME_OVERHEAD)


def budget_bytes(total_memory: int) -> int:
    """The memory a model may take on a machine with ``total_memory`` bytes."""
    return int(total_memory * MEMORY_SHARE)


def smallest_machine_bytes(need: int) -> int:
    """The least total memory on which ``need`` fits."""
    return int(need / MEMORY_SHARE) + 1


def shape_from_config(config: dict) -> Shape | None:
    """The Shape of an mlx_lm / Hugging Face config (text part of multimodal configs), or None
    when the config does not say (then the caller falls back to a share of the weights)."""
    cfg = {**config, **config.get("text_config", {})}
    try:
        heads = cfg["num_attention_heads"]
        return Shape(
            layers=int(cfg["num_hidden_layers"]),
            hidden=int(cfg["hidden_size"]),
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            vocab=int(cfg.get("vocab_size", 0)),
            tied=bool(cfg.get("tie_word_embeddings", True)),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def folder_need_bytes(path: Path, weight_bytes: int, dtype_bytes: int = 2) -> int:
    """Memory to serve the model folder at ``path`` whose weights take ``weight_bytes``.
    Without a readable shape the KV cache is taken as a quarter of the weights."""
    try:
        shape = shape_from_config(json.loads((Path(path) / "config.json").read_text()))
    except (OSError, ValueError):
        shape = None
    if shape is None:
        return int(weight_bytes * 1.25 + RUNTIME_OVERHEAD)
    return need_bytes(weight_bytes, shape.kv_bytes_per_token(dtype_bytes))
