"""Small statistics helpers (no SciPy): Student-t quantiles and mean confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["mean_ci", "t_quantile"]


def _t_cdf(x: float, df: int) -> float:
    """CDF of Student's t at ``x >= 0`` by integrating the density (trapezoid rule)."""
    grid = np.linspace(0.0, x, 4001)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(logc - (df + 1) / 2 * np.log1p(grid**2 / df))
    return 0.5 + float(np.sum((pdf[1:] + pdf[:-1]) * 0.5 * np.diff(grid)))


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile (0.5 < q < 1) of Student's t with ``df`` degrees of freedom."""
    if not 0.5 < q < 1 or df < 1:
        raise ValueError("need 0.5 < q < 1 and df >= 1")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if _t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], confidence: float) -> tuple[float, float, float]:
    """(mean, low, high): a two-sided Student-t interval; a single value gives a zero-width one."""
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, mean, mean
    half = t_quantile(0.5 + confidence / 2, int(arr.size - 1)) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return mean, mean - half, mean + half
