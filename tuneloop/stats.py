"""Bootstrap statistics for evaluation: confidence intervals and the paired test the gate uses.

Both resample *items* (questions) with scipy's `stats.bootstrap`, so any aggregate metric works,
including ones that are not a mean of per-item scores (yes/no balanced accuracy, macro_score).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

Metric = Callable[[Sequence[int]], float]  # items (by index) -> aggregate value


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    confidence: float


@dataclass(frozen=True)
class PairedTest:
    """Candidate minus champion on the same items."""

    diff: float
    low: float  # confidence interval of the difference
    high: float
    p_value: float  # one-sided: share of resamples where the candidate is not better (diff <= 0)
    confidence: float
    n: int


def _resample(n: int, statistic: Metric, n_resamples: int, confidence: float, seed: int):
    idx = np.arange(n)
    return stats.bootstrap((idx,), lambda i: statistic(i), vectorized=False, n_resamples=n_resamples,
                           confidence_level=confidence, method="percentile", random_state=seed)


def bootstrap_ci(n: int, metric: Metric, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> Interval:
    """`metric` over all n items, with a percentile bootstrap interval over resampled items."""
    value = float(metric(np.arange(n)))
    if n < 2:
        return Interval(value, float("nan"), float("nan"), confidence)
    res = _resample(n, metric, n_resamples, confidence, seed)
    return Interval(value, float(res.confidence_interval.low), float(res.confidence_interval.high), confidence)


def paired_bootstrap(n: int, candidate: Metric, champion: Metric, n_resamples: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> PairedTest:
    """Paired bootstrap of candidate - champion: both metrics are computed on the same resampled
    items, so per-question difficulty cancels out (Koehn 2004; Dror et al. 2018)."""
    def diff(i) -> float:
        return float(candidate(i)) - float(champion(i))

    observed = diff(np.arange(n))
    if n < 2:
        return PairedTest(observed, float("nan"), float("nan"), 1.0, confidence, n)
    res = _resample(n, diff, n_resamples, confidence, seed)
    dist = np.asarray(res.bootstrap_distribution)
    dist = dist[~np.isnan(dist)]
    p = float(np.mean(dist <= 0)) if dist.size else 1.0
    return PairedTest(observed, float(res.confidence_interval.low), float(res.confidence_interval.high), p,
                      confidence, n)
