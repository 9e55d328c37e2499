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


# --------------------------------------------------------------------------- the balancer's settings

def test_pseudo_balance_defaults_are_the_papers_draw_exactly():
    """The paper's row must stay reproducible: explicit defaults draw the very same counts."""
    from ipb_ray.patches.balance import inverse_frequency_weights, pseudo_balance

    lab = _imbalanced()
    pb = pseudo_balance(lab, 4, seed=3, epoch=2, confidence=np.full(lab.size, 0.1), threshold=0.0, alpha=1.0,
                        max_copies=0, counts="hard")
    rng = np.random.default_rng(np.random.SeedSequence([3, 2, 0x1B5]))
    assert np.array_equal(pb.counts, rng.multinomial(lab.size, inverse_frequency_weights(lab)))


def test_pseudo_balance_threshold_draws_only_confident_colonies():
    from ipb_ray.patches.balance import pseudo_balance

    lab = _imbalanced()
    conf = np.where(np.arange(lab.size) % 2 == 0, 0.9, 0.5)
    pb = pseudo_balance(lab, 4, 0, 0, confidence=conf, threshold=0.65)
    assert pb.counts.sum() == lab.size
    assert pb.counts[conf < 0.65].sum() == 0 and pb.counts[conf >= 0.65].sum() == lab.size
    # still balanced over the classes, now by the counts of the colonies that pass
    drawn = np.bincount(np.repeat(lab, pb.counts), minlength=4)
    assert drawn.min() > 0.15 * lab.size, drawn
    with pytest.raises(ValueError, match="needs each pseudo-label's confidence"):
        pseudo_balance(lab, 4, 0, 0, threshold=0.65)
    with pytest.warns(RuntimeWarning, match="no pseudo-label reaches the confidence threshold 0.99"):
        assert pseudo_balance(lab, 4, 0, 0, confidence=conf, threshold=0.99).counts.sum() == lab.size


def test_pseudo_balance_tempering_gives_class_shares_proportional_to_n_c_to_the_one_minus_alpha():
    from ipb_ray.patches.balance import pseudo_balance

    lab = np.array([0] * 900 + [1] * 100)
    n = 200_000
    for alpha, want in ((1.0, [0.5, 0.5]), (0.0, [0.9, 0.1]), (0.5, [30 / 40, 10 / 40])):
        pb = pseudo_balance(lab, 2, 0, 0, n_draws=n, alpha=alpha)
        share = np.bincount(np.repeat(lab, pb.counts), minlength=2) / n
        np.testing.assert_allclose(share, want, atol=0.01, err_msg=f"alpha {alpha}")
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        pseudo_balance(lab, 2, 0, 0, alpha=-1)


def test_pseudo_balance_copy_cap_bounds_every_colony_and_keeps_the_epoch_length():
    """Five colonies called 'rare' among 995: balanced, each is drawn ~100 times; capped, 3."""
    from ipb_ray.patches.balance import pseudo_balance

    lab = np.array([0] * 995 + [1] * 5)
    free = pseudo_balance(lab, 2, 0, 0)
    assert free.counts[lab == 1].max() > 50
    capped = pseudo_balance(lab, 2, 0, 0, max_copies=3)
    assert capped.counts.max() <= 3 and capped.counts.sum() == lab.size
    assert np.all(capped.counts[lab == 1] == 3)  # the rare colonies fill their cap, the rest goes to class 0
    # a cap that cannot hold the epoch is raised just enough: 10 colonies, 50 draws -> 5 each
    tight = pseudo_balance(np.array([0] * 5 + [1] * 5), 2, 0, 0, n_draws=50, max_copies=2)
    assert tight.counts.tolist() == [5] * 10


def test_pseudo_balance_soft_counts_use_the_probabilities():
    from ipb_ray.patches.balance import pseudo_balance

    # 100 colonies called 0 with p = (0.6, 0.4); 100 called 1 with p = (0, 1): soft n = (60, 140)
    lab = np.array([0] * 100 + [1] * 100)
    probs = np.vstack([np.tile([0.6, 0.4], (100, 1)), np.tile([0.0, 1.0], (100, 1))])
    pb = pseudo_balance(lab, 2, 0, 0, n_draws=100_000, probs=probs, counts="soft")
    share = np.bincount(np.repeat(lab, pb.counts), minlength=2) / 100_000
    np.testing.assert_allclose(share, [(100 / 60) / (100 / 60 + 100 / 140), (100 / 140) / (100 / 60 + 100 / 140)],
                               atol=0.01)
    with pytest.raises(ValueError, match="needs the teacher's class probabilities"):
        pseudo_balance(lab, 2, 0, 0, counts="em")
    with pytest.raises(ValueError, match="unknown count source 'median'"):
        pseudo_balance(lab, 2, 0, 0, counts="median")


def test_em_prior_recovers_a_known_mixture():
    """Saerens et al.: posteriors of a classifier calibrated on a uniform prior, applied to a
    20/80 mixture, give back 20/80 by EM, where the mean posterior and hard counts do not."""
    from ipb_ray.patches.balance import em_prior

    rng = np.random.default_rng(0)
    n, truth_prior = 20_000, np.array([0.2, 0.8])
    y = rng.choice(2, size=n, p=truth_prior)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.5)  # overlapping classes
    # the Bayes posterior under the *uniform* training prior: logit = 2 x mu / sigma^2
    p1 = 1.0 / (1.0 + np.exp(-2.0 * x / 1.5 ** 2))
    probs = np.stack([1 - p1, p1], 1)
    est = em_prior(probs)
    np.testing.assert_allclose(est, truth_prior, atol=0.02)
    assert abs(probs.mean(0)[0] - 0.2) > 0.05  # the plain mean posterior is biased toward uniform
    # a known non-uniform training prior is divided out
    np.testing.assert_allclose(em_prior(probs, [0.5, 0.5]), est)
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        em_prior(np.zeros((0, 2)))


def test_prior_corrected_posteriors_follow_the_new_prior():
    """Posteriors under a uniform training prior, moved to U's 20/80 prior, are the Bayes
    posteriors under 20/80: hard labels of the rare class get rarer and right more often."""
    from ipb_ray.patches.balance import em_prior, prior_corrected

    rng = np.random.default_rng(1)
    n = 20_000
    y = rng.choice(2, size=n, p=[0.2, 0.8])
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.5)
    p1 = 1.0 / (1.0 + np.exp(-2.0 * x / 1.5 ** 2))
    probs = np.stack([1 - p1, p1], 1)
    post = prior_corrected(probs, em_prior(probs))
    np.testing.assert_allclose(post.sum(1), 1.0)
    bayes = 1.0 / (1.0 + np.exp(-(2.0 * x / 1.5 ** 2 + np.log(0.8 / 0.2))))
    np.testing.assert_allclose(post[:, 1], bayes, atol=0.03)
    before, after = probs.argmax(1), post.argmax(1)
    precision = lambda pred: float((y[pred == 0] == 0).mean())  # noqa: E731
    assert (after == 0).sum() < (before == 0).sum() and precision(after) > precision(before) + 0.1
    assert (after == y).mean() > (before == y).mean()
