"""Tiny random GGUF files written with the ``gguf`` library's own ``GGUFWriter``.

``write_model`` starts from Hugging Face-layout float weights and an HF config, and
writes what llama.cpp's converter would: GGUF tensor names, ``<arch>.*`` metadata,
Q/K rows permuted for llama, Gemma norms with the +1 folded in. Tests then check
that Squish's reference gives back the HF weights (same logits in mlx_lm).
Structure tests only: the weights are random.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable-character table, in byte order."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def bpe_vocab() -> dict:
    tokens = SPECIALS + byte_alphabet() + ["Ġt", "he"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["Ġ t", "h e"],
            "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(tokens) - 3),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}"
                                       "<|im_end|>{% endfor %}"}


def spm_vocab(pieces=("▁t", "he", "▁the", "▁a", "at", "▁c", "▁cat"), *, gemma=False) -> dict:
    """A SentencePiece vocabulary: specials, 256 byte tokens, letters, then ``pieces``
    (scores fall with the position, as in real files)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + (["<start_of_turn>", "<end_of_turn>"] if gemma else [])
    letters = ["▁"] + list("abcdefghijklmnopqrstuvwxyz.")
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + letters + list(pieces)
    if gemma:
        tokens += ["\n", "  "]
    types = [3] * len(specials) + [6] * 256 + [1] * (len(letters) + len(pieces)) + ([4, 4] if gemma else [])
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(letters) + len(pieces))]
    scores += [0.0] * (len(tokens) - len(scores))
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": not gemma}


# Byte offsets of the float16 scale(s) in one block, for the types the library can
# dequantize but not quantize: random bytes there could be NaN/Inf, so they get a
# sane scale and everything else stays random.
F16_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
              "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,),
              "IQ1_S": (0,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


def blocks_for(type_name: str, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes [rows, bytes per row] of a ``type_name`` tensor with 2 blocks per row."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    x = rng.standard_normal((rows, 2 * block)).astype(np.float32)
    if type_name == "F32":
        return x
    if type_name == "F16":
        return x.astype(np.float16)
    try:
        return gguf.quants.quantize(x, qtype)
    except NotImplementedError:
        pass
    raw = rng.integers(0, 256, (rows * 2, size), dtype=np.uint8)
    scale = rng.uniform(0.01, 0.1, (rows * 2, 1)).astype(np.float16).view(np.uint8)
    if type_name == "IQ1_M":  # its scale is spread over the top nibbles of four uint16s
        s = np.full((rows * 2, 4), 0x3C00, np.uint16)  # 1.0
        raw[:, -8:] = ((raw[:, -8:].view(np.uint16) & 0x0FFF)
                       | ((s >> np.array([0, 4, 8, 12], np.uint16)) & 0xF) << 12).view(np.uint8)
    for off in F16_SCALES.get(type_name, ()):
        raw[:, off:off + 2] = scale
    return raw.reshape(rows, 2 * size)


def write_gguf(path: Path, arch: str, meta: dict, tensors: dict) -> Path:
    """``tensors``: name -> float array (F32 / F16 by dtype) or (raw uint8 bytes, type name)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, list(v))
    for name, t in tensors.items():
        if isinstance(t, tuple):
            raw, tname = t
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[tname])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# --- tiny models of each family ------------------------------------------------------------

BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=True)
HF_CONFIGS = {
    "llama": dict(model_type="llama", **BASE),
    # Mistral Nemo's shape: head_dim set apart from hidden / heads; GGUF arch 'llama'.
    "mistral": dict(model_type="llama", **{**BASE, "head_dim": 32, "tie_word_embeddings": False}),
    "qwen2": dict(model_type="qwen2", **BASE),
    "qwen3": dict(model_type="qwen3", head_dim=16, **BASE),
    "phi3": dict(model_type="phi3", **{**BASE, "tie_word_embeddings": False}),
    "gemma3": dict(model_type="gemma3_text", head_dim=32, query_pre_attn_scalar=32,
                   sliding_window=8, sliding_window_pattern=2, rope_local_base_freq=10000.0,
                   **{**BASE, "rope_theta": 1000000.0}),
}
GGUF_ARCH = {"mistral": "llama", "gemma3": "gemma3"}


def hf_weights(family: str, rng: np.random.Generator, vocab: int) -> dict[str, np.ndarray]:
    """Random float32 weights in mlx_lm naming / HF layout (norms near their real values)."""
    c = HF_CONFIGS[family]
    h, ff = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim", h // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    gemma = family == "gemma3"

    def norm(n):  # Gemma stores w in x * (1 + w): near 0; others near 1
        return rng.normal(0.0 if gemma else 1.0, 0.1, n).astype(np.float32)

    def mat(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(vocab, h), "model.norm.weight": norm(h)}
    if not c["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(vocab, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "self_attn.o_proj.weight"] = mat(h, q)
        w[p + "mlp.down_proj.weight"] = mat(h, ff)
        if family == "phi3":
            w[p + "self_attn.qkv_proj.weight"] = mat(q + 2 * kv, h)
            w[p + "mlp.gate_up_proj.weight"] = mat(2 * ff, h)
            continue
        for n, rows in (("q", q), ("k", kv), ("v", kv)):
            w[p + f"self_attn.{n}_proj.weight"] = mat(rows, h)
        w[p + "mlp.gate_proj.weight"] = mat(ff, h)
        w[p + "mlp.up_proj.weight"] = mat(ff, h)
        if family == "qwen2":
            for n, rows in (("q", q), ("k", kv), ("v", kv)):
                w[p + f"self_attn.{n}_proj.bias"] = mat(rows)
        if family in ("qwen3", "gemma3"):
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        if gemma:
            w[p + "pre_feedforward_layernorm.weight"] = norm(h)
            w[p + "post_feedforward_layernorm.weight"] = norm(h)
    return w


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The row permutation llama.cpp's converter applies to llama Q/K weights."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate_up_proj": "ffn_up", "input_layernorm": "attn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}


def gguf_name(family: str, name: str) -> str:
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if name in glob:
        return glob[name]
    _, _, i, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    table = dict(_TO_GGUF)
    if family == "gemma3":
        table.update({"post_attention_layernorm": "post_attention_norm",
                      "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    else:
        table["post_attention_layernorm"] = "ffn_norm"
    return f"blk.{i}.{table[module]}.{kind}"


def gguf_metadata(family: str) -> dict:
    c, arch = HF_CONFIGS[family], GGUF_ARCH.get(family, family)
    hd = c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    meta = {
        f"{arch}.embedding_length": c["hidden_size"], f"{arch}.block_count": c["num_hidden_layers"],
        f"{arch}.feed_forward_length": c["intermediate_size"],
        f"{arch}.attention.head_count": c["num_attention_heads"],
        f"{arch}.attention.head_count_kv": c["num_key_value_heads"],
        f"{arch}.attention.key_length": hd, f"{arch}.attention.value_length": hd,
        f"{arch}.rope.dimension_count": hd, f"{arch}.context_length": c["max_position_embeddings"],
        f"{arch}.attention.layer_norm_rms_epsilon": c["rms_norm_eps"],
        f"{arch}.rope.freq_base": c["rope_theta"],
        "general.basename": f"tiny-{family}", "general.size_label": "1K",
    }
    if family == "gemma3":
        meta[f"{arch}.attention.sliding_window"] = c["sliding_window"]
        meta[f"{arch}.attention.sliding_window_pattern"] = c["sliding_window_pattern"]
    return meta


def write_model(path: Path, family: str, *, seed: int = 0, vocab_meta: dict | None = None,
                qtypes: dict[str, str] | None = None) -> tuple[Path, dict, dict]:
    """A tiny GGUF of ``family``; returns (path, HF config, HF-layout float32 weights).

    ``qtypes``: GGUF tensor kind (``attn_q``, ``token_embd``, ...) -> a type the ``gguf``
    library quantizes (Q4_0, Q8_0, ...): those weights are stored quantized, so the
    returned float weights are then only what was quantized, not what the file holds."""
    import gguf

    qtypes = qtypes or {}
    vocab_meta = vocab_meta or (spm_vocab(gemma=True) if family == "gemma3" else bpe_vocab())
    vocab = len(vocab_meta["tokenizer.ggml.tokens"])
    config = {**HF_CONFIGS[family], "vocab_size": vocab}
    weights = hf_weights(family, np.random.default_rng(seed), vocab)
    arch = GGUF_ARCH.get(family, family)
    tensors = {}
    for name, x in weights.items():
        g = gguf_name(family, name)
        if arch == "llama" and g.split(".")[-2] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if "attn_q" in g else "num_key_value_heads"]
            x = llama_cpp_permute(x, heads)
        if family == "gemma3" and g.endswith("norm.weight"):
            x = x + np.float32(1.0)
        kind = g.split(".")[-2] if g.startswith("blk.") else g.removesuffix(".weight")
        if kind in qtypes and x.ndim == 2:
            qtype = gguf.GGMLQuantizationType[qtypes[kind]]
            x = (gguf.quants.quantize(x, qtype), qtypes[kind])
        tensors[g] = x
    write_gguf(path, arch, {**gguf_metadata(family), **vocab_meta}, tensors)
    return Path(path), config, weights


def mlx_model(config: dict, weights: dict):
    """An mlx_lm model of ``config`` with ``weights`` (sanitized as mlx_lm.load does)."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    w = {k: v if isinstance(v, mx.array) else mx.array(v) for k, v in weights.items()}
    if hasattr(model, "sanitize"):
        w = model.sanitize(w)
    model.load_weights(list(w.items()), strict=True)
    model.eval()
    return model
