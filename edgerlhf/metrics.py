"""Metric math used by the reward and evaluation stages (plain numpy, unit-tested against hand values)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Fraction of pairs whose chosen response scores strictly higher than the rejected one (a tie is wrong)."""
    c, r = np.asarray(chosen, float), np.asarray(rejected, float)
    return float(np.mean(c > r))


def tie_fraction(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Fraction of pairs whose two scores are exactly equal (the reward model expresses no preference)."""
    c, r = np.asarray(chosen, float), np.asarray(rejected, float)
    return float(np.mean(c == r))


def decided_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float | None:
    """Accuracy over the decided pairs only (scores differ); None when every pair is a tie."""
    c, r = np.asarray(chosen, float), np.asarray(rejected, float)
    decided = c != r
    if not decided.any():
        return None
    return float(np.mean(c[decided] > r[decided]))


def choice_agreement(chosen_a: Sequence[float], rejected_a: Sequence[float], chosen_b: Sequence[float],
                     rejected_b: Sequence[float]) -> float:
    """Fraction of pairs on which two scorers prefer the same response (a tie is its own preference)."""
    a = np.sign(np.asarray(chosen_a, float) - np.asarray(rejected_a, float))
    b = np.sign(np.asarray(chosen_b, float) - np.asarray(rejected_b, float))
    return float(np.mean(a == b))


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney).

    For a reward model: chosen responses are positives, rejected ones negatives, across all prompts, so it
    measures global separation, complementing the paired accuracy."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auc needs at least one positive and one negative score")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def ece(probs: Sequence[float], labels: Sequence[int], n_bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width bins of |bin accuracy - bin confidence| * bin weight.

    Bins are [0, 1/n), ..., [(n-1)/n, 1]; the confidence is the predicted probability of label 1."""
    p, y = np.asarray(probs, float), np.asarray(labels, float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    return float(total)


def preference_ece(chosen: Sequence[float], rejected: Sequence[float], n_bins: int = 10) -> float:
    """ECE of the Bradley-Terry probability P(chosen > rejected) = sigmoid(s_c - s_r).

    Each pair is scored in both orders (p, label 1) and (1 - p, label 0), so the labels are not all one and
    the result does not depend on an arbitrary ordering."""
    p = sigmoid(np.asarray(chosen, float) - np.asarray(rejected, float))
    return ece(np.concatenate([p, 1 - p]), np.concatenate([np.ones_like(p), np.zeros_like(p)]), n_bins)


def reward_metrics(chosen: Sequence[float], rejected: Sequence[float], n_bins: int = 10) -> dict[str, float]:
    """A reward model on preference pairs: accuracy (strict: a tie counts as wrong), tie_fraction,
    accuracy_decided (over the pairs with different scores; left out when every pair ties), auc, ece and
    mean_margin. accuracy = accuracy_decided * (1 - tie_fraction)."""
    c, r = np.asarray(chosen, float), np.asarray(rejected, float)
    out = {
        "accuracy": round(pairwise_accuracy(c, r), 6),
        "tie_fraction": round(tie_fraction(c, r), 6),
        "auc": round(auc(c, r), 6),
        "ece": round(preference_ece(c, r, n_bins), 6),
        "mean_margin": round(float(np.mean(c - r)), 6),
    }
    decided = decided_accuracy(c, r)
    if decided is not None:
        out["accuracy_decided"] = round(decided, 6)
    return out


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    a = np.asarray(x, float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks); nan when either side is constant."""
    rx, ry = rankdata(x), rankdata(y)
    sx, sy = rx.std(), ry.std()
    if sx == 0 or sy == 0:
        return math.nan
    return float(((rx - rx.mean()) * (ry - ry.mean())).mean() / (sx * sy))


def win_rate(policy: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of prompts where the policy's score beats the baseline's, ties counted half."""
    p, b = np.asarray(policy, float), np.asarray(baseline, float)
    return float(np.mean((p > b) + 0.5 * (p == b)))


def bootstrap_ci(values: Sequence[float], n_samples: int, seed: int, stat=np.mean,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over `values`, resampled with a seeded generator."""
    v = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_samples, len(v)))
    stats = np.array([stat(v[i]) for i in idx])
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
