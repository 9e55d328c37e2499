"""Metrics with the paper's names, and class-balancing draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ipb_ray.patches.balance import inverse_frequency_weights, resample_counts
from ipb_ray.evaluation.metrics import classification_report, confusion_matrix, per_class


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


def _imbalanced(seed=0, n=400):
    rng = np.random.default_rng(seed)
    return rng.choice(4, size=n, p=[0.6, 0.25, 0.1, 0.05])


def test_pseudo_balance_weights_are_inverse_class_counts():
    from ipb_ray.patches.balance import pseudo_balance

    lab = _imbalanced()
    pb = pseudo_balance(lab, 4, seed=1, epoch=0)
    counts = np.bincount(lab, minlength=4)
    assert pb.class_counts.tolist() == counts.tolist()
    np.testing.assert_allclose(pb.proportions, counts / lab.size)
    np.testing.assert_allclose(pb.class_weights, (1 / counts) / (1 / counts).sum())
    assert pb.counts.sum() == lab.size and pb.missing == ()


def test_pseudo_balance_draw_is_reproducible_per_seed_and_epoch():
    from ipb_ray.patches.balance import pseudo_balance

    lab = _imbalanced()
    a, b = pseudo_balance(lab, 4, 7, 3), pseudo_balance(lab, 4, 7, 3)
    assert np.array_equal(a.counts, b.counts)
    assert not np.array_equal(a.counts, pseudo_balance(lab, 4, 7, 4).counts)
    assert not np.array_equal(a.counts, pseudo_balance(lab, 4, 8, 3).counts)
    assert pseudo_balance(lab, 4, 7, 3, n_draws=1000).counts.sum() == 1000


def test_pseudo_balance_class_frequencies_pass_a_chi_square_test_for_uniform():
    """Over many epochs the drawn classes are uniform although the pseudo-labels are 60/25/10/5 %."""
    from scipy.stats import chisquare

    from ipb_ray.patches.balance import pseudo_balance

    lab = _imbalanced()
    drawn = np.zeros(4, dtype=np.int64)
    for epoch in range(200):
        pb = pseudo_balance(lab, 4, seed=0, epoch=epoch)
        drawn += np.bincount(np.repeat(lab, pb.counts), minlength=4)
    assert chisquare(drawn).pvalue > 1e-3, drawn
    # the same statistic rejects the raw, unbalanced pseudo-labels outright
    assert chisquare(np.bincount(lab, minlength=4) * 200).pvalue < 1e-12


def test_pseudo_balance_class_without_pseudo_labels_warns_and_gets_no_draws():
    from ipb_ray.patches.balance import pseudo_balance

    lab = np.array([0] * 30 + [1] * 5 + [3] * 2)
    with pytest.warns(RuntimeWarning, match=r"epoch 5: the teacher gave no patch the class\(es\) Diff"):
        pb = pseudo_balance(lab, 4, seed=0, epoch=5, class_names=["Debris", "Dense", "Diff", "Spread"])
    assert pb.missing == (2,) and pb.class_weights[2] == 0 and np.isfinite(pb.class_weights).all()
    assert pb.counts.sum() == lab.size
    assert np.bincount(np.repeat(lab, pb.counts), minlength=4)[2] == 0


def test_pseudo_balance_rejects_out_of_range_labels():
    from ipb_ray.patches.balance import pseudo_balance

    with pytest.raises(ValueError, match=r"pseudo-labels must lie in 0..3, got 0..4"):
        pseudo_balance([0, 4], 4, 0, 0)
    with pytest.raises(ValueError, match="n_draws must be >= 0, got -1"):
        pseudo_balance([0, 1], 4, 0, 0, n_draws=-1)
    assert pseudo_balance([], 4, 0, 0).counts.size == 0
