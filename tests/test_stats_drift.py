"""Bootstrap intervals, the paired bootstrap test, the MMD drift test and change detectors."""
from __future__ import annotations

import numpy as np
import pytest

from tuneloop.monitor.drift import change_points, mmd_test
from tuneloop.stats import bootstrap_ci, paired_bootstrap


def mean_of(values):
    values = np.asarray(values, dtype=float)
    return lambda idx: float(values[np.asarray(idx)].mean())


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    small, large = rng.binomial(1, 0.6, 40), rng.binomial(1, 0.6, 400)
    ci_s, ci_l = bootstrap_ci(40, mean_of(small)), bootstrap_ci(400, mean_of(large))
    assert ci_s.low < ci_s.value < ci_s.high and ci_l.low < ci_l.value < ci_l.high
    assert (ci_l.high - ci_l.low) < (ci_s.high - ci_s.low) / 2
    assert ci_s.value == pytest.approx(small.mean())


def test_paired_bootstrap_separates_a_real_gain_from_noise():
    rng = np.random.default_rng(1)
    champ = rng.binomial(1, 0.5, 200)
    better = np.where(rng.random(200) < 0.25, 1, champ)  # fixes a quarter of the items
    same = champ.copy()
    same[rng.choice(200, 6, replace=False)] ^= 1  # a handful of flips either way
    real = paired_bootstrap(200, mean_of(better), mean_of(champ))
    noise = paired_bootstrap(200, mean_of(same), mean_of(champ))
    worse = paired_bootstrap(200, mean_of(champ), mean_of(better))
    assert real.diff > 0.05 and real.low > 0 and real.p_value < 0.01
    assert noise.low <= 0 <= noise.high and noise.p_value > 0.05
    assert worse.diff < 0 and worse.p_value > 0.99


def test_paired_bootstrap_works_for_non_mean_metrics():
    """Balanced accuracy over resampled items: not a per-item mean, still testable."""
    labels = np.array([0] * 80 + [1] * 20)
    always_no = np.zeros(100)
    good = labels.copy()
    good[:5] = 1

    def balanced(pred):
        def metric(idx):
            idx = np.asarray(idx)
            y, p = labels[idx], pred[idx]
            rates = [np.mean(p[y == c] == c) for c in (0, 1) if np.any(y == c)]
            return float(np.mean(rates))
        return metric

    t = paired_bootstrap(100, balanced(good), balanced(always_no))
    assert t.diff == pytest.approx(0.5 - 5 / 160, abs=1e-9) and t.p_value < 0.01


def test_mmd_is_quiet_on_one_distribution_and_fires_on_a_shift():
    rng = np.random.default_rng(2)
    ref = rng.normal(0, 1, (120, 8))
    same = rng.normal(0, 1, (80, 8))
    shifted = rng.normal(0, 1, (80, 8)) + np.r_[1.0, np.zeros(7)]
    quiet, fired = mmd_test(ref, same, seed=0), mmd_test(ref, shifted, seed=0)
    assert not quiet.drifted(0.01) and quiet.p_value > 0.05
    assert fired.drifted(0.01) and fired.mmd2 > quiet.mmd2
    with pytest.raises(ValueError, match="at least 2"):
        mmd_test(ref, shifted[:1])


def test_mmd_false_alarm_rate_is_near_its_level():
    rng = np.random.default_rng(3)
    alarms = sum(mmd_test(rng.normal(0, 1, (40, 4)), rng.normal(0, 1, (40, 4)), n_permutations=200,
                          seed=k).drifted(0.05) for k in range(40))
    assert alarms <= 6  # 5% of 40 = 2 expected; a broken test fires far more often


@pytest.mark.parametrize("method,params", [("page_hinkley", {"threshold": 8.0, "delta": 0.05, "min_instances": 20}),
                                           ("adwin", {})])
def test_change_points_find_a_drop_in_satisfaction(method, params):
    rng = np.random.default_rng(4)
    stable = list(rng.binomial(1, 0.8, 300).astype(float))
    dropped = stable[:150] + list(rng.binomial(1, 0.3, 150).astype(float))
    assert change_points(stable, method, **params) == []
    found = change_points(dropped, method, **params)
    assert found and 150 <= found[0] < 230
