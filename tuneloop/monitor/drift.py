"""Drift tests and change detectors for the monitoring signals.

* `mmd_test`: are recent questions drawn from the same distribution as the training questions?
  Maximum mean discrepancy (Gretton et al. 2012) between their embeddings with an RBF kernel
  (median-distance bandwidth), and a permutation test (scipy's `permutation_test`) for its
  p-value. Written here because the libraries that ship it (alibi-detect, torchdrift) pull heavy
  frameworks for twenty lines of numpy.
* `change_points`: Page-Hinkley or ADWIN (river) over a stream of values (satisfaction, judge
  scores); the stream is replayed from the stored values, so the detector keeps no state between
  runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class DriftResult:
    mmd2: float
    p_value: float
    bandwidth: float
    n_reference: int
    n_recent: int

    def drifted(self, alpha: float) -> bool:
        return self.p_value < alpha


def _sq_dists(z: np.ndarray) -> np.ndarray:
    sq = (z * z).sum(1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)


def _mmd2(k: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 from the pooled kernel matrix and the two index sets."""
    kxx, kyy, kxy = k[np.ix_(x, x)], k[np.ix_(y, y)], k[np.ix_(x, y)]
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def mmd_test(reference: np.ndarray, recent: np.ndarray, n_permutations: int = 500, seed: int = 0) -> DriftResult:
    """MMD^2 between two samples of embeddings and its permutation p-value."""
    reference, recent = np.asarray(reference, dtype=np.float64), np.asarray(recent, dtype=np.float64)
    if len(reference) < 2 or len(recent) < 2:
        raise ValueError("the MMD test needs at least 2 vectors in each sample")
    pooled = np.concatenate([reference, recent])
    d2 = _sq_dists(pooled)
    off = d2[~np.eye(len(pooled), dtype=bool)]
    bandwidth = float(np.sqrt(np.median(off) / 2.0)) or 1.0  # median heuristic
    k = np.exp(-d2 / (2.0 * bandwidth ** 2))
    m = len(reference)
    idx = np.arange(len(pooled))
    res = stats.permutation_test((idx[:m], idx[m:]), lambda x, y: _mmd2(k, x, y), permutation_type="independent",
                                 vectorized=False, n_resamples=n_permutations, alternative="greater",
                                 random_state=seed)
    return DriftResult(float(res.statistic), float(res.pvalue), bandwidth, m, len(recent))


def change_points(values: list[float], method: Literal["page_hinkley", "adwin"] = "page_hinkley",
                  **params) -> list[int]:
    """Indices of `values` at which the detector signals a change (river's Page-Hinkley or ADWIN)."""
    from river import drift

    detector = drift.PageHinkley(**params) if method == "page_hinkley" else drift.ADWIN(**params)
    out = []
    for i, v in enumerate(values):
        detector.update(float(v))
        if detector.drift_detected:
            out.append(i)
    return out
