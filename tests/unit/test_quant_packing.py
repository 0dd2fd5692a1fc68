"""MLX affine packing done in numpy must match MLX bit for bit."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from squish.quant.gptq import dequantize, rtn
from squish.quant.packing import pack, unpack


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_pack_matches_mx_quantize(bits, gs):
    w = mx.random.normal((16, 256), key=mx.random.key(bits * 1000 + gs))
    packed, s, b = mx.quantize(w, group_size=gs, bits=bits)
    q = unpack(np.array(packed), bits)
    assert q.max() < 2**bits
    assert np.array_equal(pack(q, bits), np.array(packed))  # bit-exact round trip
    mine = dequantize(q, np.array(s), np.array(b), gs)
    ref = np.array(mx.dequantize(packed, s, b, group_size=gs, bits=bits))
    assert np.array_equal(mine, ref)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_own_grid_through_quantized_linear(bits, dtype):
    """Our q/scales/biases, packed by us, give the same function in nn.QuantizedLinear."""
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(48, 128)).astype(np.float32)
    q, s, b = rtn(w, bits, 64, dtype, clip=True)
    deq = dequantize(q, s, b, 64)
    mdt = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    ql = nn.QuantizedLinear(128, 48, bias=False, group_size=64, bits=bits)
    ql.weight = mx.array(pack(q, bits))
    ql.scales = mx.array(s).astype(mdt)
    ql.biases = mx.array(b).astype(mdt)
    # scales were already rounded to dtype, so the cast is exact
    assert np.array_equal(np.array(ql.scales.astype(mx.float32)), s)
    back = np.array(mx.dequantize(ql.weight, ql.scales, ql.biases, group_size=64, bits=bits).astype(mx.float32))
    # half-precision dequantization rounds its output to the dtype (8 bits of mantissa for bf16)
    tol = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    np.testing.assert_allclose(back, deq, rtol=tol, atol=tol)
    x = rng.normal(size=(3, 128)).astype(np.float32)
    y = np.array(ql(mx.array(x).astype(mdt)).astype(mx.float32))
    want = x @ back.T
    # half-precision activations/outputs: compare relative to the output scale
    tol = 1e-4 if dtype == "float32" else 0.03 * np.abs(want).max()
    assert np.abs(y - want).max() <= tol
