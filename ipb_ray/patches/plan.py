"""An epoch's patch plan: which colony, which copy, which window, in which order.

A training stream's epoch is decided before any pixel is touched: each drawn colony
appears once per copy, the rows are shuffled over the *whole* epoch (seeded by
``(seed, epoch, stream)``), and every rank takes its own contiguous share of whole
batches. The patch tasks then only cut what the plan names, so an epoch's content and
order come from ``(seed, epoch)`` alone, whatever worker draws which row, and no
shuffle buffer sits in the training process.

A plan is a dict of equal-length numpy columns (:data:`PLAN_COLUMNS`): ``colony_id``
(str), ``copy`` (int32; seeds the window and the
augmentation, as in :func:`ipb_ray.patches.core.colony_rng`), ``x``, ``y`` and
``scale`` (a fixed window; ``fixed`` says whether it applies). Pure numpy.
"""

from __future__ import annotations

from typing import Container, Mapping, Sequence

import numpy as np

__all__ = ["PLAN_COLUMNS", "STREAM_TAGS", "empty_plan", "epoch_rows", "fixed_windows", "rank_share", "shuffled",
           "stream_plan"]


def fixed_windows(coords: Mapping[str, Sequence[float]] | None) -> dict[str, tuple[int, int, float]] | None:
    """A draw's fixed windows as plain ``(x, y, scale)`` tuples, as every board keeps them
    (so each rank, and each runner, cuts the very same windows)."""
    return {k: (int(v[0]), int(v[1]), float(v[2])) for k, v in coords.items()} if coords is not None else None


PLAN_COLUMNS = ("colony_id", "copy", "fixed", "x", "y", "scale")
#: Stream tags: two streams of one epoch are shuffled apart.
STREAM_TAGS = {"labelled": 1, "unlabelled": 2, "calibration": 3, "evaluation": 4}
_SHUFFLE_TAG = 13


def empty_plan() -> dict[str, np.ndarray]:
    return {"colony_id": np.zeros(0, object), "copy": np.zeros(0, np.int32), "fixed": np.zeros(0, bool),
            "x": np.zeros(0, np.int32), "y": np.zeros(0, np.int32), "scale": np.zeros(0, np.float32)}


def epoch_rows(known: Container[str] | None, counts: Mapping[str, int] | None = None, *,
               ids: Sequence[str] | None = None, copies: int = 1,
               coords: Mapping[str, Sequence[float]] | None = None) -> dict[str, np.ndarray]:
    """The unshuffled plan of an epoch, in the order of ``counts`` (or ``ids``).

    ``known``: the colonies the stream can cut (the crop cache's), or None to skip the
    check. ``counts``: copies per colony (the balancer's draw); or ``ids``, each
    ``copies`` times. ``coords``: a fixed window ``(x, y, scale)`` per colony (IPB: the
    very patch the teacher labelled); its copies then differ in augmentation only. A
    colony missing from ``known`` is an error that names it (the cache holds another
    catalog)."""
    if (counts is None) == (ids is None):
        raise ValueError("give counts or ids, exactly one")
    pairs = list(counts.items()) if counts is not None else [(c, copies) for c in ids]
    missing = [c for c, _ in pairs if c not in known] if known is not None else []
    if missing:
        raise KeyError(f"{len(missing)} colonies of the stream are not in the crop cache, e.g. {missing[:3]}; "
                       "build the cache from the catalog the stream reads")
    n = np.array([int(k) for _, k in pairs], np.int64)
    if (n < 0).any():
        raise ValueError("copy counts must be >= 0")
    if not pairs or n.sum() == 0:
        return empty_plan()
    rows = np.repeat(np.array([c for c, _ in pairs], dtype=object), n)
    starts = np.repeat(np.cumsum(n) - n, n)
    copy = (np.arange(int(n.sum())) - starts).astype(np.int32)
    fixed = np.zeros(len(rows), bool)
    x = np.zeros(len(rows), np.int32)
    y = np.zeros(len(rows), np.int32)
    scale = np.ones(len(rows), np.float32)
    if coords:
        owner = np.repeat(np.arange(len(pairs)), n)
        for j, (cid, _) in enumerate(pairs):
            c = coords.get(cid)
            if c is not None:
                sel = owner == j
                fixed[sel], x[sel], y[sel], scale[sel] = True, int(c[0]), int(c[1]), float(c[2])
    return {"colony_id": rows, "copy": copy, "fixed": fixed, "x": x, "y": y, "scale": scale}


def shuffled(plan: Mapping[str, np.ndarray], seed: int, epoch: int, stream: int) -> dict[str, np.ndarray]:
    """The plan in a seeded random order over the whole epoch (``stream`` keeps two
    streams of one epoch apart)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(stream), _SHUFFLE_TAG]))
    order = rng.permutation(len(plan["colony_id"]))
    return {k: np.asarray(v)[order] for k, v in plan.items()}


def rank_share(plan: Mapping[str, np.ndarray], rank: int, world: int, batch_size: int,
               steps: int | None = None) -> dict[str, np.ndarray]:
    """Rank ``rank``'s contiguous share of the plan: ``steps`` whole batches (default: as
    many as every rank can have), the same number on every rank."""
    world = max(int(world), 1)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    n = len(plan["colony_id"])
    per_rank = n // world if steps is None else int(steps) * int(batch_size)
    if steps is None:
        per_rank -= per_rank % int(batch_size)
    if per_rank * world > n:
        raise ValueError(f"the plan holds {n} patches; {world} ranks x {steps} steps x {batch_size} need "
                         f"{per_rank * world}")
    return {k: np.asarray(v)[rank * per_rank:(rank + 1) * per_rank] for k, v in plan.items()}


def stream_plan(known: Container[str] | None, *, seed: int, epoch: int, stream: str,
                counts: Mapping[str, int] | None = None, ids: Sequence[str] | None = None, copies: int = 1,
                coords: Mapping[str, Sequence[float]] | None = None, shuffle: bool = True, rank: int = 0,
                world: int = 1, batch_size: int = 1, steps: int | None = None) -> dict[str, np.ndarray]:
    """One rank's plan of an epoch: the draw (``counts``, or ``ids`` x ``copies``), in a
    whole-epoch seeded order (``shuffle``), this rank's share of ``steps`` batches."""
    plan = epoch_rows(known, counts, ids=ids, copies=copies, coords=coords)
    if shuffle:
        plan = shuffled(plan, seed, epoch, STREAM_TAGS[stream])
    if world > 1 or steps is not None:
        plan = rank_share(plan, rank, world, batch_size, steps)
    return plan
