"""Each GGUF architecture Squish maps, on a tiny random model written the way llama.cpp's
converter writes it: the reference loads into the mlx_lm model class and gives the
logits of the float source it was made from (Q/K permutation, Gemma's +1 norms and
the config fields undone / rebuilt correctly)."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_tiny import HF_CONFIGS, mlx_model, write_model  # noqa: E402

from squish.quant.gguf import load_gguf  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"]
IDS = mx.array([[5, 40, 41, 7, 90, 3, 12, 60, 61, 62, 63, 9]])  # longer than gemma's tiny window


@pytest.fixture(params=["mlx", "numpy"])
def reader(request, monkeypatch):
    """Both tensor readers: MLX's own (all-F32 files take it) and the gguf package's."""
    if request.param == "numpy":
        from squish.quant import gguf as gguf_mod

        monkeypatch.setattr(gguf_mod, "MLX_NATIVE_BITS", {})
    return request.param


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_gives_the_float_source_logits(tmp_path, family, reader):
    path, hf_config, hf_weights = write_model(tmp_path / f"{family}.gguf", family)
    ref = load_gguf(path, tmp_path / "work")
    cfg = ref.config
    for key, want in hf_config.items():
        assert cfg[key] == want, (key, cfg[key], want)
    tensors = ref.tensors()
    assert tensors.native == (reader == "mlx")
    assert set(tensors) == set(hf_weights)
    got = {k: tensors[k] for k in tensors}
    assert all(v.dtype == mx.float32 for v in got.values())
    source = mlx_model(hf_config, hf_weights)(IDS)
    ours = mlx_model(cfg, got)(IDS)
    assert bool(mx.all(mx.isfinite(ours)))
    np.testing.assert_allclose(np.array(ours), np.array(source), rtol=0, atol=1e-4)


def test_the_check_can_fail_without_the_llama_unpermutation(tmp_path, monkeypatch, reader):
    from squish.quant import gguf_arch

    path, hf_config, hf_weights = write_model(tmp_path / "l.gguf", "llama")
    monkeypatch.setattr(gguf_arch, "unpermute_qk_rows", lambda x, heads: x)
    ref = load_gguf(path, tmp_path / "work")
    t = ref.tensors()
    wrong = mlx_model(ref.config, {k: t[k] for k in t})(IDS)
    assert float(mx.abs(wrong - mlx_model(hf_config, hf_weights)(IDS)).max()) > 1e-2


def test_gemma3_norms_lose_the_folded_one(tmp_path, reader):
    path, _, hf_weights = write_model(tmp_path / "g.gguf", "gemma3")
    ref = load_gguf(path, tmp_path / "work")
    t = ref.tensors()
    for name in ("model.norm.weight", "model.layers.1.self_attn.k_norm.weight",
                 "model.layers.0.post_feedforward_layernorm.weight"):
        np.testing.assert_allclose(np.array(t[name]), hf_weights[name], atol=1e-6)
    assert ref.config["model_type"] == "gemma3_text"
    assert any("+1" in n for n in ref.notes)


def test_tensors_are_read_when_looked_up_and_forgotten_when_popped(tmp_path, monkeypatch):
    from squish.quant import gguf as gguf_mod

    monkeypatch.setattr(gguf_mod, "MLX_NATIVE_BITS", {})  # the numpy reader
    path, _, _ = write_model(tmp_path / "q.gguf", "qwen3")
    ref = load_gguf(path, tmp_path / "work")
    reads = []
    real = gguf_mod.read_tensor
    monkeypatch.setattr(gguf_mod, "read_tensor", lambda p, info: reads.append(info.name) or real(p, info))
    t = ref.tensors()
    assert reads == [] and "model.layers.0.mlp.up_proj.weight" in t
    t.pop("model.layers.0.mlp.up_proj.weight")
    assert reads == ["blk.0.ffn_up.weight"]
    assert "model.layers.0.mlp.up_proj.weight" not in t
    with pytest.raises(KeyError):
        t.pop("model.layers.0.mlp.up_proj.weight")
    assert t.pop("absent", None) is None
    assert "model.layers.0.mlp.up_proj.weight" in ref.tensors()  # every call opens afresh


def test_phi3_longrope_factors_go_into_the_config(tmp_path):
    from gguf_tiny import bpe_vocab, gguf_metadata, gguf_name, hf_weights, write_gguf

    rng = np.random.default_rng(3)
    vocab = bpe_vocab()
    weights = hf_weights("phi3", rng, len(vocab["tokenizer.ggml.tokens"]))
    tensors = {gguf_name("phi3", k): v for k, v in weights.items()}
    long, short = np.linspace(1, 4, 8, dtype=np.float32), np.ones(8, np.float32)
    tensors |= {"rope_factors_long.weight": long, "rope_factors_short.weight": short}
    meta = {**gguf_metadata("phi3"), **vocab, "phi3.rope.scaling.original_context_length": 64}
    ref = load_gguf(write_gguf(tmp_path / "p.gguf", "phi3", meta, tensors), tmp_path / "w")
    scaling = ref.config["rope_scaling"]
    assert scaling["type"] == "longrope" and ref.config["original_max_position_embeddings"] == 64
    np.testing.assert_allclose(scaling["long_factor"], long)
    np.testing.assert_allclose(scaling["short_factor"], short)
    assert "rope_factors_long.weight" not in set(ref.tensors())
    t = ref.tensors()
    logits = mlx_model(ref.config, {k: t[k] for k in t})(IDS)
    assert bool(mx.all(mx.isfinite(logits)))


def test_configs_cover_every_family():
    assert set(FAMILIES) == set(HF_CONFIGS)


def test_both_readers_agree_bit_for_bit_on_mlx_native_types(tmp_path):
    """Q8_0 / Q4_0 / Q4_1 / F16 / F32 in one llama file (Q/K permuted): MLX's reader
    and the gguf package's give identical float32 tensors."""
    import gguf

    from gguf_tiny import bpe_vocab, gguf_metadata, gguf_name, hf_weights, llama_cpp_permute, write_gguf
    from squish.quant.gguf import GGUFTensors
    from squish.quant.gguf_arch import family
    from squish.quant.gguf_file import open_gguf

    vocab = bpe_vocab()
    w = hf_weights("llama", np.random.default_rng(5), len(vocab["tokenizer.ggml.tokens"]))
    kinds = ["Q8_0", "Q4_0", "Q4_1", "F16", "F32"]
    tensors = {}
    for i, (name, x) in enumerate(w.items()):
        g = gguf_name("llama", name)
        if g.split(".")[-2] in ("attn_q", "attn_k"):
            x = llama_cpp_permute(x, HF_CONFIGS["llama"]["num_attention_heads" if "attn_q" in g
                                                         else "num_key_value_heads"])
        kind = kinds[i % len(kinds)] if x.ndim == 2 else "F32"
        if kind == "F16":
            tensors[g] = x.astype(np.float16)
        elif kind == "F32":
            tensors[g] = x
        else:
            tensors[g] = (gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind]), kind)
    path = write_gguf(tmp_path / "m.gguf", "llama", {**gguf_metadata("llama"), **vocab}, tensors)
    ref = load_gguf(path, tmp_path / "w")
    assert set(ref.source["file_types"]) == set(kinds)
    g = open_gguf(path)
    mlx_side = GGUFTensors(g, family("llama"), ref.config, native=True)
    np_side = GGUFTensors(g, family("llama"), ref.config, native=False)
    assert ref.tensors().native
    for name in mlx_side:
        np.testing.assert_array_equal(np.array(mlx_side[name]), np.array(np_side[name]), err_msg=name)
