"""GGUF architectures → mlx_lm model types: tensor names, config fields, weight layouts.

One :class:`Family` per ``general.architecture`` that Squish maps. What each needs,
and why (checked against llama.cpp's converter and mlx_lm's model modules):

- ``llama`` (also every Mistral / Mixtral-free Mistral GGUF: llama.cpp converts
  ``MistralForCausalLM`` to this architecture): llama.cpp permutes the Q/K rows
  for its interleaved RoPE; we undo that on the float rows (see
  :func:`unpermute_qk_rows`) so the model runs with mlx_lm's standard RoPE.
- ``qwen2`` (Q/K/V biases), ``qwen3`` (Q/K norms): NEOX-style RoPE, not permuted.
- ``phi3`` (Phi-3, Phi-4): fused ``attn_qkv`` and ``ffn_up`` (gate and up stacked)
  map one to one onto mlx_lm's ``qkv_proj`` / ``gate_up_proj``; the LongRoPE
  factors of 128k-context models are tensors in the GGUF and go into the config.
- ``gemma3`` → mlx_lm ``gemma3_text``: four norms per block; llama.cpp stores every
  Gemma RMSNorm weight with the +1 of ``x * (1 + w)`` folded in, mlx_lm adds the 1
  itself, so we subtract it. Sliding-window settings missing from older files take
  llama.cpp's built-in Gemma 3 values (window pattern 6, local RoPE base 10000).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from squish.errors import InputError

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

_ATTN = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


@dataclass(frozen=True)
class Family:
    arch: str  # general.architecture
    model_type: str  # mlx_lm model_type
    hf_class: str  # config.json "architectures"
    layers: dict[str, str]  # blk.N.<gguf> -> model.layers.N.<mlx>
    biases: frozenset[str] = frozenset()  # which of ``layers`` may carry a .bias
    qk_permuted: bool = False
    norm_plus_one: bool = False
    extra_config: Callable[[Any, dict], dict] | None = None
    side_tensors: frozenset[str] = field(default_factory=frozenset)  # read into the config

    def mlx_name(self, gguf_name: str) -> str:
        """mlx_lm name of a GGUF tensor; unknown names raise :class:`InputError`."""
        if gguf_name in GLOBAL_NAMES:
            return GLOBAL_NAMES[gguf_name]
        m = LAYER_RE.fullmatch(gguf_name)
        if m and m[2] in self.layers and (m[3] == "weight" or m[2] in self.biases):
            return f"model.layers.{m[1]}.{self.layers[m[2]]}.{m[3]}"
        raise InputError(f"GGUF tensor '{gguf_name}' is not supported for architecture "
                         f"'{self.arch}' (Squish cannot map it to an mlx_lm weight)")

    def transform(self, gguf_name: str, x: Any, config: dict) -> Any:
        """Undo llama.cpp's layout changes on one float32 tensor (numpy or MLX array)."""
        heads = self._permuted_heads(gguf_name, config)
        if heads:
            x = unpermute_qk_rows(x, heads)
        if self.norm_plus_one and _kind(gguf_name).endswith("norm"):
            x = x - 1.0  # float32 stays float32 (numpy and MLX arrays alike)
        return x

    def row_order(self, gguf_name: str, rows: int, config: dict) -> np.ndarray | None:
        """The row permutation :meth:`transform` applies, as indices (for quantized codes,
        which must not go through float maths), or None where it applies none."""
        heads = self._permuted_heads(gguf_name, config)
        return unpermute_qk_rows(np.arange(rows), heads) if heads else None

    def _permuted_heads(self, gguf_name: str, config: dict) -> int | None:
        kind = _kind(gguf_name)
        if self.qk_permuted and kind in ("attn_q", "attn_k"):
            return config["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"]
        return None


def _kind(gguf_name: str) -> str:
    m = LAYER_RE.fullmatch(gguf_name)
    return m[2] if m else gguf_name.removesuffix(".weight")


def unpermute_qk_rows(x: Any, n_heads: int) -> Any:
    """Undo llama.cpp's Q/K row permutation (rows only, so weights and biases alike).

    llama.cpp's converter maps HF row ``h*D + j*(D/2) + i`` to GGUF row
    ``h*D + 2*i + j`` (j in {0, 1}: the two RoPE halves become interleaved pairs).
    """
    rows = x.shape[0]
    if rows % (2 * n_heads):
        raise InputError(f"Q/K tensor with {rows} rows cannot be split into {n_heads} heads "
                         "of even size")
    head = rows // n_heads
    rest = tuple(x.shape[1:])
    return x.reshape(n_heads, head // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


# --- config ----------------------------------------------------------------------------

def clean_float(x: float) -> float:
    """Shortest decimal that round-trips in float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


class Meta:
    """``<arch>.*`` metadata lookups with clear errors."""

    def __init__(self, meta: dict[str, Any], arch: str):
        self.meta, self.arch = meta, arch

    def get(self, key: str, default: Any = None) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.meta:
            v = self.meta[full]
            return v.item() if isinstance(v, np.generic) else v
        if default is None:
            raise InputError(f"GGUF metadata key '{full}' is missing")
        return default


def _rope_scaling(m: Meta) -> dict | None:
    kind = str(m.get("rope.scaling.type", "none"))
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": clean_float(m.get("rope.scaling.factor"))}
    if kind == "yarn":
        return {"type": "yarn", "factor": clean_float(m.get("rope.scaling.factor")),
                "original_max_position_embeddings": int(m.get("rope.scaling.original_context_length"))}
    raise InputError(f"GGUF rope scaling type '{kind}' is not supported (none, linear, yarn)")


def _gemma3(m: Meta, cfg: dict) -> dict:
    layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    # llama.cpp: 1/sqrt(head_dim), except the 62-layer 27B, scaled by hidden/heads.
    scalar = hidden // heads if layers == 62 else cfg["head_dim"]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(m.get("attention.sliding_window")),
        "sliding_window_pattern": int(m.get("attention.sliding_window_pattern", 6)),
        "rope_local_base_freq": clean_float(m.get("rope.freq_base_swa", 10000.0)),
    }


def _phi3(m: Meta, cfg: dict) -> dict:
    out: dict[str, Any] = {"partial_rotary_factor": cfg.pop("_rope_dims") / cfg["head_dim"]}
    orig = m.get("rope.scaling.original_context_length", 0)
    if orig:
        out["original_max_position_embeddings"] = int(orig)
    return out


LLAMA_LAYERS = {**_ATTN, **_MLP, **_NORMS}
FAMILIES = {f.arch: f for f in [
    Family("llama", "llama", "LlamaForCausalLM", LLAMA_LAYERS, qk_permuted=True),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", LLAMA_LAYERS,
           biases=frozenset({"attn_q", "attn_k", "attn_v"})),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", {**LLAMA_LAYERS, **_QK_NORMS}),
    Family("phi3", "phi3", "Phi3ForCausalLM",
           {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
            "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj", **_NORMS},
           extra_config=_phi3, side_tensors=frozenset({"rope_factors_long.weight",
                                                      "rope_factors_short.weight"})),
    Family("gemma3", "gemma3_text", "Gemma3ForCausalLM",
           {**_ATTN, **_MLP, **_QK_NORMS, "attn_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
           norm_plus_one=True, extra_config=_gemma3),
]}
HIDDEN_ACT = {"gemma3": "gelu_pytorch_tanh"}


def family(arch: str) -> Family:
    if arch not in FAMILIES:
        raise InputError(f"GGUF architecture '{arch}' is not supported; supported: "
                         f"{', '.join(sorted(FAMILIES))} (Mistral GGUFs use 'llama')")
    return FAMILIES[arch]


def build_config(meta: dict[str, Any], gguf: Any) -> dict[str, Any]:
    """HF / mlx_lm ``config.json`` dict (no quantization block) from ``<arch>.*`` metadata.

    ``gguf`` is the :class:`~squish.quant.gguf_file.GGUFFile` (tensor shapes, and the
    small side tensors some families keep their RoPE factors in)."""
    arch = str(meta.get("general.architecture", ""))
    fam = family(arch)
    m = Meta(meta, arch)
    heads = int(m.get("attention.head_count"))
    hidden = int(m.get("embedding_length"))
    head_dim = int(m.get("attention.key_length", hidden // heads))
    embed = gguf.tensors.get("token_embd.weight")
    if embed is None:
        raise InputError("GGUF has no 'token_embd.weight' tensor")
    vocab = int(m.get("vocab_size", embed.shape[0]))
    if embed.shape != (vocab, hidden):
        raise InputError(f"GGUF token_embd.weight has shape {embed.shape}, expected "
                         f"(vocab_size {vocab}, embedding_length {hidden})")
    rope_dims = int(m.get("rope.dimension_count", head_dim))
    if rope_dims != head_dim and fam.arch != "phi3":
        raise InputError(f"GGUF partial RoPE ({rope_dims} of {head_dim} dims) is not supported "
                         f"for '{arch}'")
    if "rope_freqs.weight" in gguf.tensors:
        raise InputError("GGUF has 'rope_freqs.weight' (llama3-style RoPE frequency factors), "
                         "which Squish cannot turn back into an mlx_lm rope_scaling config")
    config: dict[str, Any] = {
        "model_type": fam.model_type,
        "architectures": [fam.hf_class],
        "hidden_act": HIDDEN_ACT.get(arch, "silu"),
        "hidden_size": hidden,
        "num_hidden_layers": int(m.get("block_count")),
        "intermediate_size": int(m.get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m.get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": clean_float(m.get("attention.layer_norm_rms_epsilon")),
        "rope_theta": clean_float(m.get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(m.get("context_length")),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "_rope_dims": rope_dims,
    }
    if (scaling := _rope_scaling(m)) is not None:
        config["rope_scaling"] = scaling
    if fam.extra_config is not None:
        config.update(fam.extra_config(m, config))
    config.pop("_rope_dims", None)
    if fam.side_tensors & set(gguf.tensors):
        config["rope_scaling"] = _longrope(gguf, config)
    _check_instantiable(config)
    return config


def _longrope(gguf: Any, config: dict) -> dict:
    names = ("rope_factors_long.weight", "rope_factors_short.weight")
    if not all(n in gguf.tensors for n in names):
        raise InputError(f"GGUF has only one of {names}; LongRoPE needs both")
    if "original_max_position_embeddings" not in config:
        raise InputError("GGUF has LongRoPE factors but no rope.scaling.original_context_length")
    long, short = (gguf.read(n).astype(np.float64).tolist() for n in names)
    return {"type": "longrope", "long_factor": long, "short_factor": short}


def _check_instantiable(config: dict[str, Any]) -> None:
    from mlx_lm.utils import _get_classes

    try:
        _, args_cls = _get_classes(config)
        args_cls.from_dict(config)
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"GGUF config does not instantiate as mlx_lm "
                         f"'{config['model_type']}': {e}") from e
