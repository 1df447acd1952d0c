"""Statistics over repeated runs: a group's mean, spread and 95% interval, and whether two groups differ.

Small models are noisy (the default run's validation loss moves by a few hundredths between seeds),
so `stage=compare` groups runs that differ only in their seeds and reports each group's numbers:

    values of one metric over a group's seeds -> mean, standard deviation (n - 1), n, 95% interval
    two groups' values -> Welch's t-test: the difference of means, its 95% interval, the p-value

The interval is Student's t (mean ± t(0.975, n - 1) · s / √n): with 3 to 5 seeds a normal
quantile (1.96) would understate it by a third or more. Two groups are compared by Welch's t-test,
which does not assume equal variances. A bootstrap of the difference was the alternative; with 3
seeds a group has only 10 distinct resamples, so its interval would be too coarse to mean anything,
while Welch's test is exact for normal values (a fair model of a metric's seed-to-seed noise) at
any n >= 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy import stats as scipy_stats

LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); nan for one value
    low: float  # the 95% interval of the mean; nan for one value
    high: float


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample standard deviation and the t-interval of the mean of the finite `values`."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = scipy_stats.t.ppf(0.5 + LEVEL / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    diff: float  # mean of a - mean of b
    low: float  # its 95% interval (Welch-Satterthwaite degrees of freedom)
    high: float
    t: float
    df: float
    p: float  # two-sided


def welch(a: Sequence[float], b: Sequence[float]) -> Difference:
    """Welch's t-test of mean(a) = mean(b); nan where either group has fewer than two values or no spread."""
    sa, sb = summarize(a), summarize(b)
    if sa.n < 2 or sb.n < 2:
        return Difference(sa.mean - sb.mean, math.nan, math.nan, math.nan, math.nan, math.nan)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    diff, se = sa.mean - sb.mean, math.sqrt(va + vb)
    if se == 0:
        return Difference(diff, diff, diff, math.nan, math.nan, math.nan)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    t = diff / se
    half = scipy_stats.t.ppf(0.5 + LEVEL / 2, df) * se
    return Difference(diff, diff - half, diff + half, t, df, 2 * scipy_stats.t.sf(abs(t), df))
