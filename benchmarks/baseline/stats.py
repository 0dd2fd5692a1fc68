"""Summary statistics and the paired Squish-vs-mlx_lm comparison.

Pure functions (no I/O). Samples are paired by position: sample ``i`` of
Squish and sample ``i`` of mlx_lm were taken back to back (A B A B ...), so
machine drift hits both members of a pair.
"""

from __future__ import annotations

import math

from benchmarks.common import percentiles

ALPHA = 0.05


def summarize(xs: list[float]) -> dict:
    """n, p50, p95, p99, mean, stdev, min, max of ``xs`` (NaNs dropped)."""
    clean = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    out = percentiles(clean)
    out["min"] = min(clean) if clean else float("nan")
    out["max"] = max(clean) if clean else float("nan")
    return out


def min_pairs_for_significance(alpha: float = ALPHA) -> int:
    """Smallest n at which an exact two-sided Wilcoxon test can reach p < alpha.

    With n pairs all on one side the exact two-sided p is 2 / 2**n: n=5 gives
    0.0625, so at least 6 pairs are needed for p < 0.05.
    """
    n = 1
    while 2.0 / 2**n >= alpha:
        n += 1
    return n


def wilcoxon_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value for paired samples, or None when
    it is undefined (fewer than 2 non-zero differences)."""
    pairs = [(x, y) for x, y in zip(a, b) if _finite(x) and _finite(y)]
    diffs = [x - y for x, y in pairs]
    if sum(1 for d in diffs if d != 0) < 2:
        return None
    from scipy.stats import wilcoxon

    res = wilcoxon([x for x, _ in pairs], [y for _, y in pairs], zero_method="wilcox",
                   alternative="two-sided")
    p = float(res.pvalue)
    return None if math.isnan(p) else p


def compare(squish: list[float], mlx_lm: list[float], *, higher_is_better: bool) -> dict:
    """Paired comparison of one metric.

    ``ratio`` is median(Squish) / median(mlx_lm) over the paired samples;
    ``p`` the Wilcoxon signed-rank p-value; ``significant`` is p < 0.05;
    ``verdict`` one of "better", "worse", "not significant", "n too small",
    "not measured".
    """
    n = min(len(squish), len(mlx_lm))
    a, b = list(squish[:n]), list(mlx_lm[:n])
    sa, sb = summarize(a), summarize(b)
    out = {"n_pairs": n, "squish": sa, "mlx_lm": sb, "ratio": None, "p": None,
           "significant": False, "higher_is_better": higher_is_better}
    if n == 0 or not _finite(sa["p50"]) or not _finite(sb["p50"]):
        out["verdict"] = "not measured"
        return out
    out["ratio"] = sa["p50"] / sb["p50"] if sb["p50"] else None
    out["p"] = wilcoxon_p(a, b)
    out["significant"] = out["p"] is not None and out["p"] < ALPHA
    if n < min_pairs_for_significance():
        out["verdict"] = "n too small"
    elif not out["significant"]:
        out["verdict"] = "not significant"
    else:
        squish_higher = sa["p50"] > sb["p50"]
        out["verdict"] = "better" if squish_higher == higher_is_better else "worse"
    return out


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def fmt_comparison(c: dict) -> str:
    """'0.93× (p=0.031)' or '1.02× (p=0.44, not significant)'."""
    if c.get("ratio") is None:
        return "not measured"
    text = f"{c['ratio']:.2f}× (p={fmt_p(c['p'])}"
    if c["verdict"] in ("not significant", "n too small"):
        text += f", {c['verdict']}"
    return text + ")"


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
