"""Metrics with the paper's names, and class-balancing draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ipb_ray.balance import inverse_frequency_weights, resample_counts
from ipb_ray.metrics import classification_report, confusion_matrix, per_class


def test_confusion_matrix_rows_are_truth():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_tpr_is_recall_and_f1_by_the_papers_formula():
    cm = np.array([[8, 2], [4, 6]])
    pc = per_class(cm)
    assert pc["tpr"].tolist() == [0.8, 0.6]               # TP / (TP + FN)
    assert pc["precision"].tolist() == [8 / 12, 6 / 8]    # TP / (TP + FP), reported apart
    assert pc["f1"][0] == pytest.approx(2 * 8 / (2 * 8 + 4 + 2))


def test_report_macro_and_balanced_accuracy_skip_absent_classes():
    rep = classification_report([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b", "c"])
    assert rep["tpr"]["a"] == 0.5 and rep["tpr"]["b"] == 1.0 and math.isnan(rep["tpr"]["c"])
    assert rep["balanced_accuracy"] == rep["macro_tpr"] == 0.75
    assert rep["accuracy"] == 0.75 and rep["n"] == 4


def test_bad_indices_are_named():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        confusion_matrix([0, 2], [0, 1], 2)


def test_inverse_frequency_weights_equalise_classes():
    w = inverse_frequency_weights([0, 0, 0, 1])
    assert w.sum() == pytest.approx(1) and w[:3].sum() == pytest.approx(w[3])


def test_balanced_resampling_draws_classes_equally_and_reproducibly():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    totals = np.zeros(3)
    for epoch in range(200):
        c = resample_counts(labels, None, seed=1, epoch=epoch)
        assert c.sum() == 100
        totals += np.bincount(labels, weights=c, minlength=3)
    assert np.allclose(totals / totals.sum(), 1 / 3, atol=0.01)
    assert np.array_equal(resample_counts(labels, 50, 1, 3), resample_counts(labels, 50, 1, 3))
    assert not np.array_equal(resample_counts(labels, 50, 1, 3), resample_counts(labels, 50, 1, 4))
    assert resample_counts(labels, None, 1, 0, balanced=False).sum() == 100
