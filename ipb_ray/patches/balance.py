"""Class balancing by resampling (pure numpy).

The labelled set L is balanced for teacher pre-training and supervised baselines by
drawing, each epoch, ``n`` colonies with replacement with weight 1/count(class): every
class is drawn equally often in expectation. IPB's pseudo-balancing (issue: IPB) uses
the same weighting on the teacher's pseudo-labels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "COUNT_SOURCES", "PRIORS", "PseudoBalance", "capped_multinomial", "em_prior",
    "inverse_frequency_weights", "prior_corrected", "pseudo_balance", "resample_counts",
]


def inverse_frequency_weights(labels: Sequence[int]) -> np.ndarray:
    """Per-item weight 1/count(its class), normalised to sum to 1. ``labels``: (N,) ints."""
    lab = np.asarray(labels, dtype=np.int64)
    if lab.size == 0:
        return np.zeros(0, dtype=np.float64)
    _, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return w / w.sum()


def resample_counts(labels: Sequence[int], n_draws: int | None, seed: int, epoch: int,
                    balanced: bool = True) -> np.ndarray:
    """How often each item is drawn this epoch: a multinomial over the items with weights
    1/count(class) (``balanced``) or uniform, with replacement; reproducible from
    ``(seed, epoch)``. ``n_draws`` defaults to the number of items. Returns (N,) int64."""
    lab = np.asarray(labels, dtype=np.int64)
    n = lab.size if n_draws is None else int(n_draws)
    if lab.size == 0:
        return np.zeros(0, dtype=np.int64)
    w = inverse_frequency_weights(lab) if balanced else np.full(lab.size, 1.0 / lab.size)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0xBA1]))
    return rng.multinomial(n, w).astype(np.int64)


@dataclass(frozen=True)
class PseudoBalance:
    """One epoch's pseudo-balancing of the unlabelled set (shared/IPB.md, step 2a)."""

    counts: np.ndarray  # (N,) int64: how often each patch is drawn this epoch
    class_counts: np.ndarray  # (C,) int64: n_c, patches pseudo-labelled c
    proportions: np.ndarray  # (C,) float: p_c = n_c / N, the teacher's class proportions
    class_weights: np.ndarray  # (C,) float: sampling weight of one patch of class c (1/n_c, normalised); 0 if n_c = 0
    missing: tuple[int, ...]  # classes with no pseudo-label this epoch (they get no draws)


#: Where a pseudo-balanced draw takes its class counts n_c from (``method.pseudo_balance.counts``).
COUNT_SOURCES = ("hard", "soft", "em")
#: How the pseudo-labels of U are read from the labeller's posteriors (``method.pseudo_balance.prior``).
PRIORS = ("none", "em", "labelled")


def em_prior(probs: np.ndarray, train_prior: Sequence[float] | None = None, iters: int = 200,
             tol: float = 1e-7) -> np.ndarray:
    """The class prior of an unlabelled set by expectation-maximisation over a classifier's
    posteriors (Saerens, Latinne & Decaestecker, "Adjusting the outputs of a classifier to
    new a priori probabilities", Neural Computation 2002; SimPro, Du et al., ICML 2024,
    estimates the unlabelled prior for the same purpose).

    A classifier trained where the classes had prior ``train_prior`` (uniform: class-balanced
    L) gives posteriors ``probs`` (N, C) on the new set. In our words: guess a prior, re-weight
    every posterior by (guess / train prior) and renormalise it (E), take the mean of the
    re-weighted posteriors as the next guess (M), until it stops moving. The result
    corrects the plain mean posterior, which is pulled toward the training prior; hard
    counts of the argmax are pulled further (a confusable rare class loses or gains whole
    colonies). Returns (C,) summing to 1."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"em_prior needs posteriors of shape (N, C) with N > 0, got {p.shape}")
    base = _base_prior(p.shape[1], train_prior)
    p = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
    prior = base.copy()
    for _ in range(int(iters)):
        new = prior_corrected(p, prior, base).mean(0)  # E then M
        done = float(np.abs(new - prior).max()) < tol
        prior = new
        if done:
            break
    return prior / prior.sum()


def prior_corrected(probs: np.ndarray, prior: Sequence[float], train_prior: Sequence[float] | None = None
                    ) -> np.ndarray:
    """Posteriors ``probs`` (N, C) of a classifier trained under ``train_prior`` (None:
    uniform, i.e. class-balanced L) re-weighted to the class prior ``prior`` of the data
    they were computed on, p'(c|x) proportional to p(c|x) prior(c) / train_prior(c)
    (Bayes' rule under a prior shift; Saerens et al. 2002). A teacher trained on balanced
    L calls far too many colonies of U "rare" when U is imbalanced; with U's prior its
    rare calls need more evidence."""
    p = np.asarray(probs, dtype=np.float64)
    w = p * (np.asarray(prior, np.float64) / _base_prior(p.shape[1], train_prior))
    return w / np.clip(w.sum(1, keepdims=True), 1e-300, None)


def _base_prior(c: int, train_prior: Sequence[float] | None) -> np.ndarray:
    """The training prior over ``c`` classes, normalised (None: uniform)."""
    base = np.full(c, 1.0 / c) if train_prior is None else np.asarray(train_prior, dtype=np.float64)
    if base.shape != (c,) or np.any(base <= 0):
        raise ValueError(f"train_prior must hold {c} positive values, got {train_prior}")
    return base / base.sum()


def capped_multinomial(n: int, weights: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws over items with ``weights`` (summing to 1), at most ``cap`` copies of any
    one item: what a draw puts above the cap is drawn again over the items still below it,
    in proportion to their weights. ``cap`` is raised to ``ceil(n / items with weight > 0)``
    when it could not hold ``n`` draws (the stream must stay ``n`` long)."""
    w = np.asarray(weights, dtype=np.float64)
    live = int(np.count_nonzero(w > 0))
    if n == 0 or live == 0:
        return np.zeros(w.size, np.int64)
    cap = max(int(cap), -(-int(n) // live))
    counts = rng.multinomial(n, w).astype(np.int64)
    excess = int(np.clip(counts - cap, 0, None).sum())
    counts = np.minimum(counts, cap)
    while excess > 0:
        room = np.where(counts < cap, w, 0.0)
        extra = rng.multinomial(excess, room / room.sum())
        counts += extra
        excess = int(np.clip(counts - cap, 0, None).sum())
        counts = np.minimum(counts, cap)
    return counts


def pseudo_balance(pseudo_labels: Sequence[int], num_classes: int, seed: int, epoch: int,
                   n_draws: int | None = None, class_names: Sequence[str] | None = None, *,
                   confidence: Sequence[float] | None = None, probs: np.ndarray | None = None,
                   threshold: float = 0.0, alpha: float = 1.0, max_copies: int = 0,
                   counts: str = "hard") -> PseudoBalance:
    """The paper's draw: every patch weighs 1/n_c of its pseudo-label's class, and
    ``n_draws`` (default: the number of patches) are drawn from the multinomial over the
    patches with those weights, with replacement; reproducible from ``(seed, epoch)``.

    A class no patch was pseudo-labelled with cannot be drawn: it gets weight 0 and a
    warning (naming it) instead of a division by zero. This is the numpy reference the
    Ray Data stage is tested against.

    The keyword settings change the draw; at their defaults it is the paper's, draw for draw:

    - ``threshold``: only patches whose pseudo-label ``confidence`` is at least this are
      drawn (the paper's 0.65 filters patches that straddle two classes; FixMatch's mask);
      n_c counts the patches that pass. When none passes, all are drawn (with a warning).
    - ``alpha``: weights 1/n_c^alpha (CReST, Wei et al., CVPR 2021, tempers its rebalancing
      the same way): 1 balances the classes, 0 draws as the data are; in between a class
      of n_c patches gets a share proportional to n_c^(1 - alpha), so a handful of colonies
      the teacher calls rare are no longer replayed |U| / (C n_c) times each.
    - ``max_copies``: at most this many copies of one colony per epoch
      (:func:`capped_multinomial`); 0 = no cap.
    - ``counts``: n_c from the hard pseudo-labels (``hard``), from the sum of the
      posteriors ``probs`` (``soft``: a colony the teacher is unsure of counts partly for
      each class), or from the unlabelled prior estimated by EM from ``probs``
      (``em``, :func:`em_prior`) times the number of patches that pass.

    ``class_counts`` and ``proportions`` of the result are always the hard pseudo-labels'
    over all patches (the teacher's mix, Figures 6-7)."""
    lab = np.asarray(pseudo_labels, dtype=np.int64)
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"pseudo-labels must lie in 0..{num_classes - 1}, got {lab.min()}..{lab.max()}")
    n = lab.size if n_draws is None else int(n_draws)
    if n < 0:
        raise ValueError(f"n_draws must be >= 0, got {n}")
    if counts not in COUNT_SOURCES:
        raise ValueError(f"unknown count source {counts!r}; choose one of {', '.join(COUNT_SOURCES)}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    paper = threshold <= 0 and alpha == 1.0 and max_copies <= 0 and counts == "hard"
    class_counts = np.bincount(lab, minlength=num_classes).astype(np.int64)
    proportions = class_counts / max(lab.size, 1)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x1B5]))
    if paper:
        present = class_counts > 0
        class_weights = np.zeros(num_classes, dtype=np.float64)
        class_weights[present] = 1.0 / class_counts[present]
        missing = _warn_missing(present, lab.size, epoch, class_names)
        if lab.size == 0:
            return PseudoBalance(np.zeros(0, np.int64), class_counts, proportions, class_weights, missing)
        drawn = rng.multinomial(n, inverse_frequency_weights(lab)).astype(np.int64)
        total = class_weights.sum()
        return PseudoBalance(drawn, class_counts, proportions, class_weights / total if total else class_weights,
                             missing)
    if lab.size == 0:
        return PseudoBalance(np.zeros(0, np.int64), class_counts, proportions, np.zeros(num_classes), ())
    eligible = np.ones(lab.size, bool)
    if threshold > 0:
        if confidence is None:
            raise ValueError("a pseudo-balance threshold needs each pseudo-label's confidence")
        eligible = np.asarray(confidence, np.float64) >= threshold
        if not eligible.any():
            warnings.warn(f"epoch {epoch}: no pseudo-label reaches the confidence threshold {threshold}; "
                          "drawing from all of them this epoch", RuntimeWarning, stacklevel=2)
            eligible[:] = True
    kept = np.bincount(lab[eligible], minlength=num_classes).astype(np.float64)
    if counts == "hard":
        n_c = kept
    else:
        if probs is None:
            raise ValueError(f"pseudo-balance counts={counts!r} needs the teacher's class probabilities")
        p = np.asarray(probs, np.float64)[eligible]
        n_c = p.sum(0) if counts == "soft" else em_prior(p) * float(eligible.sum())
    present = (kept > 0) & (n_c > 0)
    missing = _warn_missing(present, lab.size, epoch, class_names)
    class_weights = np.zeros(num_classes, dtype=np.float64)
    class_weights[present] = 1.0 / n_c[present] ** alpha
    w = np.where(eligible, class_weights[lab], 0.0)
    if w.sum() <= 0:  # nothing drawable (cannot happen with a patch eligible, kept for safety)
        w = eligible.astype(np.float64)
    w = w / w.sum()
    drawn = capped_multinomial(n, w, max_copies, rng) if max_copies > 0 else rng.multinomial(n, w).astype(np.int64)
    total = class_weights.sum()
    return PseudoBalance(drawn, class_counts, proportions, class_weights / total if total else class_weights,
                         missing)


def _warn_missing(present: np.ndarray, size: int, epoch: int, class_names: Sequence[str] | None
                  ) -> tuple[int, ...]:
    missing = tuple(int(c) for c in np.flatnonzero(~present))
    if missing and size:
        names = [class_names[c] if class_names else str(c) for c in missing]
        warnings.warn(f"epoch {epoch}: the teacher gave no patch the class(es) {', '.join(names)}; "
                      "they get no draws this epoch", RuntimeWarning, stacklevel=3)
    return missing
