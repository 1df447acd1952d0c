"""lab.scaling: a power law with a floor, fitted to settings over their seeds."""
from __future__ import annotations

import numpy as np
import pytest

from lab.scaling import FitError, fit_power


def test_a_power_law_is_recovered_within_its_interval():
    a, alpha, c = 40.0, 0.3, 1.8
    xs = [1e5, 3e5, 1e6, 3e6, 1e7, 3e7]
    rng = np.random.default_rng(7)
    seeds = [[a * x ** -alpha + c + rng.normal(0, 0.01) for _ in range(3)] for x in xs]
    fit = fit_power(xs, seeds)
    assert fit.alpha_low < alpha < fit.alpha_high and fit.alpha_high - fit.alpha_low < 0.1
    assert fit.alpha == pytest.approx(alpha, abs=0.05) and fit.c == pytest.approx(c, abs=0.05)
    assert fit.a == pytest.approx(a, rel=0.5)
    means = [sum(s) / 3 for s in seeds]
    assert fit.residuals == pytest.approx([m - p for m, p in zip(means, fit.predict(xs))], abs=1e-12)
    assert max(abs(r) for r in fit.residuals) < 0.03


def test_fewer_settings_than_parameters_is_one_line():
    with pytest.raises(FitError, match=r"compare.fit=power fits 3 parameters \(a, alpha, c\) and the runs give 2 "
                                       r"setting\(s\) with the metric; sweep at least 3 sizes"):
        fit_power([1e5, 1e6], [[3.0, 3.1], [2.5]])
