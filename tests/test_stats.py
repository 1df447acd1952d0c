"""lab.stats against hand-computed numbers and scipy's own tests."""
from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from lab.stats import summarize, welch


def test_a_groups_mean_spread_and_interval_equal_the_hand_computed_ones():
    s = summarize([2.0, 4.0, 9.0])
    assert (s.n, s.mean) == (3, 5.0)
    assert s.std == pytest.approx(math.sqrt(((2 - 5) ** 2 + (4 - 5) ** 2 + (9 - 5) ** 2) / 2), rel=1e-12)  # sqrt(13)
    t = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t(0.975) at 2 degrees of freedom: (2p - 1) / sqrt(2p(1 - p)), 4.3027
    half = t * math.sqrt(13) / math.sqrt(3)
    assert s.low == pytest.approx(5 - half, rel=1e-12) and s.high == pytest.approx(5 + half, rel=1e-12)
    one = summarize([1.5, float("nan")])
    assert one.n == 1 and one.mean == 1.5 and math.isnan(one.std) and math.isnan(one.low)


def test_welchs_test_equals_scipys():
    a, b = [3.10, 3.14, 3.05, 3.12], [3.20, 3.31, 3.18]
    d = welch(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert d.t == pytest.approx(ref.statistic, rel=1e-12) and d.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert d.diff == pytest.approx(sum(a) / 4 - sum(b) / 3, rel=1e-12)
    ci = ref.confidence_interval(0.95)
    assert d.low == pytest.approx(ci.low, rel=1e-10) and d.high == pytest.approx(ci.high, rel=1e-10)
    # sample variances over n by hand: a's mean 3.1025, squared deviations sum 0.004475; b's 3.23, 0.0098
    va, vb = 0.004475 / 3 / 4, 0.0098 / 2 / 3
    assert d.df == pytest.approx((va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2), rel=1e-9)


def test_welch_needs_two_values_a_side():
    d = welch([1.0], [2.0, 3.0])
    assert d.diff == -1.5 and math.isnan(d.p) and math.isnan(d.low)
