"""Drift statistics: rank correlation and ratios, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from sai_hf.drift import drift_summary, rank, spearman


def test_rank_averages_ties():
    assert rank([10.0, 30.0, 20.0, 30.0]) == [1.0, 3.5, 2.0, 3.5]


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = rank differences (0, 0, 1, -1): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)


def test_drift_summary_ratios():
    out = drift_summary([1.0, 2.0, 4.0], [2.0, 2.0, 1.0])
    assert out["max_ratio"] == pytest.approx(4.0)
    assert out["median_ratio"] == pytest.approx(2.0)
    assert -1.0 <= out["spearman"] <= 1.0
    assert math.isnan(drift_summary([0.0], [1.0])["max_ratio"])
