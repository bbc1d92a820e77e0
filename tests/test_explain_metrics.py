"""The scorers' arithmetic against independent numpy reference implementations on fixed
inputs (scikit-learn is not installed here): AUROC from the trapezoids of the ROC curve,
balanced accuracy from the confusion matrix, correlation from np.corrcoef."""

from __future__ import annotations

import numpy as np
import pytest

from workers.explain.metrics import auroc, balanced_accuracy, correlation


def roc_area(scores, labels) -> float:
    """The area under the ROC curve traced threshold by threshold (ties as one step)."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    tpr, fpr = [0.0], [0.0]
    for t in sorted(set(s.tolist()), reverse=True):
        tpr.append(((s >= t) & y).sum() / y.sum())
        fpr.append(((s >= t) & ~y).sum() / (~y).sum())
    return float(np.trapezoid(tpr, fpr))


def confusion_balanced(pred, labels) -> float:
    p, y = np.asarray(pred, bool), np.asarray(labels, bool)
    tp, fn = (p & y).sum(), (~p & y).sum()
    tn, fp = (~p & ~y).sum(), (p & ~y).sum()
    return float((tp / (tp + fn) + tn / (tn + fp)) / 2)


CASES = [
    ([0.9, 0.8, 0.3, 0.2], [1, 1, 0, 0]),
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]),
    ([0.5, 0.5, 0.5, 0.5, 0.2], [1, 0, 1, 0, 0]),  # ties across the classes
    ([0.2, 0.7, 0.7, 0.1, 0.9, 0.3, 0.3], [0, 1, 0, 0, 1, 1, 0]),
]


@pytest.mark.parametrize("scores, labels", CASES)
def test_auroc_equals_the_roc_curve_area(scores, labels):
    assert auroc(scores, labels) == pytest.approx(roc_area(scores, labels), abs=1e-12)


def test_auroc_on_random_inputs_and_edges():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = rng.integers(0, 6, 30) / 5  # many ties
        y = rng.random(30) < 0.4
        assert auroc(s, y) == pytest.approx(roc_area(s, y), abs=1e-12)
    assert auroc([0.1, 0.2], [1, 1]) is None
    assert auroc([0.9, 0.1], [1, 0]) == 1.0 and auroc([0.1, 0.9], [1, 0]) == 0.0


@pytest.mark.parametrize("scores, labels", CASES)
def test_balanced_accuracy_equals_the_confusion_matrix(scores, labels):
    pred = np.asarray(scores) > 0.5
    assert balanced_accuracy(pred, labels) == pytest.approx(confusion_balanced(pred, labels))


def test_correlation_equals_corrcoef():
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = rng.normal(size=40)
        y = 0.3 * x + rng.normal(size=40)
        assert correlation(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert correlation([1, 1, 1], [1, 2, 3]) is None
