"""Scaling laws fitted to a sweep: L(x) = a * x^(-alpha) + c, x the model's non-embedding parameters
(or its tokens, or FLOPs), L the final loss of each setting (the mean over its seeds).

The fit is least squares on the loss itself, not on log L: seed noise adds to the loss (its
standard deviation does not grow with it), and the floor c makes log L - log c, the space where the
law is a line, depend on the unknown c. It starts from the straight line through (log x, log L),
which the floor bends only at the large end. The interval for alpha comes from the seeds: each of
`BOOTSTRAP` replicates draws every setting's seeds again with replacement, averages them and fits
again; the 2.5th and 97.5th percentiles of alpha are its 95% interval (settings with one seed stay
as they are: they carry no spread to resample).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from lab.errors import LabError

BOOTSTRAP = 1000
PARAMETERS = ("a", "alpha", "c")


class FitError(LabError):
    """A fit that cannot be made: too few points, or points the law cannot describe."""


def power_law(x: np.ndarray, log_a: float, alpha: float, c: float) -> np.ndarray:
    return np.exp(log_a - alpha * np.log(x)) + c


@dataclass(frozen=True)
class Fit:
    a: float
    alpha: float
    c: float
    alpha_low: float  # the 95% interval from the seeds (nan where no setting has two)
    alpha_high: float
    x: list[float]  # the points, in x order
    y: list[float]  # each setting's mean loss
    residuals: list[float]  # y - L(x)

    def predict(self, x) -> np.ndarray:
        return power_law(np.asarray(x, dtype=float), math.log(self.a), self.alpha, self.c)


def _fit_means(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(log a, alpha, c) by least squares on y, from the log-log line through the points."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    p0 = (intercept, max(-slope, 1e-3), 0.0)
    with warnings.catch_warnings():  # three points fit exactly: no covariance, which is not used
        warnings.simplefilter("ignore", OptimizeWarning)
        params, _ = curve_fit(power_law, x, y, p0=p0, maxfev=20000)
    return float(params[0]), float(params[1]), float(params[2])


def fit_power(xs: Sequence[float], seeds: Sequence[Sequence[float]], key: str = "compare.fit") -> Fit:
    """Fit L = a x^-alpha + c to settings at `xs` (positive), each with its seeds' final losses.

    Raises:
        FitError: fewer settings than the law's three parameters, an x that is not positive, or a
            least-squares search that does not converge.
    """
    points = sorted((float(x), [float(v) for v in vs if math.isfinite(v)]) for x, vs in zip(xs, seeds))
    points = [(x, vs) for x, vs in points if vs]
    if len(points) < len(PARAMETERS):
        raise FitError(f"{key}=power fits {len(PARAMETERS)} parameters (a, alpha, c) and the runs give "
                       f"{len(points)} setting(s) with the metric; sweep at least {len(PARAMETERS)} sizes")
    if any(x <= 0 for x, _ in points):
        raise FitError(f"{key}=power needs positive x values; got {[x for x, _ in points]}")
    x = np.array([p[0] for p in points])
    y = np.array([sum(vs) / len(vs) for _, vs in points])
    try:
        log_a, alpha, c = _fit_means(x, y)
        alphas = _bootstrap_alpha(x, [vs for _, vs in points])
    except (RuntimeError, ValueError) as e:  # scipy: no convergence within maxfev
        raise FitError(f"{key}=power: the least-squares fit did not converge ({e}); the losses may not fall with size") from None
    low, high = (np.percentile(alphas, [2.5, 97.5]) if len(alphas) else (math.nan, math.nan))
    residuals = y - power_law(x, log_a, alpha, c)
    return Fit(math.exp(log_a), alpha, c, float(low), float(high), x.tolist(), y.tolist(), residuals.tolist())


def _bootstrap_alpha(x: np.ndarray, seeds: list[list[float]]) -> list[float]:
    """alpha refitted on BOOTSTRAP resamplings of every setting's seeds (none where no setting has two)."""
    if all(len(vs) < 2 for vs in seeds):
        return []
    rng = np.random.default_rng(0)  # the interval is part of the result: the same runs give the same one
    alphas = []
    for _ in range(BOOTSTRAP):
        y = np.array([rng.choice(vs, len(vs)).mean() for vs in seeds])
        try:
            alphas.append(_fit_means(x, y)[1])
        except RuntimeError:
            continue  # a replicate the search cannot fit: left out
    return alphas
