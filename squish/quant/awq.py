"""Activation-aware per-input-channel scaling (after Lin et al., "AWQ", 2023).

For a linear ``y = x W^T`` whose input comes from an op that can absorb a
per-channel factor exactly (an RMSNorm weight, or the output rows of another
linear), ``y = (x / s) (W * s)^T``: the float function is unchanged, but the
weights of salient input channels (large activations) are scaled up before
rounding, so they lose less relative precision. ``s = a^alpha / w^(1-alpha)``
(``a`` mean |activation|, ``w`` mean relative |weight| per input channel) with
``alpha`` chosen on a grid to minimise the *output* error of the quantized
linears, measured exactly over all calibration tokens through ``H = X^T X / n``.

Fold points in a llama-family block (``FOLDS``):
- ``input_layernorm``          -> q_proj, k_proj, v_proj
- ``post_attention_layernorm`` -> gate_proj, up_proj
- ``v_proj`` (output rows)     -> o_proj (input columns). With grouped-query
  attention o_proj's input channel ``h*hd + d`` reads v channel
  ``(h // rep)*hd + d``, so one factor per *v* channel is shared by the ``rep``
  query heads (``vo_index``); softmax weights are applied per head, so the fold
  stays exact.
- ``up_proj`` (output rows)    -> down_proj (SwiGLU is linear in ``up``).
Scaling whole output rows of v/up (and their bias) does not change how they
quantize (every group of a row is scaled alike), so only the consumer's error
counts in the search.
"""

from __future__ import annotations

import numpy as np

from squish.quant.gptq import rtn

ALPHA_GRID = tuple(np.round(np.arange(0.0, 0.95, 0.1), 3))  # 0, 0.1, ..., 0.9


def vo_index(n_heads: int, n_kv: int, head_dim: int) -> np.ndarray:
    """For each o_proj input channel, the v_proj output channel it reads."""
    rep = n_heads // n_kv
    c = np.arange(n_heads * head_dim)
    return (c // head_dim // rep) * head_dim + c % head_dim


def _quant_err(Wcat: np.ndarray, s_in: np.ndarray, H: np.ndarray, bits: int, gs: int, dtype: str) -> float:
    q, sc, bi = rtn(Wcat * s_in[None, :], bits, gs, dtype)
    rows, cols = Wcat.shape
    dq = (q.reshape(rows, cols // gs, gs) * sc[..., None] + bi[..., None]).reshape(rows, cols)
    d = (Wcat - dq / s_in[None, :]).astype(np.float32)
    return float(np.einsum("ri,ri->", d @ H, d, dtype=np.float64))


def search_scale(x_absmean: np.ndarray, Ws: list[np.ndarray], H: np.ndarray, bits: int, gs: int,
                 dtype: str, index: np.ndarray | None = None, grid=ALPHA_GRID):
    """Best per-channel factor ``s`` (one per entry of ``x_absmean``) for the linears ``Ws``.

    ``index`` maps each input column of ``Ws`` to an entry of ``s`` (GQA v->o);
    ``H`` is over the input columns of ``Ws``. Returns ``(s, alpha, err_ratio)``
    where ``err_ratio`` = best error / error at ``s = 1``.
    """
    Wcat = np.concatenate(Ws, axis=0).astype(np.float32)
    H = H.astype(np.float32, copy=False)
    cols = Wcat.shape[1]
    wabs = np.abs(Wcat).reshape(Wcat.shape[0], cols // gs, gs)
    wabs = wabs / (wabs.max(axis=-1, keepdims=True) + 1e-12)
    wmean = wabs.reshape(Wcat.shape[0], cols).mean(axis=0)
    if index is not None:  # aggregate columns that share one factor
        n = x_absmean.shape[0]
        wmean = np.bincount(index, weights=wmean, minlength=n) / np.bincount(index, minlength=n)
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


def fold_into_norm(W: dict, norm: str, linears: list[str], s: np.ndarray) -> None:
    W[norm + ".weight"] = (W[norm + ".weight"] / s).astype(np.float32)
    for lin in linears:
        W[lin + ".weight"] = (W[lin + ".weight"] * s[None, :]).astype(np.float32)


def fold_into_linear(W: dict, prev: str, lin: str, s: np.ndarray, index: np.ndarray | None = None) -> None:
    W[prev + ".weight"] = (W[prev + ".weight"] / s[:, None]).astype(np.float32)
    if prev + ".bias" in W:
        W[prev + ".bias"] = (W[prev + ".bias"] / s).astype(np.float32)
    s_in = s if index is None else s[index]
    W[lin + ".weight"] = (W[lin + ".weight"] * s_in[None, :]).astype(np.float32)


ALL_POINTS = ("attn_in", "v->o", "mlp_in", "up->down")


def scale_block(W: dict, cap: dict, arch, bits: int, gs: int, dtype: str, points=ALL_POINTS) -> dict:
    """Search and fold all four scale points of one block in place.

    ``cap`` holds the float block's linear inputs (``attn_in``, ``o_in``,
    ``mlp_in``, ``down_in``) for the unscaled weights. Returns a summary
    ``{point: {"alpha": .., "err_ratio": ..}}``.
    """
    from squish.quant.gptq import hessian

    summary = {}

    def absmean(x):
        return np.abs(x.reshape(-1, x.shape[-1])).mean(axis=0)

    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    if "attn_in" in points:
        _point_attn(W, cap, qkv, bits, gs, dtype, summary, absmean, hessian)
    if "v->o" in points:
        _point_vo(W, cap, arch, bits, gs, dtype, summary, absmean, hessian)
    if "mlp_in" in points:
        _point_mlp(W, cap, bits, gs, dtype, summary, absmean, hessian)
    if "up->down" in points:
        _point_down(W, cap, bits, gs, dtype, summary, absmean, hessian)
    return summary


def _point_attn(W, cap, qkv, bits, gs, dtype, summary, absmean, hessian):
    H = hessian(cap["attn_in"])
    s, a, r = search_scale(absmean(cap["attn_in"]), [W[k + ".weight"] for k in qkv], H, bits, gs, dtype)
    fold_into_norm(W, "input_layernorm", qkv, s)
    summary["attn_in"] = {"alpha": a, "err_ratio": round(r, 4)}


def _point_vo(W, cap, arch, bits, gs, dtype, summary, absmean, hessian):
    idx = vo_index(arch.n_heads, arch.n_kv, arch.head_dim)
    am = absmean(cap["o_in"])
    n = arch.n_kv * arch.head_dim
    am_v = np.bincount(idx, weights=am, minlength=n) / np.bincount(idx, minlength=n)
    s, a, r = search_scale(am_v, [W["self_attn.o_proj.weight"]], hessian(cap["o_in"]), bits, gs, dtype, index=idx)
    fold_into_linear(W, "self_attn.v_proj", "self_attn.o_proj", s, idx)
    summary["v->o"] = {"alpha": a, "err_ratio": round(r, 4)}


def _point_mlp(W, cap, bits, gs, dtype, summary, absmean, hessian):
    mlp = ["mlp.gate_proj", "mlp.up_proj"]
    s, a, r = search_scale(absmean(cap["mlp_in"]), [W[k + ".weight"] for k in mlp], hessian(cap["mlp_in"]), bits, gs, dtype)
    fold_into_norm(W, "post_attention_layernorm", mlp, s)
    summary["mlp_in"] = {"alpha": a, "err_ratio": round(r, 4)}


def _point_down(W, cap, bits, gs, dtype, summary, absmean, hessian):
    s, a, r = search_scale(absmean(cap["down_in"]), [W["mlp.down_proj.weight"]], hessian(cap["down_in"]), bits, gs, dtype)
    fold_into_linear(W, "mlp.up_proj", "mlp.down_proj", s)
    summary["up->down"] = {"alpha": a, "err_ratio": round(r, 4)}
