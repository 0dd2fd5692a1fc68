"""Activation-aware per-input-channel scaling (after Lin et al., "AWQ", 2023).

For a linear ``y = x W^T`` whose input comes from an op that can absorb a
per-channel factor exactly (a norm's weight, or the output rows of an earlier
linear: ``squish.quant.folds`` finds which), ``y = (x / s) (W * s)^T``: the float
function is unchanged, but the weights of salient input channels (large
activations) are scaled up before rounding, so they lose less relative
precision. ``s = a^alpha / w^(1-alpha)`` (``a`` mean |activation|, ``w`` mean
relative |weight| per input channel) with ``alpha`` chosen on a grid to minimise
the *output* error of the quantized linears, measured exactly over all
calibration tokens through ``H = X^T X / n``.

With grouped-query attention o_proj's input channel ``h*hd + d`` reads v channel
``(h // rep)*hd + d``: one factor per *v* channel is shared by the ``rep`` query
heads (the fold's ``index``). Scaling whole output rows of a producer (and its
bias) does not change how they quantize (every group of a row is scaled alike),
so only the consumers' error counts in the search.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from squish.quant.gptq import hessian, pieces, rtn

ALPHA_GRID = tuple(np.round(np.arange(0.0, 0.95, 0.1), 3))  # 0, 0.1, ..., 0.9


def _quant_err(Wcat: np.ndarray, s_in: np.ndarray, H: np.ndarray, bits: int, gs: int, dtype: str) -> float:
    """Output error of rounding ``Wcat * s_in`` (then unscaling), through ``H``, summed in
    float64 over row pieces."""
    rows, cols = Wcat.shape
    total = 0.0
    for r0, r1 in pieces(rows, cols):
        W = Wcat[r0:r1]
        q, sc, bi = rtn(W * s_in[None, :], bits, gs, dtype)
        n = r1 - r0
        dq = (q.reshape(n, cols // gs, gs) * sc[..., None] + bi[..., None]).reshape(n, cols)
        del q
        d = (W - dq / s_in[None, :]).astype(np.float32, copy=False)
        del dq
        total += float(np.einsum("ri,ri->", d @ H, d, dtype=np.float64))
    return total


def _weight_absmean(Wcat: np.ndarray, gs: int) -> np.ndarray:
    """Mean over rows of |W| relative to each group's max |W|, per input column: float32
    over the whole matrix (its arithmetic sets the AWQ factors, so it is kept exactly as it
    was: a float64 or piecewise mean moved near-tie choices and changed SmolLM2's replies),
    with one temporary."""
    rows, cols = Wcat.shape
    wabs = np.abs(Wcat).reshape(rows, cols // gs, gs)
    wabs /= wabs.max(axis=-1, keepdims=True) + 1e-12
    return wabs.reshape(rows, cols).mean(axis=0)


def search_scale(x_absmean: np.ndarray, Ws: list[np.ndarray], H: np.ndarray, bits: int, gs: int,
                 dtype: str, index: np.ndarray | None = None, grid=ALPHA_GRID):
    """Best per-channel factor ``s`` (one per entry of ``x_absmean``) for the linears ``Ws``.

    ``index`` maps each input column of ``Ws`` to an entry of ``s`` (GQA v->o);
    ``H`` is over the input columns of ``Ws``. Returns ``(s, alpha, err_ratio)``
    where ``err_ratio`` = best error / error at ``s = 1``.
    """
    Wcat = (Ws[0] if len(Ws) == 1 else np.concatenate(Ws, axis=0)).astype(np.float32, copy=False)
    H = H.astype(np.float32, copy=False)
    wmean = _weight_absmean(Wcat, gs)
    if index is not None:  # aggregate columns that share one factor
        n = x_absmean.shape[0]
        wmean = np.bincount(index, weights=wmean, minlength=n) / np.maximum(np.bincount(index, minlength=n), 1)
    a = np.maximum(x_absmean.astype(np.float64), 1e-8)
    w = np.maximum(wmean.astype(np.float64), 1e-8)
    base = None
    best = (np.inf, None, 0.0)
    for alpha in grid:
        s = a ** alpha / w ** (1 - alpha) if alpha > 0 else np.ones_like(a)
        s = s / np.sqrt(s.max() * s.min())
        s = s.astype(np.float32)
        s_in = s if index is None else s[index]
        e = _quant_err(Wcat, s_in, H, bits, gs, dtype)
        if alpha == 0:
            base = e
        if e < best[0]:
            best = (e, s, float(alpha))
    return best[1], best[2], best[0] / max(base, 1e-30)


def absmean(x: np.ndarray) -> np.ndarray:
    return np.abs(x.reshape(-1, x.shape[-1])).mean(axis=0)


def apply_fold(fold, s: np.ndarray, block, lins: dict) -> Callable[[], None]:
    """Divide the producer's channels by ``s`` and multiply the consumers' input
    columns by it (``s [E, n]`` per expert for ``experts`` folds). Returns an undo."""
    import mlx.core as mx

    from squish.quant.folds import _scaled_norm_weights

    undo_lins = {p: (lins[p].w, lins[p].b) for p in (fold.producer, *fold.consumers) if p in lins}
    undo_mod = None
    s = s.astype(np.float32)
    if fold.style in ("norm", "norm1p"):
        mod = dict(block.named_modules())[fold.producer]
        undo_mod = (mod, {k: mod[k] for k in ("weight", "bias") if k in mod})
        mod.update(_scaled_norm_weights(mod, s, fold.style))
        for c in fold.consumers:
            lins[c].w = lins[c].w * s  # last axis: input columns (dense or experts)
    elif fold.style == "linear":
        P = lins[fold.producer]
        P.w = P.w / s[:, None]
        if P.b is not None:
            P.b = P.b / s
        s_in = s if fold.index is None else s[fold.index]
        for c in fold.consumers:
            lins[c].w = lins[c].w * s_in
    else:  # experts: s [E, n], identity map per expert
        P = lins[fold.producer]
        P.w = P.w / s[:, :, None]
        if P.b is not None:
            P.b = P.b / s
        for c in fold.consumers:
            lins[c].w = lins[c].w * s[:, None, :]

    def undo():
        for p, (w, b) in undo_lins.items():
            lins[p].w, lins[p].b = w, b
        if undo_mod is not None:
            undo_mod[0].update(undo_mod[1])

    mx.eval([])
    return undo


def search_fold(fold, lins: dict, caps: dict, qbits: dict, gs: int, dtype: str, min_tokens: int,
                max_rows: int = 1 << 15):
    """AWQ factors for ``fold`` from the float block's captured inputs ``caps``.

    ``caps[path]`` is a dense linear's input ``[n, in]`` or, for experts,
    ``(rows [n, in], expert [n])``. ``qbits[path]`` is the bits of each quantized
    linear (unquantized consumers take the factor but do not count). Returns
    ``(s, summary)``."""
    quant = [c for c in fold.consumers if c in qbits]
    if fold.style == "experts":
        return _search_experts(fold, lins, caps, qbits, gs, dtype, min_tokens)
    x = _consumer_input(fold, caps)
    bits = min(qbits[c] for c in quant) if quant else 8
    Ws = []
    for c in quant:
        w = lins[c].w
        if w.ndim == 3:  # experts reading the norm: a bounded sample of their rows
            w = w.reshape(-1, w.shape[-1])
            if w.shape[0] > max_rows:
                w = w[np.random.default_rng(0).choice(w.shape[0], max_rows, replace=False)]
        Ws.append(w)
    if not Ws:
        return None, {"alpha": None, "why": "no quantized consumer"}
    am = absmean(x)
    if fold.index is not None:
        n = int(fold.index.max()) + 1
        am = np.bincount(fold.index, weights=am, minlength=n) / np.maximum(np.bincount(fold.index, minlength=n), 1)
    s, alpha, ratio = search_scale(am, Ws, hessian(x), bits, gs, dtype, index=fold.index)
    return s, {"alpha": alpha, "err_ratio": round(ratio, 4)}


def _consumer_input(fold, caps: dict) -> np.ndarray:
    dense = [caps[c] for c in fold.consumers if c in caps and not isinstance(caps[c], tuple)]
    if dense:
        return dense[0]
    return caps[fold.consumers[0]][0]


def _search_experts(fold, lins, caps, qbits, gs, dtype, min_tokens):
    C = fold.consumers[0]
    rows, expert = caps[C]
    E, n_out, n_in = lins[C].w.shape
    s = np.ones((E, n_in), np.float32)
    alphas, skipped = [], 0
    for e in range(E):
        x = rows[expert == e]
        if C not in qbits or x.shape[0] < min_tokens:
            skipped += 1
            continue
        se, a, _ = search_scale(absmean(x), [lins[C].w[e]], hessian(x), qbits[C], gs, dtype)
        s[e] = se
        alphas.append(a)
    return s, {"alpha": round(float(np.mean(alphas)), 3) if alphas else None,
               "experts_unscaled": skipped}
