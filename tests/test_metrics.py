"""Metric math against hand-computed values."""

import math

import numpy as np
import pytest

from edgerlhf import metrics as M


def test_accuracy_and_auc():
    assert M.pairwise_accuracy([1, 2, 3], [0, 2, 4]) == pytest.approx(1 / 3)
    # positives [3, 1], negatives [2, 0]: 3>2, 3>0, 1<2, 1>0 -> 3/4
    assert M.auc([3, 1], [2, 0]) == 0.75
    assert M.auc([1, 1], [1, 0]) == 0.75  # one tie counted half: (0.5 + 1 + 0.5 + 1) / 4


def test_ece_hand_value():
    # bin [0.9,1]: p=.9,.95 labels 1,0 -> |0.5 - 0.925| * 2/4 ; bin [0.2,0.3): p=.2 label 0 -> .2 * 1/4 ;
    # bin [0.6,0.7): p=.6 label 1 -> .4 * 1/4
    e = M.ece([0.9, 0.95, 0.2, 0.6], [1, 0, 0, 1], n_bins=10)
    assert e == pytest.approx(0.425 * 0.5 + 0.2 * 0.25 + 0.4 * 0.25)


def test_preference_ece_perfect_calibration_is_zero():
    # margin 0 -> p = .5 in both orders, labels 1 and 0: calibrated
    assert M.preference_ece([1.0, 2.0], [1.0, 2.0]) == pytest.approx(0.0)


def test_spearman():
    assert M.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: x ranks [1.5,1.5,3,4], y ranks [1,2,3,4] -> pearson = 0.9486833
    assert M.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(M.spearman([1, 1], [1, 2]))


def test_win_rate_with_ties():
    assert M.win_rate([1, 2, 3, 0], [0, 2, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_bootstrap_interval():
    values = np.arange(100, dtype=float)
    lo, hi = M.bootstrap_ci(values, 2000, seed=0)
    assert lo < values.mean() < hi
    assert (lo, hi) == M.bootstrap_ci(values, 2000, seed=0)  # seeded
    assert M.bootstrap_ci([5.0] * 10, 100, seed=1) == (5.0, 5.0)


def test_reward_metrics_keys():
    m = M.reward_metrics([2, 3, 1], [1, 1, 2])
    assert set(m) == {"accuracy", "accuracy_decided", "tie_fraction", "auc", "ece", "mean_margin"}
    assert m["accuracy"] == pytest.approx(2 / 3) and m["mean_margin"] == pytest.approx(2 / 3)
    assert m["tie_fraction"] == 0 and m["accuracy_decided"] == m["accuracy"]


def test_ties_are_reported_apart_from_wrong_answers():
    # 10 pairs: 4 right, 2 wrong, 4 ties (the case: ties counted as wrong hide a decent reward model)
    chosen = [2.0, 3.0, 1.5, 0.5, 0.0, -1.0, 0.7, 0.7, 0.7, 0.7]
    rejected = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.7, 0.7, 0.7, 0.7]
    m = M.reward_metrics(chosen, rejected)
    assert m["accuracy"] == pytest.approx(0.4)  # strict: ties count as wrong, as before
    assert m["tie_fraction"] == pytest.approx(0.4)
    assert m["accuracy_decided"] == pytest.approx(4 / 6)
    assert m["accuracy"] == pytest.approx(m["accuracy_decided"] * (1 - m["tie_fraction"]))
    assert M.decided_accuracy([1.0, 2.0], [1.0, 2.0]) is None
    every_pair_ties = M.reward_metrics([1.0, 2.0], [1.0, 2.0])
    assert every_pair_ties["tie_fraction"] == 1.0 and every_pair_ties["accuracy"] == 0.0
    assert "accuracy_decided" not in every_pair_ties  # undefined, not a made-up number


def test_bootstrap_hand_values():
    # values [0, 1]: a resample's mean is 0, .5 or 1 with probabilities 1/4, 1/2, 1/4, so with many resamples
    # the 2.5 % / 97.5 % quantiles are 0 and 1 and the 30 % / 70 % quantiles (level .4) are both .5
    assert M.bootstrap_ci([0.0, 1.0], 20000, seed=3) == (0.0, 1.0)
    assert M.bootstrap_ci([0.0, 1.0], 20000, seed=3, level=0.4) == (0.5, 0.5)
    # the percentile interval of the means of resamples drawn by the seeded generator
    values = np.array([3.0, -1.0, 4.0, 1.0, 5.0])
    idx = np.random.default_rng(7).integers(0, 5, size=(500, 5))
    expect = tuple(np.quantile(values[idx].mean(1), [0.025, 0.975]))
    assert M.bootstrap_ci(values, 500, seed=7) == pytest.approx(expect)
    # any statistic: the median of a constant sample is that constant
    assert M.bootstrap_ci([2.0, 2.0, 2.0], 50, seed=0, stat=np.median) == (2.0, 2.0)


def test_win_rate_all_ties_and_all_wins():
    assert M.win_rate([1, 2], [1, 2]) == 0.5
    assert M.win_rate([3, 4], [1, 2]) == 1.0 and M.win_rate([0, 0], [1, 2]) == 0.0
