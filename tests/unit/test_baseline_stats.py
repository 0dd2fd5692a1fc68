"""Paired statistics of the baseline benchmark (benchmarks/baseline/stats.py)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

pytest.importorskip("scipy")

from benchmarks.baseline.stats import (  # noqa: E402
    compare, fmt_comparison, min_pairs_for_significance, summarize, wilcoxon_p)


def test_summarize_percentiles_and_spread():
    s = summarize([1.0, 2.0, 3.0, 4.0, float("nan"), 5.0])
    assert s["n"] == 5
    assert s["p50"] == 3.0
    assert s["p95"] == pytest.approx(4.8)
    assert s["p99"] == pytest.approx(4.96)
    assert s["stdev"] == pytest.approx(math.sqrt(2.5))
    assert (s["min"], s["max"]) == (1.0, 5.0)


def test_summarize_empty_is_nan_not_crash():
    s = summarize([])
    assert s["n"] == 0 and math.isnan(s["p50"]) and math.isnan(s["min"])


def test_six_pairs_needed_for_p_below_0_05():
    assert min_pairs_for_significance(0.05) == 6
    # five pairs all on one side: the exact two-sided p is 2/32
    assert wilcoxon_p([2, 3, 4, 5, 6], [1, 1, 1, 1, 1]) == pytest.approx(0.0625)


def test_compare_significantly_faster_decode_is_better():
    squish = [110, 112, 111, 115, 113, 114, 116, 112]
    mlx = [100, 101, 99, 102, 100, 103, 101, 100]
    c = compare(squish, mlx, higher_is_better=True)
    assert c["ratio"] == pytest.approx(112.5 / 100.5)
    assert c["p"] < 0.05 and c["significant"]
    assert c["verdict"] == "better"


def test_compare_significantly_higher_latency_is_worse():
    c = compare([0.2] * 3 + [0.21, 0.22, 0.23, 0.24], [0.1, 0.11, 0.12, 0.1, 0.1, 0.11, 0.1],
                higher_is_better=False)
    assert c["verdict"] == "worse" and c["ratio"] > 1


def test_compare_noise_is_not_significant():
    a = [1.0, 1.2, 0.9, 1.1, 1.0, 0.95, 1.05, 1.0]
    b = [1.1, 0.9, 1.0, 1.0, 1.05, 1.0, 0.95, 1.02]
    c = compare(a, b, higher_is_better=True)
    assert c["verdict"] == "not significant"
    assert "not significant" in fmt_comparison(c)


def test_compare_few_pairs_says_n_too_small():
    c = compare([2, 3, 4], [1, 1, 1], higher_is_better=True)
    assert c["verdict"] == "n too small"
    assert "n too small" in fmt_comparison(c)


def test_compare_pairs_by_position_and_truncates_to_shorter():
    c = compare([1, 2, 3, 4, 5, 6, 7], [1, 2, 3], higher_is_better=True)
    assert c["n_pairs"] == 3 and c["squish"]["n"] == 3


def test_compare_missing_side_is_not_measured():
    c = compare([1.0, 2.0], [], higher_is_better=True)
    assert c["verdict"] == "not measured" and c["ratio"] is None
    assert fmt_comparison(c) == "not measured"


def test_identical_samples_have_no_p_value():
    assert wilcoxon_p([1, 2, 3], [1, 2, 3]) is None
