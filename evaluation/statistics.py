"""Confidence intervals for task scores: the bootstrap over tasks, and the paired difference of two runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Estimate:
    """A mean with its (percentile bootstrap) confidence interval."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> Estimate:
    """The mean of ``values`` and its bootstrap interval (tasks resampled with replacement, seeded)."""
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return Estimate(float(data.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))


def paired_difference(
    first: Sequence[float], second: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Estimate:
    """``first - second`` over the same tasks, resampled by task (so per-task difficulty cancels)."""
    if len(first) != len(second):
        raise ValueError(f"paired runs need the same tasks: {len(first)} and {len(second)} values")
    differences = (np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)).tolist()
    return bootstrap(differences, confidence=confidence, resamples=resamples, seed=seed)
