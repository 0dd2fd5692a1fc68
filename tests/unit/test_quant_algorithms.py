"""Calibrated quantization beats RTN on outlier channels; spec validation; thresholds and
the repetition detector. (Fold discovery and exactness: tests/integration/test_folds.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from squish.quant import awq
from squish.quant.evaluate import THRESHOLDS, QualityReport, Thresholds, repetition_loop
from squish.quant.gptq import HessianPrep, dequantize, gptq, hessian, output_error, rtn
from squish.quant.quantize import Method, QuantSpec
from squish.errors import InputError


def test_calibrated_beats_rtn_on_outlier_channels():
    rng = np.random.default_rng(1)
    n_in, n_out, gs = 256, 128, 64
    x = rng.normal(size=(2048, n_in)).astype(np.float32)
    x[:, rng.choice(n_in, 6, replace=False)] *= 25.0  # salient input channels
    w = rng.normal(size=(n_out, n_in)).astype(np.float32)
    H = hessian(x)
    for bits in (3, 4):
        e_rtn = output_error(w, dequantize(*rtn(w, bits, gs, "float32"), gs), H)[0]
        e_clip = output_error(w, dequantize(*rtn(w, bits, gs, "float32", H=H, clip=True), gs), H)[0]
        q, s, b = gptq(w, HessianPrep(H), bits, gs, "float32")
        e_gptq = output_error(w, dequantize(q, s, b, gs), H)[0]
        sc, _, ratio = awq.search_scale(np.abs(x).mean(0), [w], H, bits, gs, "float32")
        assert ratio < 1.0
        ws = w * sc[None]
        q, s, b = gptq(ws, HessianPrep(hessian(x / sc[None])), bits, gs, "float32")
        e_all = output_error(w, dequantize(q, s, b, gs) / sc[None], H)[0]
        assert e_clip < e_rtn
        assert e_gptq < 0.8 * e_rtn
        assert e_all < 0.8 * e_rtn


@pytest.mark.parametrize("bits", [2, 5, 16])
def test_unsupported_bits_refused(bits):
    with pytest.raises(InputError, match="bits"):
        QuantSpec(bits=bits, group_size=64)


def test_unsupported_group_and_dtype_refused():
    with pytest.raises(InputError):
        QuantSpec(bits=4, group_size=48)
    with pytest.raises(InputError):
        QuantSpec(bits=4, group_size=64, dtype="float64")
    assert QuantSpec(bits=3, group_size=64).experimental


def test_method_parse():
    assert Method.parse("rtn").name == "rtn"
    assert Method.parse("squish").name == "awq+clip+gptq"
    assert Method.parse("gptq+clip").name == "clip+gptq"
    with pytest.raises(InputError):
        Method.parse("magic")


def test_thresholds_logic():
    assert THRESHOLDS[3].experimental and not THRESHOLDS[4].experimental
    assert THRESHOLDS[3].max_mean_kld > THRESHOLDS[4].max_mean_kld > THRESHOLDS[8].max_mean_kld
    th = Thresholds(max_mean_kld=0.1, min_top1=0.8, max_ppl_delta=0.1)
    metrics = {"ppl_ref": 20.0, "ppl_quant": 21.0, "max_abs_dlogit": 3.0}
    good = QualityReport(metrics, th, checks=[("mean KLD", 0.05, 0.1, True), ("top-1", 0.9, 0.8, True)])
    bad = QualityReport(metrics, th, checks=[("mean KLD", 0.5, 0.1, False), ("top-1", 0.9, 0.8, True)])
    assert good.passed and not bad.passed
    assert "FAIL" in bad.table() and "PASSED" in good.table()
    d = bad.to_dict()
    assert d["passed"] is False and d["checks"][0]["ok"] is False


def test_repetition_loop_detector():
    assert repetition_loop([5] * 20)
    assert repetition_loop(list(range(30)) + [1, 2, 3, 4] * 6)
    assert not repetition_loop(list(range(40)))
    assert not repetition_loop([1, 2, 3])  # too short to call a loop
    assert not repetition_loop([9, 1, 7, 2, 7, 3, 7, 4, 7, 5])  # "1. x 2. y 3. z"-like


def test_float32_inverse_factor_matches_float64_and_refuses_non_pd():
    """The wide-layer path (MLX LAPACK, float32) against numpy in float64."""
    from squish.quant.gptq import _upper_inv_factor

    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 300))
    H = x.T @ x / 400
    ref = _upper_inv_factor(H, 0.01)  # float64: numpy
    got = _upper_inv_factor(H.astype(np.float32), 0.01)
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    assert np.allclose(np.triu(got), got)
    assert np.allclose(got.T.astype(np.float64) @ got, np.linalg.inv(H + 0.01 * np.eye(300)), atol=1e-3)
    with pytest.raises(np.linalg.LinAlgError):
        _upper_inv_factor(-np.eye(8, dtype=np.float32), 0.0)


def test_row_pieces_give_the_whole_matrix_results(monkeypatch):
    """The clip search, the error sums and the AWQ search run in row pieces (peak memory);
    cutting a matrix into many pieces gives the results of one whole piece."""
    from squish.quant import gptq as gq
    from squish.quant.gptq import fit_groups

    rng = np.random.default_rng(4)
    x = rng.normal(size=(512, 256)).astype(np.float32)
    w = rng.normal(size=(96, 256)).astype(np.float32)
    H = hessian(x)

    def run():
        S, B = fit_groups(w, H, 4, 64, "float32")
        q, s, b = gptq(w, HessianPrep(H), 4, 64, "float32")
        err = output_error(w, dequantize(q, s, b, 64), H)
        sc, alpha, ratio = awq.search_scale(np.abs(x).mean(0), [w[:40], w[40:]], H, 4, 64, "float32")
        return S, B, q, err, sc, alpha, ratio

    whole = run()
    monkeypatch.setattr(gq, "PIECE_ELEMENTS", 256 * 7)  # 7 rows a piece: 14 pieces, the last short
    assert len(list(gq.pieces(96, 256))) == 14
    cut = run()
    for a, b in zip(whole[:3], cut[:3]):
        assert np.array_equal(a, b)
    assert np.allclose(whole[3], cut[3], rtol=1e-9)
    assert np.array_equal(whole[4], cut[4]) and whole[5] == cut[5]
    assert abs(whole[6] - cut[6]) < 1e-9


def test_the_float32_inverse_factor_is_a_view_not_a_third_copy():
    """At n = 8960 each copy is 321 MB: the factor is returned as a reversed view of
    LAPACK's own buffer."""
    from squish.quant.gptq import _upper_inv_factor

    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 200)).astype(np.float32)
    U = _upper_inv_factor(x.T @ x / 300, 0.01)
    assert U.base is not None and not U.flags.owndata


def test_vocab_last_only_forms_the_last_position_alone():
    """A generation loop's head (``Runner(generation=True)``): the last position's logits
    are exact, the earlier ones are never formed."""
    import mlx.core as mx

    from squish.quant.graph import Vocab

    rng = np.random.default_rng(6)
    W = mx.array(rng.normal(size=(300, 32)).astype(np.float32))
    x = mx.array(rng.normal(size=(2, 5, 32)).astype(np.float32))
    v = Vocab(W)
    full = np.array(v.linear(x))
    v.last_only = True
    calls = []
    project = v.project
    v.project = lambda a: (calls.append(a.shape), project(a))[1]
    got = v.linear(x)
    assert got.shape == (2, 5, 300)
    assert calls == [(2, 1, 32)]  # one product, for the last position only
    assert np.allclose(np.array(got[:, -1]), full[:, -1], atol=1e-5)
    one = v.linear(x[:, -1:])  # a decode step is computed as before
    assert np.allclose(np.array(one[:, 0]), full[:, -1], atol=1e-5)
