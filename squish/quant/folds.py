"""Where a block can absorb AWQ's per-channel factors exactly, found by running it.

A factor ``s`` on the input channels of some linear layers (their weight columns
times ``s``) is exact when an earlier op can divide the same channels by ``s``:

- a norm whose output those layers read (``x * w`` or Gemma's ``x * (1 + w)``;
  LayerNorm's bias too): every linear reading the norm's output must take the
  factor, wherever the model routes it (MoE experts read gathered rows of it);
- a linear ``P`` whose output rows reach a later linear ``C``'s input columns
  linearly: v -> o through attention (one factor per v channel, shared by the
  query heads of a GQA group), up -> down through SwiGLU, an expert's up -> its
  down.

Nothing here knows an architecture's names. Candidates come from the block's
modules and shapes; each is tested on the block's real input:
- norm consumers: the linears whose input rows are exactly rows of the norm's
  output (gathers and reshapes copy values bit for bit);
- linear pairs: divide ``P``'s rows by distinct known factors and read, from the
  ratio of ``C``'s inputs before/after, which factor each column of ``C`` took
  (constant across tokens, or the pair is not linear);
- then the fold itself, with those factors, must leave the block's output
  unchanged (relative error below ``TOL``). Only verified folds are used; the
  structure found is cached per block signature (class + module shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOL = 1e-4  # relative max |Δ output| for a fold to count as exact
RATIO_TOL = 2e-5  # relative spread of C's input ratios for a linear pair


@dataclass
class Fold:
    producer: str  # relative path of the norm or linear that divides by s
    style: str  # "norm" (w, b / s), "norm1p" ((1 + w) / s - 1), "linear", "experts"
    consumers: tuple[str, ...]  # linears whose input columns take s
    index: np.ndarray | None = None  # consumer column -> producer channel (None: identity)


@dataclass
class BlockPlan:
    folds: list[Fold] = field(default_factory=list)
    unscaled: dict[str, str] = field(default_factory=dict)  # linear -> why no fold reaches it


def signature(block, lins: dict) -> tuple:
    from mlx.utils import tree_flatten

    shapes = tuple((k, tuple(v.shape)) for k, v in tree_flatten(block.parameters()))
    return (type(block).__name__, tuple(lins), shapes)


def norm_candidates(block, lins: dict) -> dict:
    """Leaf modules with a 1-D ``weight`` that are not linear layers: norms."""
    out = {}
    for name, m in block.named_modules():
        if name in lins or not name or m.children():
            continue
        w = m.get("weight") if hasattr(m, "get") else None
        if w is not None and getattr(w, "ndim", 0) == 1:
            out[name] = m
    return out


def _scaled_norm_weights(m, s: np.ndarray, style: str) -> dict:
    import mlx.core as mx

    w = np.array(m["weight"].astype(mx.float32))
    if style == "norm1p":
        new = {"weight": mx.array((1.0 + w) / s - 1.0)}
    else:
        new = {"weight": mx.array(w / s)}
        if "bias" in m:
            new["bias"] = mx.array(np.array(m["bias"].astype(mx.float32)) / s)
    return new


def norm_style(m, x, y, s: np.ndarray) -> str | None:
    """How a norm's output can be divided by ``s``: "norm", "norm1p" or None."""
    import mlx.core as mx

    old = {k: m[k] for k in ("weight", "bias") if k in m}
    yn = np.array(y.astype(mx.float32))
    try:
        for style in ("norm", "norm1p"):
            m.update(_scaled_norm_weights(m, s, style))
            y2 = np.array(m(x).astype(mx.float32)) * s
            m.update(old)
            if np.abs(y2 - yn).max() <= TOL * max(np.abs(yn).max(), 1e-6):
                return style
    finally:
        m.update(old)
    return None


def _rows_of(rows: np.ndarray, source: np.ndarray) -> bool:
    """Is every row of ``rows`` bit-for-bit a row of ``source``?"""
    src = np.ascontiguousarray(source.reshape(-1, source.shape[-1]))
    keys = {r.tobytes() for r in src}
    r = np.ascontiguousarray(rows.reshape(-1, rows.shape[-1]))
    return r.shape[-1] == src.shape[-1] and all(x.tobytes() in keys for x in r)


def probe_factors(n: int, seed: int) -> np.ndarray:
    """Distinct factors in [0.5, 2), spaced 1.5/n apart in a random order."""
    perm = np.random.default_rng(seed).permutation(n)
    return (0.5 + 1.5 * perm / n).astype(np.float32)


def column_map(x: np.ndarray, x2: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """For inputs ``x`` (unperturbed) and ``x2`` (producer rows divided by ``s``), the producer
    channel each column took, or None if some column is not a fixed multiple of one."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    x2 = x2.reshape(-1, x2.shape[-1]).astype(np.float64)
    if x.shape != x2.shape:
        return None
    big = np.abs(x) > 1e-3 * (np.abs(x).max(axis=0, keepdims=True) + 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(big, x / np.where(x2 == 0, np.nan, x2), np.nan)
    med = np.nanmedian(r, axis=0)
    if not np.isfinite(med).all():
        return None
    spread = np.nanmax(np.abs(r - med[None]), axis=0) / np.abs(med)
    if (spread > RATIO_TOL * 50).any():
        return None
    order = np.argsort(s)
    pos = np.clip(np.searchsorted(s[order], med), 1, len(s) - 1)
    left, right = order[pos - 1], order[pos]
    j = np.where(np.abs(s[left] - med) <= np.abs(s[right] - med), left, right)
    if (np.abs(s[j] - med) > 0.3 * 1.5 / len(s)).any():  # a third of the factors' spacing
        return None
    return j.astype(np.int64)


def _rows(cap) -> np.ndarray:
    return cap[0] if isinstance(cap, tuple) else cap


def _expert_ratio_ok(x, x2, s: np.ndarray) -> bool:
    """Experts P -> C: every row of C's input, divided elementwise by the factors of its
    expert, equals the unperturbed row (identity channel map within each expert)."""
    (r, e), (r2, e2) = x, x2
    if r.shape != r2.shape or r.shape[-1] != s.shape[-1] or not np.array_equal(e, e2):
        return False
    want = r / s[e]
    return np.abs(want - r2).max() <= TOL * max(np.abs(r2).max(), 1e-6)


def discover(block, lins: dict, run, seed: int = 0) -> BlockPlan:
    """Verified fold points of one block (see the module docstring).

    ``run()`` runs the block on its probe input with the current weights and
    returns a trace: ``out`` (the block's outputs, flattened, float32), ``x`` (each
    linear's first input: ``[n, in]``, or ``(rows, expert)`` for experts, in call
    order) and ``norms`` (name -> (input, output) of each norm candidate)."""
    from squish.quant.awq import apply_fold
    from squish.quant.graph import to_np

    base = run()
    ref = base.out
    scale = max(np.abs(ref).max(), 1e-6)
    plan = BlockPlan()
    taken: set[str] = set()

    def exact(fold, s) -> bool:
        undo = apply_fold(fold, s, block, lins)
        try:
            return np.abs(run().out - ref).max() <= TOL * scale
        finally:
            undo()

    for name, m in norm_candidates(block, lins).items():
        if name not in base.norms:
            continue
        nx, ny = base.norms[name]
        y = to_np(ny)
        cons = tuple(p for p in base.x if p not in taken and _rows_of(_rows(base.x[p]), y))
        if not cons:
            continue
        s = probe_factors(y.shape[-1], seed)
        style = norm_style(m, nx, ny, s)
        fold = Fold(name, style or "norm", cons)
        if style is not None and exact(fold, s):
            plan.folds.append(fold)
            taken.update(cons)
        else:
            for c in cons:
                plan.unscaled[c] = (f"its input is the output of {name}, which cannot absorb a per-channel "
                                    "factor exactly")
    order = list(base.x)
    for i, P in enumerate(order):
        pw = lins[P].w
        cands = [C for C in order[i + 1:] if C not in taken and lins[C].switch == lins[P].switch
                 and lins[C].w.shape[-1] % pw.shape[-2] == 0
                 and (not lins[P].switch or lins[C].w.shape[0] == pw.shape[0])]
        if not cands:
            continue
        s = probe_factors(int(np.prod(pw.shape[:-1])), seed + 1 + i).reshape(pw.shape[:-1])
        probe = Fold(P, "experts" if lins[P].switch else "linear", ())
        undo = apply_fold(probe, s, block, lins)
        try:
            after = run()
        finally:
            undo()
        for C in cands:
            if C not in after.x:
                continue
            if lins[P].switch:
                fold = Fold(P, "experts", (C,)) if _expert_ratio_ok(base.x[C], after.x[C], s) else None
            else:
                idx = column_map(base.x[C], after.x[C], s)
                ident = idx is not None and len(idx) == len(s) and np.array_equal(idx, np.arange(len(s)))
                fold = None if idx is None else Fold(P, "linear", (C,), None if ident else idx)
            if fold is not None and exact(fold, s):
                plan.folds.append(fold)
                taken.add(C)
    for p in order:
        if p not in taken:
            plan.unscaled.setdefault(p, "no exact fold point: its input is not a per-channel linear function "
                                        "of a norm or of an earlier linear in the block")
    return plan
