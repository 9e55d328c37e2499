"""Class balancing by resampling (pure numpy).

The labelled set L is balanced for teacher pre-training and supervised baselines by
drawing, each epoch, ``n`` colonies with replacement with weight 1/count(class): every
class is drawn equally often in expectation. IPB's pseudo-balancing (issue: IPB) uses
the same weighting on the teacher's pseudo-labels.
"""

from __future__ import annotations

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
