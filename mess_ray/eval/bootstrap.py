"""Cluster bootstrap over pieces: confidence intervals that count piece-to-piece variance.

Queries of one piece are not independent (the same music, often the same performers), so a
figure's interval resamples *pieces* with replacement and takes every query of a drawn piece
with it. The figure is the mean over queries (each query weighs the same; a piece drawn twice
counts twice). For two systems scored on the same queries the paired difference is bootstrapped
the same way (one draw of pieces for both), which is what decides "wins / ties / losses".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    value: float  # the figure on the data as it is
    low: float
    high: float
    clusters: int  # pieces (or pianists) with at least one finite value
    queries: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _cluster_sums(values: np.ndarray, clusters) -> tuple[np.ndarray, np.ndarray, int]:
    values = np.asarray(values, dtype=np.float64)
    clusters = np.asarray(clusters, dtype=object)
    if values.ndim != 1 or clusters.shape != values.shape:
        raise ValueError("values and clusters must be 1-D and of equal length")
    keep = np.isfinite(values)
    values, clusters = values[keep], clusters[keep]
    names, inverse = np.unique(clusters.astype(str), return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names)).astype(np.float64)
    return sums, counts, int(keep.sum())


def cluster_bootstrap(
    values, clusters, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Mean of ``values`` (NaN ignored) with a percentile interval from resampling ``clusters``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    sums, counts, n = _cluster_sums(values, clusters)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, 0)
    value = float(sums.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(sums), size=(n_boot, len(sums)))
    boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return Interval(value, float(low), float(high), len(sums), n)


def paired_difference(
    values_a, values_b, clusters, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Mean of ``a - b`` over the queries both scored, resampling clusters for both at once."""
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired values must have the same shape")
    return cluster_bootstrap(a - b, clusters, n_boot=n_boot, seed=seed, level=level)


def verdict(difference: Interval) -> str:
    """``wins`` / ``loses`` when the paired interval excludes 0, else ``ties``."""
    if not math.isfinite(difference.value):
        return "n/a"
    if difference.low > 0:
        return "wins"
    if difference.high < 0:
        return "loses"
    return "ties"
