"""Pure GGUF -> mlx_lm mapping logic: tensor names per family, the Q/K row
permutation, model names and config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from squish.errors import InputError
from squish.quant.gguf import model_name
from squish.quant.gguf_arch import build_config, family, unpermute_qk_rows
from squish.quant.gguf_file import GGUFFile, TensorInfo


def mlx_name(gguf_name: str, arch: str) -> str:
    return family(arch).mlx_name(gguf_name)


@pytest.mark.parametrize("gguf,mlx", [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("blk.11.attn_k.weight", "model.layers.11.self_attn.k_proj.weight"),
    ("blk.2.attn_v.weight", "model.layers.2.self_attn.v_proj.weight"),
    ("blk.2.attn_output.weight", "model.layers.2.self_attn.o_proj.weight"),
    ("blk.3.ffn_gate.weight", "model.layers.3.mlp.gate_proj.weight"),
    ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
    ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
    ("blk.4.attn_norm.weight", "model.layers.4.input_layernorm.weight"),
    ("blk.4.ffn_norm.weight", "model.layers.4.post_attention_layernorm.weight"),
])
def test_llama_names(gguf, mlx):
    assert mlx_name(gguf, "llama") == mlx


def test_arch_specific_names():
    assert mlx_name("blk.1.attn_q.bias", "qwen2") == "model.layers.1.self_attn.q_proj.bias"
    assert mlx_name("blk.1.attn_k_norm.weight", "qwen3") == "model.layers.1.self_attn.k_norm.weight"
    assert mlx_name("blk.2.attn_qkv.weight", "phi3") == "model.layers.2.self_attn.qkv_proj.weight"
    assert mlx_name("blk.2.ffn_up.weight", "phi3") == "model.layers.2.mlp.gate_up_proj.weight"
    assert mlx_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert mlx_name("blk.0.post_attention_norm.weight", "gemma3") == (
        "model.layers.0.post_attention_layernorm.weight")
    assert mlx_name("blk.0.post_ffw_norm.weight", "gemma3") == (
        "model.layers.0.post_feedforward_layernorm.weight")
    with pytest.raises(InputError, match="attn_q.bias.*llama"):
        mlx_name("blk.1.attn_q.bias", "llama")
    with pytest.raises(InputError, match="attn_q_norm"):
        mlx_name("blk.1.attn_q_norm.weight", "qwen2")
    with pytest.raises(InputError, match="rope_freqs"):
        mlx_name("rope_freqs.weight", "llama")
    with pytest.raises(InputError, match="attn_q.weight.*phi3"):
        mlx_name("blk.0.attn_q.weight", "phi3")  # Squish maps only the fused layout mlx_lm has
    with pytest.raises(InputError, match="architecture 'rwkv6'.*gemma3, llama, phi3, qwen2, qwen3"):
        mlx_name("token_embd.weight", "rwkv6")


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The permutation llama.cpp's converter applies to HF Q/K rows."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("n_heads,head_dim", [(1, 4), (3, 8), (9, 64)])
def test_unpermute_inverts_llama_cpp_permute(n_heads, head_dim):
    hf = np.arange(n_heads * head_dim * 5, dtype=np.float32).reshape(n_heads * head_dim, 5)
    gguf = llama_cpp_permute(hf, n_heads)
    assert not np.array_equal(gguf, hf)
    np.testing.assert_array_equal(unpermute_qk_rows(gguf, n_heads), hf)
    # 1-D (a bias) works the same way.
    np.testing.assert_array_equal(
        unpermute_qk_rows(gguf[:, 0], n_heads), hf[:, 0])


def test_unpermute_refuses_odd_heads():
    with pytest.raises(InputError, match="heads"):
        unpermute_qk_rows(np.zeros((10, 4)), 4)


@pytest.mark.parametrize("meta,stem,want", [
    ({"general.basename": "smollm2", "general.size_label": "135M",
      "general.finetune": "8k-lc100k-mix1-ep2"}, "SmolLM2-135M-Instruct.Q4_1", "smollm2-135m-instruct"),
    ({"general.basename": "Qwen2.5", "general.size_label": "1.5B", "general.finetune": "Instruct"},
     "qwen2.5-1.5b-instruct-q8_0", "qwen2.5-1.5b-instruct"),
    ({"general.basename": "Llama 3/x", "general.size_label": "8B"}, "model", "llama-3-x-8b"),
    ({}, "My Model.Q8_0", "my-model.q8_0"),
])
def test_model_name(meta, stem, want):
    assert model_name(meta, Path(f"/x/{stem}.gguf")) == want


def _header(**tensors: tuple[int, ...]) -> GGUFFile:
    infos = {n.replace("__", "."): TensorInfo(n.replace("__", "."), s, "F32", 0, 0, 0)
             for n, s in tensors.items()}
    return GGUFFile(Path("x.gguf"), 3, {}, infos, 0)


def _meta(arch="llama", **over):
    meta = {"general.architecture": arch, f"{arch}.embedding_length": 64, f"{arch}.block_count": 2,
            f"{arch}.feed_forward_length": 128, f"{arch}.attention.head_count": 4,
            f"{arch}.context_length": 256, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6}
    meta.update(over)
    return meta


def test_config_defaults_and_untied_head():
    cfg = build_config(_meta(), _header(token_embd__weight=(100, 64), output__weight=(100, 64)))
    assert cfg["num_key_value_heads"] == 4 and cfg["head_dim"] == 16
    assert cfg["rope_theta"] == 10000.0 and cfg["tie_word_embeddings"] is False
    assert cfg["vocab_size"] == 100 and "rope_scaling" not in cfg


def test_config_qwen3_head_dim_and_linear_scaling():
    meta = _meta("qwen3", **{"qwen3.attention.key_length": 32, "qwen3.rope.freq_base": 1e6,
                             "qwen3.rope.scaling.type": "linear", "qwen3.rope.scaling.factor": 2.0})
    cfg = build_config(meta, _header(token_embd__weight=(100, 64)))
    assert cfg["model_type"] == "qwen3" and cfg["head_dim"] == 32
    assert cfg["rope_scaling"] == {"type": "linear", "factor": 2.0}


@pytest.mark.parametrize("over,tensors,match", [
    ({"llama.block_count": None}, {"token_embd__weight": (100, 64)}, "llama.block_count"),
    ({}, {}, "token_embd"),
    ({}, {"token_embd__weight": (100, 32)}, "token_embd.weight has shape"),
    ({"llama.rope.dimension_count": 8}, {"token_embd__weight": (100, 64)}, "partial RoPE"),
    ({"llama.rope.scaling.type": "longrope"}, {"token_embd__weight": (100, 64)}, "longrope"),
])
def test_config_errors(over, tensors, match):
    meta = {k: v for k, v in _meta(**{k: v for k, v in over.items() if v is not None}).items()
            if not (k in over and over[k] is None)}
    with pytest.raises(InputError, match=match):
        build_config(meta, _header(**tensors))


def test_config_gemma3_defaults_from_llama_cpp():
    meta = _meta("gemma3", **{"gemma3.attention.key_length": 32, "gemma3.attention.sliding_window": 512})
    cfg = build_config(meta, _header(token_embd__weight=(100, 64)))
    assert (cfg["model_type"], cfg["query_pre_attn_scalar"], cfg["sliding_window_pattern"],
            cfg["rope_local_base_freq"], cfg["sliding_window"]) == ("gemma3_text", 32, 6, 10000.0, 512)
    meta["gemma3.block_count"] = 62  # Gemma 3 27B scales queries by hidden / heads
    assert build_config(meta, _header(token_embd__weight=(100, 64)))["query_pre_attn_scalar"] == 16
