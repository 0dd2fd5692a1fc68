"""Keep a GGUF file's own quantized codes: ``squish quantize FILE.gguf --keep-gguf-codes``.

Most GGUF types store a weight as ``scale * q + bias`` per 32 consecutive values with
integer ``q``, which is exactly MLX's affine format at group size 32:

======  ====  ===========================  ==================================
type    bits  MLX scale                    MLX bias
======  ====  ===========================  ==================================
Q4_0    4     d                            -8 d
Q4_1    4     d                            m
Q5_0    5     d                            -16 d
Q5_1    5     d                            m
Q8_0    8     d                            -128 d (q shifted by +128)
Q4_K    4     d * sc[j] (per 32)           -dmin * m[j]
Q5_K    5     d * sc[j] (per 32)           -dmin * m[j]
======  ====  ===========================  ==================================

Such a tensor is carried over as it is: no rounding, no calibration, and the artifact
computes exactly what llama.cpp computes from the file (with float32 scales; float16 or
bfloat16 scales round ``d * sc``). Every other weight type either has 16-value
sub-blocks (Q2_K, Q3_K, Q6_K), which no MLX group size holds, or a non-affine grid (IQ
types) or is float: those weights are rounded to nearest at 8 bits, group 32, from the
file's dequantized values (recorded per tensor in the recipe).

The integers come from the ``gguf`` package's own dequantizer run on a copy of the
blocks whose scale is 1 and whose offset is 0, so no bit layout is unpacked here; the
block scales are read from the block headers (``gguf.quants.Q4_K.get_scale_min`` for
the K-quants' 6-bit sub-block scales). Each kept tensor is then checked to dequantize
to exactly the library's own values of the original blocks.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import mlx.core as mx
import numpy as np

from squish.errors import InputError, SystemFailure
from squish.quant import graph as g
from squish.quant.gguf_file import CHUNK_BYTES, TensorInfo
from squish.quant.packing import bits_per_weight, pack

GROUP = 32
FALLBACK_BITS = 8
_ONE = np.array([1.0], np.float16).view(np.uint8)  # the float16 1.0, as two bytes

# type -> (bits, byte offset of d, byte offset of the offset term or None, q shift, K-quant)
# q shift: the library returns q - shift for the unit-scale blocks of a symmetric type.
_EXACT = {
    "Q4_0": (4, 0, None, 8, False),
    "Q4_1": (4, 0, 2, 0, False),
    "Q5_0": (5, 0, None, 16, False),
    "Q5_1": (5, 0, 2, 0, False),
    "Q8_0": (8, 0, None, 128, False),
    "Q4_K": (4, 0, 2, 0, True),
    "Q5_K": (5, 0, 2, 0, True),
}


def kept_bits(type_name: str) -> int | None:
    """Bits of MLX's affine g32 format that hold ``type_name`` exactly, else None."""
    spec = _EXACT.get(type_name)
    return spec[0] if spec else None


def read_codes(path, info: TensorInfo, order: np.ndarray | None = None):
    """``(q uint8 [rows, cols], scales, biases float32 [rows, cols/32], bits)`` of a tensor
    of an exact type (:func:`kept_bits`), rows reordered by ``order`` if given.

    Raises :class:`SystemFailure` if the codes do not reproduce the library's own
    dequantization exactly (a ``gguf`` package whose layout changed)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import Q4_K, dequantize

    bits, d_at, m_at, shift, k_quant = _EXACT[info.type_name]
    qtype = GGMLQuantizationType[info.type_name]
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    cols = info.shape[-1]
    rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    q = np.empty((rows, cols), np.uint8)
    s = np.empty((rows, cols // GROUP), np.float32)
    b = np.empty_like(s)
    mapped = np.memmap(path, np.uint8, "r", offset=info.offset, shape=(info.nbytes,))
    data = np.asarray(mapped).reshape(rows, info.nbytes // rows)
    step = max(1, CHUNK_BYTES // (4 * cols))
    for r in range(0, rows, step):
        raw = data[r:r + step]
        n = raw.shape[0]
        blocks = raw.reshape(n, cols // block, block_bytes)
        unit = blocks.copy()
        unit[..., d_at:d_at + 2] = _ONE
        d = _half(blocks, d_at)
        if m_at is not None:
            unit[..., m_at:m_at + 2] = 0
            m = _half(blocks, m_at)
        vals = dequantize(unit.reshape(n, -1), qtype).reshape(n, cols // block, block // GROUP, GROUP)
        if k_quant:
            sc, mn = (x.astype(np.float32) for x in Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12)))
            sc, mn = sc.reshape(n, -1, 8), mn.reshape(n, -1, 8)
            scale, bias = d * sc, -(m * mn)
            safe = np.where(sc == 0, 1.0, sc)[..., None]
            qi = np.where(sc[..., None] == 0, 0.0, np.rint(vals / safe))
        else:
            scale = d
            bias = m if m_at is not None else -shift * d
            qi = vals + shift
        q[r:r + n] = qi.reshape(n, cols).astype(np.uint8)
        s[r:r + n] = np.broadcast_to(scale, (n, cols // block, block // GROUP)).reshape(n, -1)
        b[r:r + n] = np.broadcast_to(bias, (n, cols // block, block // GROUP)).reshape(n, -1)
        mine = (q[r:r + n].reshape(n, -1, GROUP) * s[r:r + n, :, None] + b[r:r + n, :, None])
        if not np.isfinite(mine).all():
            raise InputError(f"{path}: tensor '{info.name}' contains NaN or Inf values")
        if not np.array_equal(mine.reshape(n, cols), dequantize(raw, qtype).reshape(n, cols)):
            raise SystemFailure(f"{path}: tensor '{info.name}' ({info.type_name}): the kept codes do "
                                "not reproduce the gguf package's dequantization; please report this")
    del data, mapped
    if order is not None:
        q, s, b = q[order], s[order], b[order]
    return q, s, b, bits


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte ``at`` of every block, as float32 ``[rows, blocks, 1]``."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16).astype(np.float32)


def keep_codes(ref, dtype: str, emit: Callable[[str, mx.array], None],
               progress: Callable[..., None] | None = None):
    """Write ``ref`` (a GGUF reference) with its codes kept; returns a
    :class:`~squish.quant.quantize.QuantOutcome` whose ``recipe`` lists what was kept and
    what was rounded (and why)."""
    from mlx.utils import tree_flatten

    from squish.quant.gguf import GGUFTensors
    from squish.quant.gptq import rtn
    from squish.quant.quantize import UNIFORM, QuantSpec, decide, emit_cast

    t0 = time.perf_counter()
    T = ref.tensors()
    if not isinstance(T, GGUFTensors):
        raise InputError(f"{ref.name}: --keep-gguf-codes needs a GGUF source "
                         f"(this one is {ref.source.get('kind')})")
    model = g.build_model(ref.config)
    if hasattr(model, "sanitize"):
        # As mlx_lm.load does (e.g. gemma3_text ties its head to the embedding when the
        # weights have none), on unevaluated stand-ins: only the names are used here.
        have = set(model.sanitize({k: mx.zeros(T.shape(k)) for k in T}))
    else:
        have = set(T)
    params = dict(tree_flatten(model.parameters()))
    missing = sorted(set(params) - (have & set(T)))  # a name sanitize() makes is not in the file
    if missing:
        raise InputError(f"{ref.name}: the GGUF lacks {len(missing)} tensor(s) that mlx_lm's "
                         f"{ref.config.get('model_type')!r} model needs, e.g. {missing[:3]}")
    modules = dict(model.named_modules())
    layers: dict[str, tuple[int, int]] = {}  # path -> (weights, bits)
    kept: Counter = Counter()
    rounded: dict[str, dict] = {}

    at_g32 = QuantSpec(bits=FALLBACK_BITS, group_size=GROUP, dtype=dtype)  # where mlx_lm quantizes at g32
    names = sorted(params)
    for i, k in enumerate(names):
        path, _, leaf = k.rpartition(".")
        shape = T.shape(k)
        module = modules.get(path)
        if leaf == "weight" and module is not None and decide(model, path, module, at_g32, UNIFORM, False):
            gpath, info, order = T.raw(k)
            if kept_bits(info.type_name) is not None:
                q, s, b, bits = read_codes(gpath, info, order)
                kept[info.type_name] += 1
            else:
                w = g.to_np(T[k]).reshape(-1, shape[-1])
                bits = FALLBACK_BITS
                q, s, b = rtn(w, bits, GROUP, dtype)
                del w
                rounded[path] = {"type": info.type_name, "bits": bits, "why": _why(info.type_name)}
            lead = tuple(shape[:-1])
            emit_cast(emit, path + ".weight", pack(q, bits).reshape(*lead, -1), dtype)
            emit_cast(emit, path + ".scales", s.reshape(*lead, -1), dtype)
            emit_cast(emit, path + ".biases", b.reshape(*lead, -1), dtype)
            layers[path] = (q.size, bits)
            del q, s, b
        else:
            emit_cast(emit, k, T[k], dtype)
        mx.clear_cache()
        if progress:
            progress("quantize", i + 1, len(names), "tensor")
    return _outcome(ref, dtype, layers, kept, rounded, time.perf_counter() - t0)


def _why(type_name: str) -> str:
    if type_name in ("Q2_K", "Q3_K", "Q6_K"):
        return (f"{type_name} scales every 16 values, which no MLX group size holds: "
                f"round-to-nearest at {FALLBACK_BITS} bits, group {GROUP}, from the file's values")
    return (f"{type_name} is not MLX's affine format: round-to-nearest at {FALLBACK_BITS} bits, "
            f"group {GROUP}, from the file's values")


def _outcome(ref, dtype, layers, kept, rounded, seconds):
    from squish.quant.quantize import QuantOutcome

    weights = Counter()
    for n, bits in layers.values():
        weights[bits] += n
    main = max(weights, key=lambda k: weights[k]) if weights else 4
    qcfg: dict = {"group_size": GROUP, "bits": main, "mode": "affine"}
    for path, (_, bits) in layers.items():
        if bits != main:
            qcfg[path] = {"group_size": GROUP, "bits": bits, "mode": "affine"}
    total = sum(weights.values())
    bpw = sum(n * bits_per_weight(bits, GROUP, dtype) for bits, n in weights.items()) / max(total, 1)
    recipe = {
        "method": "gguf-codes",
        "bits": main,
        "group_size": GROUP,
        "dtype": dtype,
        "experimental": False,
        "architecture": ref.config.get("model_type"),
        "kept_gguf_types": dict(sorted(kept.items())),
        "rounded": rounded,
        "more_bits": {p: {"bits": c["bits"], "group_size": GROUP,
                          "why": rounded[p]["why"] if p in rounded else "kept the GGUF file's codes"}
                      for p, c in qcfg.items() if isinstance(c, dict)},
        "bits_per_weight": round(bpw, 4),
        "timings_s": {"total_s": round(seconds, 2)},
    }
    return QuantOutcome(quantization=qcfg, recipe=recipe)
