"""The arithmetic of scorers: AUROC, balanced accuracy and Pearson correlation."""

from __future__ import annotations

import numpy as np


def auroc(scores, labels) -> float | None:
    """Area under the ROC curve of `scores` for binary `labels` (the Mann-Whitney U statistic
    over positives x negatives, ties counted half); None without both classes."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def balanced_accuracy(predicted, labels) -> float | None:
    """The mean of the recall of each class (true-positive and true-negative rates); None
    without both classes."""
    p, y = np.asarray(predicted, dtype=bool), np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        return None
    return float(((p & y).sum() / y.sum() + (~p & ~y).sum() / (~y).sum()) / 2)


def correlation(x, y) -> float | None:
    """Pearson's correlation of x and y; None where either is constant."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else None
