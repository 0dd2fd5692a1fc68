"""MLX affine quantization format, in numpy: group parameters, rounding, bit packing.

MLX's ``affine`` mode stores a matrix ``W [out, in]`` as

* ``weight``  uint32 ``[out, in * bits / 32]`` - the integers ``q in [0, 2**bits - 1]``
  packed little-endian as one continuous bit stream per row (value ``j`` of a row
  occupies bits ``j*bits .. j*bits+bits-1`` of the stream; 3-bit values straddle
  word boundaries),
* ``scales``, ``biases`` ``[out, in / group_size]`` in the model dtype,

and dequantizes ``w = scale * q + bias`` per group of ``group_size`` consecutive input
columns. Any (scale, bias) pair is valid, so the quantizer is free to choose them
(clipping search); this module only has to get the *grid* and the *packing* exactly
right. ``tests/unit/test_quant_packing.py`` checks the packing bit-exactly against
``mx.quantize`` and the dequantization against ``mx.dequantize``.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (3, 4, 8)  # what a user may ask for
PACKABLE_BITS = (3, 4, 5, 6, 8)  # also used for mixed-precision overrides
SUPPORTED_GROUP_SIZES = (32, 64, 128)

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to what ``dtype`` can store, returned as float32.

    Scales and biases are stored in the artifact dtype; the integer grid must be
    computed with the *stored* values, or dequantization would not reproduce the
    weights the quantizer optimised.
    """
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        # round-to-nearest-even on the upper 16 bits
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.astype(np.uint32).view(np.float32)
    raise ValueError(f"unsupported dtype {dtype!r}")


def minmax_params(wg: np.ndarray, bits: int, ratio: float | np.ndarray = 1.0):
    """Scale/bias from the (optionally shrunk) range of each group.

    ``wg`` is ``[..., group_size]``; ``ratio`` (scalar or broadcastable to
    ``wg.shape[:-1]``) shrinks the range towards zero (clipping). Returns
    float32 ``scale, bias`` of shape ``wg.shape[:-1]``.
    """
    maxq = (1 << bits) - 1
    lo = wg.min(axis=-1)
    hi = wg.max(axis=-1)
    lo = lo * ratio
    hi = hi * ratio
    scale = (hi - lo) / maxq
    return scale.astype(np.float32), lo.astype(np.float32)


def quantize_grid(w: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> np.ndarray:
    """Integers ``q`` for ``w`` on the grid ``scale * q + bias`` (broadcasting)."""
    maxq = (1 << bits) - 1
    safe = np.where(scale == 0, 1.0, scale)
    q = np.rint((w - bias) / safe)
    q = np.where(scale == 0, 0.0, q)
    return np.clip(q, 0, maxq)


def dequant(q: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return (q * scale + bias).astype(np.float32)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer rows ``q [out, in]`` (values < 2**bits) into uint32 words."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits} not supported")
    rows, cols = q.shape
    if cols % 32:
        raise ValueError(f"row length {cols} is not a multiple of 32")
    q = q.astype(np.uint64).reshape(rows, cols // 32, 32)
    words = np.zeros((rows, cols // 32, bits), dtype=np.uint64)  # 32 values -> `bits` words
    for j in range(32):
        off = j * bits
        word, shift = divmod(off, 32)
        words[:, :, word] |= (q[:, :, j] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:
            words[:, :, word + 1] |= q[:, :, j] >> np.uint64(32 - shift)
    return words.reshape(rows, cols // 32 * bits).astype(np.uint32)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``uint32 [out, in*bits/32]`` -> uint8/uint16 ``[out, in]``."""
    rows, nw = packed.shape
    words = packed.astype(np.uint64).reshape(rows, nw // bits, bits)
    out = np.zeros((rows, nw // bits, 32), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for j in range(32):
        off = j * bits
        word, shift = divmod(off, 32)
        v = words[:, :, word] >> np.uint64(shift)
        if shift + bits > 32:
            v |= words[:, :, word + 1] << np.uint64(32 - shift)
        out[:, :, j] = v & mask
    return out.reshape(rows, nw // bits * 32).astype(np.uint16)


def bits_per_weight(bits: int, group_size: int, dtype: str) -> float:
    """Storage cost of one quantized weight including its share of scale + bias."""
    return bits + 2 * dtype_bits(dtype) / group_size


def dtype_bits(dtype: str) -> int:
    return 32 if dtype == "float32" else 16
