"""Group-wise affine quantization of one linear layer: clipping search, RTN and GPTQ.

All error measures use the layer's input second moment ``H = X^T X / n`` (``X`` the
calibration inputs of that linear), so ``err(dW) = tr(dW H dW^T)`` is exactly the
mean squared output error ``||X dW^T||^2 / n`` over the calibration tokens.

* ``fit_groups``: per (row, group) scale/bias, choosing a range shrink ratio
  ("clipping") that minimises the group's output error using the group's diagonal
  block of ``H`` (exact for the group in isolation; within-group correlations are
  kept, cross-group terms ignored).
* ``rtn``: fit every group on the original weights, round to nearest.
* ``gptq``: column-by-column rounding with second-order error compensation
  (Frantar et al., "GPTQ", 2022): the rounding error of column ``j`` is spread
  over the not-yet-quantized columns through the inverse Hessian; group
  parameters are fitted when the first column of a group is reached, on the
  *updated* weights.
"""

from __future__ import annotations

import numpy as np

from squish.quant.packing import quantize_grid, round_to_dtype

DEFAULT_CLIP_RATIOS = tuple(np.round(np.linspace(1.0, 0.75, 11), 4))


def hessian(x: np.ndarray) -> np.ndarray:
    """``X^T X / n`` (float32) for inputs ``x [..., in]``."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
    h = x.T @ x
    h /= np.float32(x.shape[0])
    return h


# rows per piece of the row-wise passes (clip search, error sums): ~4M float32 elements
# (16 MB) per temporary, so a wide matrix (gate+up: 17920 x 1536; down: 1536 x 8960) never
# holds several whole-matrix temporaries at once. Groups are per row, so the clip search is
# unchanged; error sums over pieces differ only in float64 rounding. The qwen2.5-1.5B build's
# peak RSS was these temporaries (benchmarks/quantize_memory.py).
PIECE_ELEMENTS = 1 << 22


def pieces(rows: int, cols: int):
    """``(r0, r1)`` row ranges of about ``PIECE_ELEMENTS`` elements each."""
    step = max(1, PIECE_ELEMENTS // max(cols, 1))
    return ((r0, min(r0 + step, rows)) for r0 in range(0, rows, step))


def fit_groups(w: np.ndarray, H: np.ndarray | None, bits: int, gs: int, dtype: str,
               ratios=DEFAULT_CLIP_RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, bias) per (row, group) of ``w [rows, cols]``.

    For each candidate shrink ratio the group's output error ``d Hgg d^T`` (``Hgg``
    the group's diagonal block of ``H``; identity when ``H`` is None) is computed
    and the best ratio kept per (row, group). Returns float32 ``[rows, cols/gs]``
    already rounded to ``dtype``.
    """
    rows, cols = w.shape
    ng = cols // gs
    hb = None
    if H is not None:
        hb = np.stack([H[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(ng)]).astype(np.float32)
    S = np.empty((rows, ng), np.float32)
    B = np.empty((rows, ng), np.float32)
    for r0, r1 in pieces(rows, cols):
        S[r0:r1], B[r0:r1] = _fit_rows(w[r0:r1], hb, bits, gs, dtype, ratios)
    return S, B


def _fit_rows(w, hb, bits, gs, dtype, ratios):
    rows, cols = w.shape
    wg = w.reshape(rows, cols // gs, gs).transpose(1, 0, 2)  # [ng, rows, gs]
    best = bs = bb = None
    lo0, hi0 = wg.min(axis=-1), wg.max(axis=-1)
    maxq = (1 << bits) - 1
    for r in ratios:
        s = round_to_dtype((hi0 - lo0) * (r / maxq), dtype)
        b = round_to_dtype(lo0 * r, dtype)
        d = wg - (quantize_grid(wg, s[..., None], b[..., None], bits) * s[..., None] + b[..., None])
        e = ((d @ hb) * d).sum(-1) if hb is not None else (d * d).sum(-1)
        del d
        if best is None:
            best, bs, bb = e, s, b
        else:
            m = e < best
            best = np.where(m, e, best)
            bs = np.where(m, s, bs)
            bb = np.where(m, b, bb)
    return bs.T, bb.T


def rtn(w: np.ndarray, bits: int, gs: int, dtype: str, H: np.ndarray | None = None,
        clip: bool = False):
    """Round-to-nearest with min/max (or clip-searched when ``clip``) group ranges.

    Returns ``q [rows, cols]`` (uint8), ``scales, biases [rows, cols/gs]`` float32.
    """
    rows, cols = w.shape
    s, b = fit_groups(w, H, bits, gs, dtype, DEFAULT_CLIP_RATIOS if clip else (1.0,))
    wg = w.reshape(rows, cols // gs, gs)
    q = quantize_grid(wg, s[..., None], b[..., None], bits)
    return q.reshape(rows, cols).astype(np.uint8), s, b


def dequantize(q: np.ndarray, s: np.ndarray, b: np.ndarray, gs: int) -> np.ndarray:
    rows, cols = q.shape
    qg = q.reshape(rows, cols // gs, gs).astype(np.float32)
    return (qg * s[..., None] + b[..., None]).reshape(rows, cols)


class HessianPrep:
    """``H`` plus the upper Cholesky factor of its damped inverse, shared by all
    linears that read the same input (q/k/v, gate/up)."""

    def __init__(self, H: np.ndarray, damp: float = 0.01):
        # float64 where it is cheap; float32 (as the GPTQ reference code) for wide
        # inputs such as a 8960-wide down_proj, where float64 copies cost GBs
        H = H.astype(np.float64 if H.shape[0] <= 4096 else np.float32, copy=False)
        self.dead = np.diag(H) == 0
        if self.dead.any():
            H = H.copy()
            H[self.dead, self.dead] = 1.0
        self.H = H  # undamped: group blocks for the clip search
        bump = damp * np.mean(np.diag(H))
        try:
            self.U = _upper_inv_factor(H, bump)
        except np.linalg.LinAlgError:
            self.U = _upper_inv_factor(H, bump + 0.1 * np.mean(np.diag(H)))


def _upper_inv_factor(H: np.ndarray, bump: float) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (H + bump I)^-1``, float32, from one Cholesky: with J
    the reversal permutation and J Hd J = M M^T, U = J M^-1 J. Raises ``LinAlgError``
    if ``H + bump I`` is not positive definite.

    float64 ``H``: numpy. float32 ``H`` (wide layers): LAPACK's spotrf + strtri through
    scipy, in float32 and in place, returned as a reversed view of the factor - numpy's linalg computes float32 in float64 with
    copies, and its cholesky + inv of an 8960-wide down_proj Hessian peaked at ~4 GB
    (benchmarks/quantize_memory.py, qwen2.5-1.5B shape). MLX's CPU linalg would also
    work in float32 but measured 14x slower here (193 s vs 14 s at n = 8960)."""
    n = H.shape[0]
    if H.dtype == np.float64:
        Hd = H.copy()
        Hd[np.diag_indices(n)] += bump
        Minv = np.linalg.inv(np.linalg.cholesky(Hd[::-1, ::-1]))
        return np.ascontiguousarray(Minv[::-1, ::-1], dtype=np.float32)
    from scipy.linalg import lapack

    # J Hd J, symmetric, in Fortran order: the one working copy, factorised in place
    A = np.asfortranarray(H[::-1, ::-1], dtype=np.float32)
    A[np.diag_indices(n)] += np.float32(bump)
    M, info = lapack.spotrf(A, lower=1, overwrite_a=1, clean=1)
    del A
    if info != 0:
        raise np.linalg.LinAlgError(f"matrix is not positive definite (spotrf info {info})")
    Minv, info = lapack.strtri(M, lower=1, overwrite_c=1)
    del M
    if info != 0 or not np.isfinite(Minv).all():
        raise np.linalg.LinAlgError(f"singular Cholesky factor (strtri info {info})")
    # a reversed view, not a contiguous copy: GPTQ reads it in column blocks (numpy copies
    # those small slices for its products), and a whole copy would hold the matrix a third
    # time beside H and the factor (+321 MB at n = 8960, the build's peak)
    return Minv[::-1, ::-1]


def gptq(w: np.ndarray, prep: HessianPrep, bits: int, gs: int, dtype: str, clip: bool = True,
         block: int = 128, static_groups: bool = True):
    """GPTQ with group-wise affine parameters (no activation reordering).

    ``static_groups``: fit every group's range once on the original weights
    (vectorised) instead of on the error-updated weights when the group is
    reached (slower, see benchmarks). Returns like :func:`rtn`.
    """
    rows, cols = w.shape
    W = w.astype(np.float32).copy()
    W[:, prep.dead] = 0.0
    U = prep.U
    ratios = DEFAULT_CLIP_RATIOS if clip else (1.0,)
    ng = cols // gs
    if static_groups:
        S, B = fit_groups(W, prep.H, bits, gs, dtype, ratios)
    else:
        S = np.empty((rows, ng), np.float32)
        B = np.empty((rows, ng), np.float32)
    Q = np.empty((rows, cols), np.uint8)
    block = max(gs, block - block % gs)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].copy()
        E1 = np.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            g = c // gs
            if not static_groups and c % gs == 0:
                s, b = fit_groups(W1[:, i:i + gs], prep.H[c:c + gs, c:c + gs], bits, gs, dtype, ratios)
                S[:, g], B[:, g] = s[:, 0], b[:, 0]
            s, b = S[:, g], B[:, g]
            col = W1[:, i]
            q = quantize_grid(col, s, b, bits)
            Q[:, c] = q
            err = (col - (q * s + b)) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q, S, B


def output_error(w: np.ndarray, wq: np.ndarray, H: np.ndarray) -> tuple[float, float]:
    """(absolute, relative) mean squared output error of replacing ``w`` by ``wq``."""
    H = H.astype(np.float32, copy=False)
    e = ref = 0.0
    for r0, r1 in pieces(*w.shape):
        wp = w[r0:r1].astype(np.float32, copy=False)
        d = wp - wq[r0:r1].astype(np.float32, copy=False)
        e += float(np.einsum("ri,ri->", d @ H, d, dtype=np.float64))
        ref += float(np.einsum("ri,ri->", wp @ H, wp, dtype=np.float64))
    return e, e / max(ref, 1e-30)
