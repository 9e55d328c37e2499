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


def pseudo_balance(pseudo_labels: Sequence[int], num_classes: int, seed: int, epoch: int,
                   n_draws: int | None = None, class_names: Sequence[str] | None = None) -> PseudoBalance:
    """The paper's draw: every patch weighs 1/n_c of its pseudo-label's class, and
    ``n_draws`` (default: the number of patches) are drawn from the multinomial over the
    patches with those weights, with replacement; reproducible from ``(seed, epoch)``.

    A class no patch was pseudo-labelled with cannot be drawn: it gets weight 0 and a
    warning (naming it) instead of a division by zero. This is the numpy reference the
    Ray Data stage is tested against."""
    lab = np.asarray(pseudo_labels, dtype=np.int64)
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"pseudo-labels must lie in 0..{num_classes - 1}, got {lab.min()}..{lab.max()}")
    n = lab.size if n_draws is None else int(n_draws)
    if n < 0:
        raise ValueError(f"n_draws must be >= 0, got {n}")
    class_counts = np.bincount(lab, minlength=num_classes).astype(np.int64)
    proportions = class_counts / max(lab.size, 1)
    present = class_counts > 0
    class_weights = np.zeros(num_classes, dtype=np.float64)
    class_weights[present] = 1.0 / class_counts[present]
    missing = tuple(int(c) for c in np.flatnonzero(~present))
    if missing and lab.size:
        names = [class_names[c] if class_names else str(c) for c in missing]
        warnings.warn(f"epoch {epoch}: the teacher gave no patch the class(es) {', '.join(names)}; "
                      "they get no draws this epoch", RuntimeWarning, stacklevel=2)
    if lab.size == 0:
        return PseudoBalance(np.zeros(0, np.int64), class_counts, proportions, class_weights, missing)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x1B5]))
    counts = rng.multinomial(n, inverse_frequency_weights(lab)).astype(np.int64)
    total = class_weights.sum()
    return PseudoBalance(counts, class_counts, proportions, class_weights / total if total else class_weights,
                         missing)
