"""Whole-model numpy passes that hold one layer in float32 at a time (and the
embedding / head as stored, read by rows and vocab chunks) give what the
resident versions gave: calibration-text generation from a lazy reference, and
the quality gate's dequantized blocks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_hf_folder, make_tiny_artifact  # noqa: E402

from squish.quant import npforward as nf  # noqa: E402
from squish.quant.sources import load_hf_dir  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_generation_equals_resident(tmp_path, arch):
    import mlx.core as mx

    ref = load_hf_dir(make_hf_folder(tmp_path / arch, arch, dtype="bfloat16"))
    a = nf.make_arch(ref.config, max_pos=64)
    T = ref.tensors()
    resident = [nf.layer_weights(T, i) for i in range(a.n_layers)]
    embed = np.array(T["model.embed_tokens.weight"].astype(mx.float32))
    norm = np.array(T["model.norm.weight"].astype(mx.float32))
    streamed = nf.StreamedLayers(ref.tensors, a.n_layers)
    rows = nf.VocabRows(T["model.embed_tokens.weight"])  # what calibration uses: no float32 copy
    prompts = [[1, 5, 9, 30], [2, 7, 40, 41, 42, 43]]

    def gen(layers, emb):
        lm = nf.NumpyLM(a, layers, emb, norm, emb)
        return lm.generate(prompts, 6, np.random.default_rng(0), 1.0, 0.95, banned=[0])

    assert gen(streamed, rows) == gen(resident, embed)
    assert len(list(streamed)) == a.n_layers  # every pass opens a fresh source


def test_streamed_layers_hold_nothing_between_passes(tmp_path):
    ref = load_hf_dir(make_hf_folder(tmp_path / "m", "llama", dtype="bfloat16"))
    opened = []

    def open_tensors():
        opened.append(ref.tensors())
        return opened[-1]

    layers = nf.StreamedLayers(open_tensors, nf.make_arch(ref.config).n_layers)
    for _ in layers:
        pass
    assert not any(k.startswith("model.layers.") for k in opened[-1])  # each taken once used


def test_gate_blocks_equal_full_dequantization(tmp_path):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from squish.quant.evaluate import quantized_layers

    model, _ = load(str(make_tiny_artifact(tmp_path / "q", "llama")))
    blocks, embed, norm, head = quantized_layers(model)
    full = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            full[name + ".weight"] = np.array(mx.dequantize(
                mod.weight, mod.scales, mod.biases, group_size=mod.group_size, bits=mod.bits).astype(mx.float32))
    for k, v in tree_flatten(model.parameters()):
        if not any(k.endswith(s) for s in (".scales", ".biases")) and k not in full:
            full[k] = np.array(v.astype(mx.float32))
    assert len(blocks) == len(model.model.layers)
    for i, W in enumerate(blocks):
        pre = f"model.layers.{i}."
        want = {k[len(pre):]: v for k, v in full.items() if k.startswith(pre)}
        assert W.keys() == want.keys()
        for k in W:
            assert np.array_equal(W[k], want[k]), k
    assert isinstance(embed, nf.VocabRows)  # kept as stored, not a float32 copy
    assert np.array_equal(embed.dense(), full["model.embed_tokens.weight"])
    assert np.array_equal(norm, full["model.norm.weight"])
    assert head is embed  # tied
    rng = np.random.default_rng(0)
    ids = rng.integers(0, embed.shape[0], (2, 5))
    assert np.array_equal(embed[ids], full["model.embed_tokens.weight"][ids])
    x = rng.standard_normal((2, 5, embed.shape[1])).astype(np.float32)
    np.testing.assert_allclose(nf.project(x, head), x @ full["model.embed_tokens.weight"].T, rtol=1e-5, atol=1e-5)


def test_vocab_rows_in_chunks_equal_the_whole_matrix(monkeypatch):
    import mlx.core as mx

    rng = np.random.default_rng(1)
    w = mx.array(rng.standard_normal((1000, 64)).astype(np.float32)).astype(mx.bfloat16)
    full = np.array(w.astype(mx.float32))
    rows = nf.VocabRows(w)
    monkeypatch.setattr(nf.VocabRows, "CHUNK", 300)  # 4 chunks, the last one partial
    x = rng.standard_normal((3, 64)).astype(np.float32)
    out = rows.project(x)
    assert out.dtype == np.float32 and out.shape == (3, 1000)
    np.testing.assert_allclose(out, x @ full.T, rtol=1e-5, atol=1e-4)
    assert np.array_equal(rows[[3, 999, 3]], full[[3, 999, 3]])
