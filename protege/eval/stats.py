"""Bootstrap confidence intervals and a paired comparison, for claims with an interval.

Inputs are per-run (or per-example) scores as plain sequences of floats; every function is
deterministic given `seed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean. One value gives a zero-width interval."""
    data = _as_array(values, "values")
    if len(data) == 1:
        return Interval(float(data[0]), float(data[0]), float(data[0]))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(data.mean()), float(low), float(high))


@dataclass(frozen=True)
class PairedResult:
    difference: Interval  # mean of a - b, with its bootstrap interval
    p_value: float  # two-sided paired sign-flip permutation test


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedResult:
    """Compare two arms measured on the same seeds (or examples), pair by pair.

    The p-value is exact (all 2^n sign flips) for n <= 16 pairs, Monte Carlo above.
    """
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if len(x) != len(y):
        raise ValueError(f"paired_test needs equal lengths, got {len(x)} and {len(y)}")
    diff = x - y
    observed = abs(diff.mean())
    if len(diff) <= 16:
        signs = ((np.arange(2 ** len(diff))[:, None] >> np.arange(len(diff))) & 1) * 2 - 1
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(resamples, len(diff)))
    flipped = np.abs((signs * diff).mean(axis=1))
    p_value = float((flipped >= observed - 1e-12).mean())
    return PairedResult(bootstrap_ci(diff, level, resamples, seed), p_value)


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    data = np.asarray(list(values), dtype=np.float64)
    if data.ndim != 1 or len(data) == 0:
        raise ValueError(f"{name} must be a non-empty list of numbers")
    if not np.isfinite(data).all():
        raise ValueError(f"{name} contains NaN or inf: {data.tolist()}")
    return data
