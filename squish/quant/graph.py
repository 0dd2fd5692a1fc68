"""The model's own mlx_lm module graph, with its linear layers computed in numpy.

Every offline pass of a build (self-generated calibration text, activation
capture, AWQ fold discovery, GPTQ, the quality gate) runs the architecture's
mlx_lm classes, so any model_type mlx_lm can run is built the same way. Only the
matrix products of linear layers leave MLX: on MLX's CPU backend a float32 GEMM
runs at 1-2 GFLOP/s on this class of machine against 50-140 for numpy's BLAS
(``benchmarks/graph_speed.py``), and those products are nearly all of a pass's
work. The swap is generic: a module whose class is ``nn.Linear``,
``SwitchLinear`` or ``nn.Embedding`` (or their quantized forms) gets a subclass
whose ``__call__`` hands the input to an executor (:class:`Lin`, :class:`Vocab`)
holding float32 numpy weights; norms, RoPE, attention, routing and activations
stay the model's own MLX code. Executors also see every input, which is how a
pass captures activations or quantizes a layer just before it is used.

Blocks are ``model.layers``; a block's class is swapped too (``hook_blocks``) so a
pass can load a block's weights just before the model's own loop calls it and
drop them after: a whole-model pass then holds one block in float32.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from squish.errors import InputError

RESIDENT_BYTES = 1 << 30  # float32 block weights up to this stay loaded between passes
SMALL_ROWS = 512  # products with fewer rows run BLAS on one thread (``one_thread``)
_CTL: list = []


def one_thread():
    """Context manager: numpy's BLAS runs one thread inside it.

    A multi-threaded BLAS call waits for its helper threads; on a busy machine (2 cores
    shared by several processes) a waiting thread loses a scheduler slice, and a decode
    step's small products took ~100 ms each instead of ~1.5 ms (measured in self-generated
    calibration on SmolLM2 here). Large products (a capture pass's 4096 rows) keep the
    threads."""
    if not _CTL:
        from threadpoolctl import ThreadpoolController

        _CTL.append(ThreadpoolController())
    return _CTL[0].limit(limits=1, user_api="blas")


def model_classes(config: dict):
    """mlx_lm's (Model, ModelArgs) for ``config``; InputError naming the model_type if none."""
    import mlx_lm
    from mlx_lm.utils import _get_classes

    mt = config.get("model_type")
    try:
        return _get_classes(config)
    except (ValueError, KeyError, ImportError) as e:
        raise InputError(
            f"unsupported architecture: model_type {mt!r} is not one that mlx_lm {mlx_lm.__version__} "
            f"can run ({e}); Squish builds every architecture mlx_lm supports"
        ) from None


def build_model(config: dict):
    """An mlx_lm model for ``config`` whose parameters are unevaluated (never allocated
    unless something evaluates them)."""
    model_cls, args_cls = model_classes(config)
    mt = config.get("model_type")
    try:
        model = model_cls(args_cls.from_dict(config))
    except Exception as e:  # a config mlx_lm's class cannot build from
        raise InputError(f"config.json: mlx_lm cannot build model_type {mt!r} from it ({type(e).__name__}: {e})") from e
    if not hasattr(model, "layers") or len(model.layers) == 0:
        raise InputError(f"model_type {mt!r}: the mlx_lm model exposes no decoder blocks (`layers`)")
    return model


def to_np(x) -> np.ndarray:
    import mlx.core as mx

    return np.array(x if x.dtype == mx.float32 else x.astype(mx.float32))


def kind(module) -> str | None:
    """'linear', 'switch', 'embedding' or None: how a module's products are computed."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    if isinstance(module, (SwitchLinear, QuantizedSwitchLinear)):
        return "switch"
    if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        return "linear"
    if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
        return "embedding"
    return None


def dense_weight(module) -> tuple[np.ndarray, np.ndarray | None]:
    """Float32 (weight, bias) of a linear / switch module, dequantized if quantized."""
    import mlx.core as mx

    w = module["weight"]
    if "scales" in module:
        w = mx.dequantize(w, module["scales"], module.get("biases"), group_size=module.group_size,
                          bits=module.bits, mode=getattr(module, "mode", "affine"))
    b = module.get("bias")
    return to_np(w), (to_np(b) if b is not None else None)


def switch_matmul(x: np.ndarray, idx: np.ndarray, w: np.ndarray, b: np.ndarray | None,
                  on_expert: Callable | None = None) -> np.ndarray:
    """``mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx)`` (+ bias) in numpy.

    ``x [..., M, D]``, ``idx`` broadcastable with ``x.shape[:-2]``, ``w [E, O, D]``.
    ``on_expert(e, rows)`` sees each expert's input rows ``[n, D]`` first."""
    bshape = np.broadcast_shapes(x.shape[:-2], idx.shape)
    M, D = x.shape[-2:]
    xb = np.broadcast_to(x, bshape + (M, D)).reshape(-1, M, D)
    ib = np.broadcast_to(idx, bshape).reshape(-1)
    out = np.empty((xb.shape[0], M, w.shape[1]), np.float32)
    order = np.argsort(ib, kind="stable")
    bounds = np.searchsorted(ib[order], np.arange(w.shape[0] + 1))
    for e in range(w.shape[0]):
        sel = order[bounds[e]:bounds[e + 1]]
        if sel.size == 0:
            continue
        rows = xb[sel].reshape(-1, D)
        if on_expert is not None:
            on_expert(e, rows)
        y = rows @ w[e].T
        if b is not None:
            y += b[e]
        out[sel] = y.reshape(sel.size, M, -1)
    return out.reshape(bshape + (M, w.shape[1]))


class Lin:
    """A linear layer computed in numpy: ``w [out, in]`` (or ``[E, out, in]`` for experts).

    ``hook(lin, x, idx)``, when set, runs before the product with the float32
    input (and the expert indices); it may replace ``w`` (the quantize pass does)."""

    def __init__(self, path: str, module, switch: bool):
        self.path, self.module, self.switch = path, module, switch
        self.w: np.ndarray | None = None
        self.b: np.ndarray | None = None
        self.hook: Callable | None = None
        self.convert: Callable = to_np

    def __call__(self, x, indices=None):
        import mlx.core as mx

        if self.w is None:
            raise RuntimeError(f"{self.path}: weights not loaded for this pass")
        xn = self.convert(x)
        idx = None if indices is None else np.array(indices).astype(np.int64)
        if self.hook is not None:
            self.hook(self, xn, idx)
        x2 = xn.reshape(-1, xn.shape[-1])
        if x2.shape[0] < SMALL_ROWS:
            with one_thread():
                return mx.array(self._product(xn, x2, idx))
        return mx.array(self._product(xn, x2, idx))

    def _product(self, xn, x2, idx):
        if self.switch:
            return switch_matmul(xn, idx, self.w, self.b)
        y = x2 @ self.w.T
        if self.b is not None:
            y += self.b
        return y.reshape(*xn.shape[:-1], -1)


class NpCache:
    """``to_np`` that converts each mx input once: linears fed the same array (q/k/v,
    gate/up, an expert's gate/up) get the same numpy object, so a pass can share
    work keyed by ``id``. Holds its inputs until ``clear``."""

    def __init__(self):
        self._d: dict[int, tuple] = {}

    def __call__(self, x) -> np.ndarray:
        hit = self._d.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        xn = to_np(x)
        self._d[id(x)] = (x, xn)
        return xn

    def clear(self) -> None:
        self._d.clear()


def expert_rows(x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows an expert layer multiplies (``[n, D]``) and the expert of each (``[n]``),
    in the order :func:`switch_matmul` uses."""
    bshape = np.broadcast_shapes(x.shape[:-2], idx.shape)
    M, D = x.shape[-2:]
    rows = np.broadcast_to(x, bshape + (M, D)).reshape(-1, D)
    ex = np.repeat(np.broadcast_to(idx, bshape).reshape(-1), M)
    return rows, ex


class Vocab:
    """A [vocab, D] matrix (embedding, LM head) kept as stored and read in float32 by pieces.

    A 152k-token vocabulary at D=1536 is 890 MB in float32, five decoder layers'
    worth: only the stored array (bf16, float16, or MLX-quantized) is kept;
    ``lookup`` gathers rows, ``project`` computes ``x @ W.T`` ``CHUNK`` rows at a time."""

    CHUNK = 8192

    def __init__(self, weight, scales=None, biases=None, *, group_size=64, bits=4, mode="affine"):
        import mlx.core as mx

        # evaluated once, as stored: slicing a lazy array (a GGUF tensor's dequantization)
        # would recompute all of it for every chunk
        mx.eval([a for a in (weight, scales, biases) if a is not None])
        self.weight, self.scales, self.biases = weight, scales, biases
        self.dense: np.ndarray | None = None  # the whole matrix in float32, if ``keep_dense()``
        self.last_only = False  # ``linear`` forms the last position's logits only (generation)
        self._q = dict(group_size=group_size, bits=bits, mode=mode)
        dim = weight.shape[1] * 32 // bits if scales is not None else weight.shape[1]
        self.shape = (weight.shape[0], dim)

    @classmethod
    def of(cls, module) -> "Vocab":
        if "scales" in module:
            return cls(module["weight"], module["scales"], module.get("biases"), group_size=module.group_size,
                       bits=module.bits, mode=getattr(module, "mode", "affine"))
        return cls(module["weight"])

    def _f32(self, pick) -> np.ndarray:
        import mlx.core as mx

        w = pick(self.weight)
        if self.scales is not None:
            b = pick(self.biases) if self.biases is not None else None
            w = mx.dequantize(w, pick(self.scales), b, **self._q)
        return to_np(w)

    def keep_dense(self) -> None:
        """Convert once and keep the float32 matrix (a resident pass over a small model:
        generation reads the head every step)."""
        self.dense = self._f32(lambda a: a)

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self.dense is not None:
            return self.dense[start:stop]
        return self._f32(lambda a: a[start:stop])

    def __getitem__(self, ids) -> np.ndarray:
        import mlx.core as mx

        ids = np.asarray(ids)
        if self.dense is not None:
            return self.dense[ids]
        flat = mx.array(ids.reshape(-1).astype(np.int32))
        return self._f32(lambda a: mx.take(a, flat, axis=0)).reshape(*ids.shape, self.shape[1])

    def project(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((*x.shape[:-1], self.shape[0]), np.float32)
        x2 = x.reshape(-1, x.shape[-1])
        o2 = out.reshape(-1, self.shape[0])
        for a in range(0, self.shape[0], self.CHUNK):
            b = min(a + self.CHUNK, self.shape[0])
            w = self.rows(a, b)
            if x2.shape[0] < SMALL_ROWS:
                with one_thread():
                    o2[:, a:b] = x2 @ w.T
            else:
                o2[:, a:b] = x2 @ w.T
        return out

    # the module-facing calls (an nn.Embedding's __call__ / as_linear, an lm_head's __call__)
    def lookup(self, ids):
        import mlx.core as mx

        return mx.array(self[np.array(ids)])

    def linear(self, x):
        import mlx.core as mx

        if self.last_only and x.ndim >= 2 and x.shape[-2] > 1:
            # a generation loop reads the last position only: the others are lazy zeros, never
            # formed unless something evaluates them (a prefill call's output is dropped)
            last = mx.array(self.project(to_np(x[..., -1:, :])))
            head = mx.zeros((*x.shape[:-2], x.shape[-2] - 1, self.shape[0]), last.dtype)
            return mx.concatenate([head, last], axis=-2)
        return mx.array(self.project(to_np(x)))


_SWAPPED: dict = {}


def _swapped_class(cls, role: str):
    key = (cls, role)
    if key not in _SWAPPED:
        if role == "switch":
            ns = {"__call__": lambda self, x, indices, sorted_indices=False: self._sq(x, indices)}
        elif role == "embedding":
            ns = {"__call__": lambda self, x: self._sq.lookup(x), "as_linear": lambda self, x: self._sq.linear(x)}
        elif role == "head":
            ns = {"__call__": lambda self, x: self._sq.linear(x)}
        elif role == "tap":  # executor(input, output) -> output
            ns = {"__call__": lambda self, *a, **k: self._sq(a[0], cls.__call__(self, *a, **k))}
        elif role == "block":
            ns = {"__call__": lambda self, *a, **k: self._sq_block(self, cls.__call__, a, k)}
        else:
            ns = {"__call__": lambda self, x: self._sq(x)}
        _SWAPPED[key] = type(f"Squish{cls.__name__}", (cls,), ns)
    return _SWAPPED[key]


def attach(module, executor, role: str) -> None:
    """Route ``module``'s calls to ``executor`` (see the module docstring)."""
    if getattr(module, "_sq_base", None) is None:
        module._sq_base = type(module)
    module.__class__ = _swapped_class(module._sq_base, role)
    if role == "block":
        module._sq_block = executor
    else:
        module._sq = executor


def detach(module) -> None:
    base = getattr(module, "_sq_base", None)
    if base is not None:
        module.__class__ = base
        for a in ("_sq", "_sq_block", "_sq_base"):
            module.__dict__.pop(a, None)


def _np_mask(mask, B: int, Hk: int, rep: int, L: int, S: int):
    """An mlx_lm attention mask as an additive float32 array broadcastable to
    ``[B, Hk, rep, L, S]`` (None: no mask)."""
    if mask is None:
        return None
    if isinstance(mask, str):  # "causal": query i sits at position S - L + i
        keep = np.arange(S)[None, :] <= (S - L + np.arange(L))[:, None]
    else:
        m = np.array(mask)
        if m.ndim == 4:
            m = m.reshape(m.shape[0], Hk, rep, L, S) if m.shape[1] == Hk * rep and Hk * rep > 1 else m[:, :, None]
        if m.dtype != np.bool_:
            return m.astype(np.float32)
        keep = m
    return np.where(keep, np.float32(0), np.float32(-np.inf))


def numpy_sdpa(queries, keys, values, *, scale: float, mask=None, sinks=None, **_):
    """``mx.fast.scaled_dot_product_attention`` in numpy (float32): MLX's CPU fallback
    forms the scores with its slow GEMM (a SmolLM2 block's attention on 32 x 128
    calibration tokens: 5.6 s in MLX). Grouped-query heads, ``"causal"`` / boolean /
    additive masks and attention sinks as mlx_lm passes them."""
    with one_thread():  # many small products (one per batch row and kv head)
        return _numpy_sdpa(to_np(queries), to_np(keys), to_np(values), scale, mask, sinks)


def _numpy_sdpa(q, k, v, scale, mask, sinks):
    import mlx.core as mx

    B, Hq, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    rep = Hq // Hk
    q = q.reshape(B, Hk, rep * L, D) * np.float32(scale)
    s = np.matmul(q, np.ascontiguousarray(k.transpose(0, 1, 3, 2))).reshape(B, Hk, rep, L, S)
    add = _np_mask(mask, B, Hk, rep, L, S)
    if add is not None:
        s += add
    mx_ = s.max(-1, keepdims=True)
    if sinks is not None:
        sk = to_np(sinks).reshape(1, Hk, rep, 1, 1)
        mx_ = np.maximum(mx_, sk)
    mx_ = np.where(np.isfinite(mx_), mx_, 0)
    np.exp(s - mx_, out=s)
    den = s.sum(-1, keepdims=True)
    if sinks is not None:
        den += np.exp(sk - mx_)
    s /= np.maximum(den, np.float32(1e-30))
    out = np.matmul(s.reshape(B, Hk, rep * L, S), v)
    return mx.array(out.reshape(B, Hq, L, v.shape[-1]))


class _attention:
    """Context manager: ``mx.fast.scaled_dot_product_attention`` (what mlx_lm's attention
    calls) is ``fn`` while it is open."""

    def __init__(self, fn=None):
        self.fn = fn

    def __enter__(self):
        import mlx.core as mx

        self._prev = mx.fast.scaled_dot_product_attention
        mx.fast.scaled_dot_product_attention = self.fn or _MLX_SDPA[0]
        return self

    def __exit__(self, *exc):
        import mlx.core as mx

        mx.fast.scaled_dot_product_attention = self._prev


_MLX_SDPA: list = []


def numpy_attention() -> _attention:
    """mlx_lm's attention runs in :func:`numpy_sdpa` while open."""
    import mlx.core as mx

    if not _MLX_SDPA:
        _MLX_SDPA.append(mx.fast.scaled_dot_product_attention)
    return _attention(numpy_sdpa)


def mlx_attention() -> _attention:
    """MLX's own attention while open (inside a :func:`numpy_attention`)."""
    return _attention(None)


class Stop(Exception):
    """Raised by a block hook to end a forward pass early (the pass's result is attached)."""

    def __init__(self, value=None):
        super().__init__("forward stopped")
        self.value = value


class Graph:
    """An mlx_lm model, its decoder blocks and their linear layers.

    ``blocks[i]`` has parameter prefix ``prefixes[i]`` (``"model.layers.3."``) and
    linear layers ``linears[i]`` (relative path -> module, in module order)."""

    def __init__(self, model):
        self.model = model
        self.blocks = list(model.layers)
        names = {id(m): n for n, m in model.named_modules()}
        try:
            self.prefixes = [names[id(b)] + "." for b in self.blocks]
        except KeyError:
            raise InputError(f"model_type {getattr(model, 'model_type', '?')!r}: a decoder block is not a "
                             "submodule of the model") from None
        self.linears = [{n: m for n, m in b.named_modules() if kind(m) in ("linear", "switch")}
                        for b in self.blocks]

    def block_of(self, key: str) -> int | None:
        for i, p in enumerate(self.prefixes):
            if key.startswith(p):
                return i
        return None

    def top_modules(self) -> dict:
        """Modules with a product outside the blocks (embedding, LM head), by path."""
        inside = {id(m) for b in self.blocks for _, m in b.named_modules()}
        return {n: m for n, m in self.model.named_modules() if id(m) not in inside and kind(m)}

    def hook_blocks(self, on_block: Callable) -> None:
        """``on_block(i, block, call, args, kwargs)`` replaces each block's call."""
        for i, blk in enumerate(self.blocks):
            attach(blk, lambda b, call, a, k, i=i: on_block(i, b, call, a, k), "block")

    def unhook_blocks(self) -> None:
        for blk in self.blocks:
            detach(blk)

    def detach_all(self) -> None:
        for _, m in self.model.named_modules():
            detach(m)


def float32(pairs: list) -> list:
    """``(key, mx.array)`` pairs with floating arrays cast (lazily) to float32."""
    import mlx.core as mx

    return [(k, v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in pairs]
