"""The quantized KV cache (``squish serve --kv-bits 8``): keys and values stored as
MLX's affine quantization (packed uint32 data, one scale and one bias per group of
``group_size`` values along the head dimension: 64, or 32 where the head size needs
it), attended to with MLX's own ``quantized_matmul`` (mlx_lm's
``quantized_scaled_dot_product_attention``, which every mlx_lm attention reaches
through ``scaled_dot_product_attention`` when the cache has ``bits``).

Why: the KV cache grows with every token of every sequence and is what a long
context costs. Per value it is 2 bytes in half precision (4 on MLX's CPU backend,
which computes in float32); 8 bits with a scale and a bias per 64 values is 1.0625
bytes in half precision (1.125 in float32). The quality cost is measured by
``benchmarks/kv_quality.py`` (docs/benchmarks.md, "Quantized KV cache"): 8 bits
keeps the build's quality gate, 4 bits does not, so the server offers 8 only; the
classes here take any bits MLX quantizes to, for that measurement.

mlx_lm 0.32's ``BatchGenerator`` takes one cache list per sequence and batches them
with the layer's ``merge``; mlx_lm ships a quantized cache for one sequence only
(``QuantizedKVCache``, no ``merge``) and a batched cache for plain arrays only
(``BatchKVCache``). ``QuantizedKV`` is mlx_lm's single-sequence cache plus
``merge``; ``BatchQuantizedKV`` is ``BatchKVCache``'s bookkeeping (left padding,
per-sequence offsets, filter / extend / extract) over the (data, scales, biases)
triples. Each of the three arrays is laid out ``[batch, kv_heads, tokens, X]``, so
every operation on the token axis is the plain cache's, applied three times.

Only plain ``KVCache`` layers are quantized; rotating windows and recurrent state
keep their own caches (``new_cache``). A model whose attention does not go through
mlx_lm's ``scaled_dot_product_attention`` cannot use it: ``check`` runs one token
through the model at start, so such a model fails at ``squish serve``, not on a
request. Engine thread only, like every cache.
"""

from __future__ import annotations

import logging

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, QuantizedKVCache, _BaseCache, dynamic_roll, make_prompt_cache

GROUPS = (64, 32)  # values per scale and bias: the first the head size is a multiple of


log = logging.getLogger(__name__)


def _tmap(fn, kv):
    return tuple(fn(x) for x in kv)


class QuantizedKV(QuantizedKVCache):
    """One sequence's quantized cache (mlx_lm's), which ``BatchGenerator`` can batch."""

    def size(self):
        return self.offset

    @classmethod
    def merge(cls, caches):
        return BatchQuantizedKV.merge(caches)


def new_cache(model, quant: tuple[int, int] | None) -> list:
    """A fresh per-layer cache list for one sequence: mlx_lm's own, with every plain
    ``KVCache`` layer replaced by a ``QuantizedKV`` when ``quant`` = (bits, group size)."""
    cache = make_prompt_cache(model)
    if not quant:
        return cache
    bits, group = quant
    return [QuantizedKV(group, bits) if type(c) is KVCache else c for c in cache]


def layer(keys, values, offset: int, quant: tuple[int, int] | None):
    """A one-sequence cache layer holding ``keys`` / ``values`` (arrays, or triples when
    ``quant`` = (bits, group size) is set) for ``offset`` tokens."""
    c = QuantizedKV(quant[1], quant[0]) if quant else KVCache()
    c.keys, c.values, c.offset = keys, values, offset
    return c


def check(model, bits: int) -> tuple[int, int]:
    """(bits, group size) for this model: one token through ``model`` with a quantized cache,
    in groups of 64 values, else 32 (a head size of 32 or 96). ``InputError`` naming the
    cause if it cannot attend over one (no plain KV layer, attention that bypasses
    mlx_lm's SDPA, attention sinks)."""
    from squish.errors import InputError

    if not any(type(c) is KVCache for c in make_prompt_cache(model)):
        raise InputError(f"--kv-bits {bits}: this model has no plain KV cache layer to quantize "
                         "(its layers keep rotating windows or recurrent state); serve it without --kv-bits")
    for group in GROUPS:
        try:
            mx.eval(model(mx.array([[0]]), cache=new_cache(model, (bits, group))))
            log.info("KV cache: %d-bit, a scale and a bias per %d values", bits, group)
            return bits, group
        except Exception as exc:  # noqa: BLE001 - any failure means: not this way
            problem = exc
    raise InputError(f"--kv-bits {bits}: this model's attention cannot use a quantized KV cache "
                     f"({type(problem).__name__}: {problem}); serve it without --kv-bits") from problem


class BatchQuantizedKV(_BaseCache):
    """``BatchKVCache`` (left-padded sequences of one batch) over quantized triples."""

    step = 256

    def __init__(self, left_padding: list[int], group_size: int = 64, bits: int = 8):
        self.keys = None  # (data, scales, biases), each [B, H, capacity, X]
        self.values = None
        self.group_size, self.bits = group_size, bits
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding = None

    def update_and_fetch(self, keys, values):
        qk = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        qv = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        prev, n = self._idx, keys.shape[2]
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            steps = (self.step + n - 1) // self.step * self.step

            def grown(old, new):
                fresh = mx.zeros((*new.shape[:2], steps, new.shape[3]), new.dtype)
                return fresh if old is None else mx.concatenate([old[..., :prev, :], fresh], axis=2)

            self.keys = tuple(map(grown, self.keys or (None,) * 3, qk))
            self.values = tuple(map(grown, self.values or (None,) * 3, qv))
        self.offset = self.offset + n
        self._idx += n
        for store, new in ((self.keys, qk), (self.values, qv)):
            for s, q in zip(store, new):
                s[..., prev:self._idx, :] = q
        return self.keys_and_values()

    def keys_and_values(self):
        cut = lambda x: x[..., : self._idx, :]  # noqa: E731
        return _tmap(cut, self.keys), _tmap(cut, self.values)

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty cache")
            left_padding = mx.array(left_padding)
            self.left_padding += left_padding
            self.offset = self.offset - left_padding
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self):
        if self._right_padding is None:
            return
        shift = self._right_padding[:, None]
        roll = lambda x: dynamic_roll(x, shift, axis=2)  # noqa: E731
        self.keys, self.values = _tmap(roll, self.keys), _tmap(roll, self.values)
        self.offset = self.offset - self._right_padding
        self.left_padding += self._right_padding
        self._right_padding = None

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    def filter(self, batch_indices):
        if self.keys is not None:
            pick = lambda x: x[batch_indices]  # noqa: E731
            self.keys, self.values = _tmap(pick, self.keys), _tmap(pick, self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())
        if shift > 0:
            if self.keys is not None:
                drop = lambda x: x[..., shift:, :]  # noqa: E731
                self.keys, self.values = _tmap(drop, self.keys), _tmap(drop, self.values)
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other):
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        like = self if self.keys is not None else other
        idx = max(self._idx, other._idx)
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def aligned(c):
            """``c``'s arrays right-justified at ``idx`` in ``size`` slots."""
            if c.keys is None:
                b = c.offset.shape[0]
                empty = lambda x: mx.zeros((b, x.shape[1], 0, x.shape[3]), x.dtype)  # noqa: E731
                k, v = _tmap(empty, like.keys), _tmap(empty, like.values)
            else:
                k, v = c.keys, c.values
            left = idx - c._idx
            right = size - k[0].shape[2] - left
            if right < 0:
                k, v = _tmap(lambda x: x[..., :right, :], k), _tmap(lambda x: x[..., :right, :], v)
                right = 0
            if left or right:
                pad = [(0, 0), (0, 0), (left, right), (0, 0)]
                k, v = _tmap(lambda x: mx.pad(x, pad), k), _tmap(lambda x: mx.pad(x, pad), v)
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, p1), (k2, v2, o2, p2) = aligned(self), aligned(other)
        self.keys = tuple(mx.concatenate([a, b]) for a, b in zip(k1, k2))
        self.values = tuple(mx.concatenate([a, b]) for a, b in zip(v1, v2))
        self.offset, self.left_padding = mx.concatenate([o1, o2]), mx.concatenate([p1, p2])
        self._idx = idx

    def extract(self, idx):
        """Sequence ``idx`` as a one-sequence ``QuantizedKV`` (its own contiguous arrays)."""
        pad = self.left_padding.tolist()[idx]
        cut = lambda x: mx.contiguous(x[idx:idx + 1, :, pad:self._idx])  # noqa: E731
        return layer(_tmap(cut, self.keys), _tmap(cut, self.values), self._idx - pad,
                     (self.bits, self.group_size))

    @classmethod
    def merge(cls, caches):
        """One-sequence ``QuantizedKV`` caches, left-padded into one batch."""
        first = caches[0]
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        out = cls(padding, first.group_size, first.bits)
        if longest == 0:
            return out
        like = next(c for c in caches if c.keys is not None)
        blank = lambda x: mx.zeros((len(caches), x.shape[1], longest, x.shape[3]), x.dtype)  # noqa: E731
        keys, values = _tmap(blank, like.keys), _tmap(blank, like.values)
        for i, (p, c) in enumerate(zip(padding, caches)):
            if c.keys is None:
                continue
            for store, src in ((keys, c.keys), (values, c.values)):
                for s, x in zip(store, src):
                    s[i:i + 1, :, p:p + c.offset] = x[..., : c.offset, :]
        out.keys, out.values = keys, values
        out.offset += longest
        out._idx = longest
        return out

    def size(self):
        return self._idx

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))
