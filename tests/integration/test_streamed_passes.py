"""Whole-model passes through the model's own mlx_lm graph with numpy products: a
streamed source (one block in float32 at a time, the embedding / head as stored and
read by rows and vocab chunks) gives what a resident one gives, and the quantized
side computes what mlx_lm's quantized kernels compute."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_hf_folder, make_tiny_artifact  # noqa: E402

from squish.quant import graph as g  # noqa: E402
from squish.quant.passes import Runner  # noqa: E402
from squish.quant.sources import load_hf_dir  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_generation_equals_resident(tmp_path, arch, monkeypatch):
    from mlx_lm.utils import load_tokenizer

    from squish.quant.calibrate import calibration_tokens

    src = make_hf_folder(tmp_path / arch, arch, dtype="bfloat16")
    ref, tok = load_hf_dir(src), load_tokenizer(src)

    def gen():
        return np.array(calibration_tokens(ref, tok, calib_file=None, n_samples=3, seq_len=24, seed=1)[0])

    resident = gen()
    monkeypatch.setattr(g, "RESIDENT_BYTES", 0)
    assert np.array_equal(gen(), resident)


def test_streamed_runner_holds_no_block_between_calls(tmp_path):
    import mlx.core as mx

    ref = load_hf_dir(make_hf_folder(tmp_path / "m", "llama", dtype="bfloat16"))
    ids = mx.array([[1, 5, 9, 30, 31]])
    with Runner(g.Graph(g.build_model(ref.config)), ref, resident=True) as run:
        want = np.array(run.model(ids))
    with Runner(g.Graph(g.build_model(ref.config)), ref, resident=False) as run:
        got = np.array(run.model(ids))
        assert all(lin.w is None for lins in run.lins for lin in lins.values())
        again = np.array(run.model(ids))  # a second pass opens the source again
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(again, want)


def test_reference_runner_equals_mlx_lm_in_float32(tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    src = make_hf_folder(tmp_path / "m", "qwen3", dtype="float32")
    model, _ = load(str(src))
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    want = np.array(model(ids))
    with Runner(g.Graph(g.build_model(load_hf_dir(src).config)), load_hf_dir(src)) as run:
        got = np.array(run.model(ids))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_quantized_runner_computes_what_the_kernels_compute(tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(make_tiny_artifact(tmp_path / "q", "llama")))
    ids = mx.array([[1, 2, 3, 4, 5, 6]])
    real = np.array(model(ids))
    with Runner(g.Graph(model)) as run:
        mine = np.array(run.model(ids))
    np.testing.assert_allclose(mine, real, rtol=1e-3, atol=1e-3 * np.abs(real).max())
    assert np.array_equal(np.array(model(ids)), real)  # leaving the runner restores the model


def test_vocab_rows_in_chunks_equal_the_whole_matrix(monkeypatch):
    import mlx.core as mx

    rng = np.random.default_rng(1)
    w = mx.array(rng.standard_normal((1000, 64)).astype(np.float32)).astype(mx.bfloat16)
    full = np.array(w.astype(mx.float32))
    rows = g.Vocab(w)
    monkeypatch.setattr(g.Vocab, "CHUNK", 300)  # 4 chunks, the last one partial
    x = rng.standard_normal((3, 64)).astype(np.float32)
    out = rows.project(x)
    assert out.dtype == np.float32 and out.shape == (3, 1000)
    np.testing.assert_allclose(out, x @ full.T, rtol=1e-5, atol=1e-4)
    assert np.array_equal(rows[[3, 999, 3]], full[[3, 999, 3]])
    q = mx.quantize(w.astype(mx.float32), group_size=64, bits=4)
    qrows = g.Vocab(*q, group_size=64, bits=4)
    assert np.array_equal(qrows.rows(0, 1000), np.array(mx.dequantize(*q, group_size=64, bits=4)))


def test_switch_matmul_equals_gather_mm():
    import mlx.core as mx

    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 1, 1, 16)).astype(np.float32)
    idx = rng.integers(0, 4, (2, 5, 3))
    w = rng.standard_normal((4, 8, 16)).astype(np.float32)
    want = np.array(mx.gather_mm(mx.array(x), mx.array(w).swapaxes(-1, -2), rhs_indices=mx.array(idx)))
    seen = {}
    got = g.switch_matmul(x, idx, w, None, on_expert=lambda e, rows: seen.__setitem__(e, len(rows)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert sum(seen.values()) == idx.size and set(seen) <= set(range(4))


@pytest.mark.parametrize("hq,hk,L,S,mask", [(4, 2, 5, 5, "causal"), (4, 2, 1, 7, None), (4, 4, 6, 6, "window"),
                                            (4, 2, 3, 9, "causal"), (6, 2, 4, 4, "additive"), (4, 2, 5, 5, "sinks")])
def test_numpy_attention_equals_mlx(hq, hk, L, S, mask):
    import mlx.core as mx
    from mlx_lm.models.base import create_causal_mask

    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in
               ((2, hq, L, 16), (2, hk, S, 16), (2, hk, S, 8)))
    kw = {"mask": mask}
    if mask == "window":
        kw["mask"] = create_causal_mask(L, window_size=3)
    elif mask == "additive":
        kw["mask"] = mx.array(rng.standard_normal((2, 1, L, S)).astype(np.float32))
    elif mask == "sinks":
        kw = {"mask": "causal", "sinks": mx.array(rng.standard_normal((hq,)).astype(np.float32))}
    want = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, **kw))
    with g.numpy_attention():
        got = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, **kw))
        with g.mlx_attention():
            assert np.array_equal(np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, **kw)), want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
