"""U's pseudo-label table and an epoch's draw from it: the pure half of IPB's rebalancing.

The labelling pass (:mod:`ipb_ray.distributed.rebalance`, on Ray Data) fills a
:class:`LabelTable`, one pseudo-label per unlabelled colony; :func:`epoch_plan` draws the
student's epoch from it (every colony weighs 1/n_c of its pseudo-label's class, tempered
and capped by :func:`ipb_ray.patches.balance.pseudo_balance`), reproducible from
``(seed, epoch)``; :func:`pseudo_label_quality` and :func:`draw_figures` say how good the
pseudo-labels and the draw are where U's labels are known. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ipb_ray.patches.balance import PseudoBalance, pseudo_balance

__all__ = ["EpochPlan", "LabelTable", "class_histogram", "draw_figures", "epoch_plan", "pseudo_label_quality", "pseudo_label_tpr", "steps_per_epoch"]

_DRAW_TAG = 0x5EED


@dataclass
class LabelTable:
    """One pseudo-label per unlabelled colony, sorted by colony id (so the draw does not
    depend on which worker labelled what). ``truth``: hidden class index, -1 = unknown or
    multi-label. Windows ``x``, ``y``, ``scale`` locate the labelled patch."""

    colony_id: np.ndarray
    pseudo: np.ndarray
    confidence: np.ndarray
    truth: np.ndarray
    x: np.ndarray
    y: np.ndarray
    scale: np.ndarray
    probs: np.ndarray | None = None  # (N, C) the labeller's class probabilities (None: not kept)
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        n = len(self.colony_id)
        for name in ("pseudo", "confidence", "truth", "x", "y", "scale"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"LabelTable.{name} has {len(getattr(self, name))} rows, colony_id has {n}")
        if self.probs is not None and len(self.probs) != n:
            raise ValueError(f"LabelTable.probs has {len(self.probs)} rows, colony_id has {n}")
        self._index = {c: i for i, c in enumerate(self.colony_id.tolist())}

    @staticmethod
    def from_rows(rows: Mapping[str, Sequence[Any]]) -> "LabelTable":
        """Build from columns (any order, e.g. the labelling stage's batches concatenated)."""
        ids = np.asarray(rows["colony_id"], dtype=object)
        order = np.argsort(ids.astype(str), kind="stable")
        if len(set(ids.tolist())) != len(ids):
            raise ValueError("the labelling pass returned a colony twice; every colony must be labelled once")
        probs = rows.get("probs")
        return LabelTable(ids[order], np.asarray(rows["pseudo"], np.int64)[order],
                          np.asarray(rows["confidence"], np.float32)[order],
                          np.asarray(rows["truth"], np.int64)[order], np.asarray(rows["x"], np.int32)[order],
                          np.asarray(rows["y"], np.int32)[order], np.asarray(rows["scale"], np.float32)[order],
                          None if probs is None or not len(probs) else np.asarray(probs, np.float32)[order])

    def __len__(self) -> int:
        return len(self.colony_id)

    def lookup(self, colony_ids: Sequence[str]) -> np.ndarray:
        """Row index of each colony id (KeyError names an unknown one)."""
        try:
            return np.array([self._index[c] for c in colony_ids], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"colony {exc.args[0]!r} is not in the pseudo-label table") from None

    def with_labels(self, colony_ids: Sequence[str], pseudo: Sequence[int]) -> "LabelTable":
        """A copy with new pseudo-labels for some colonies (the last one given wins): the
        reuse option feeds the labels of an epoch's MPL steps back this way."""
        new = self.pseudo.copy()
        if len(colony_ids):
            new[self.lookup(colony_ids)] = np.asarray(pseudo, np.int64)
        return LabelTable(self.colony_id, new, self.confidence, self.truth, self.x, self.y, self.scale, self.probs)

    def to_dict(self) -> dict[str, list[Any]]:
        out = {k: getattr(self, k).tolist() for k in ("colony_id", "pseudo", "confidence", "truth", "x", "y",
                                                       "scale")}
        if self.probs is not None:
            out["probs"] = self.probs.tolist()
        return out


@dataclass(frozen=True)
class EpochPlan:
    """What the student's unlabelled stream holds in one epoch."""

    counts: dict[str, int]  # copies per colony id (sum = n_draws)
    coords: dict[str, tuple[int, int, float]] | None  # fixed windows (IPB) or None (fresh random windows)
    n_draws: int
    balance: PseudoBalance | None  # the draw's statistics (IPB only)


def steps_per_epoch(n_draws: int, world: int, batch_size: int) -> int:
    """Full unlabelled batches every rank gets from ``n_draws`` patches."""
    return int(n_draws) // (max(world, 1) * int(batch_size))


def epoch_plan(unlabelled: Sequence[str], table: LabelTable | None, num_classes: int, seed: int, epoch: int,
               n_draws: int, class_names: Sequence[str] | None = None, **draw: Any) -> EpochPlan:
    """The student's stream of one epoch: ``n_draws`` patches.

    With a ``table`` (IPB): the paper's pseudo-balanced multinomial draw over its colonies
    at their labelled windows (``draw``: :func:`ipb_ray.patches.balance.pseudo_balance`'s
    settings: threshold, alpha, max_copies, counts). Without (plain MPL): each colony of ``unlabelled`` once at a
    fresh window, in a seeded random subset when ``n_draws`` < |U| (and whole rounds plus
    a subset when it is larger), so every epoch streams the data as it is."""
    if n_draws < 0:
        raise ValueError(f"n_draws must be >= 0, got {n_draws}")
    if table is not None:
        pb = pseudo_balance(table.pseudo, num_classes, seed, epoch, n_draws=n_draws, class_names=class_names,
                            confidence=table.confidence, probs=table.probs, **draw)
        drawn = np.flatnonzero(pb.counts)
        ids = table.colony_id[drawn].tolist()
        counts = dict(zip(ids, pb.counts[drawn].tolist()))
        coords = {c: (int(table.x[i]), int(table.y[i]), float(table.scale[i])) for c, i in zip(ids, drawn)}
        return EpochPlan(counts, coords, int(n_draws), pb)
    ids = sorted(unlabelled)
    if not ids:
        return EpochPlan({}, None, 0, None)
    rounds, rest = divmod(int(n_draws), len(ids))
    copies = np.full(len(ids), rounds, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, _DRAW_TAG]))
    copies[rng.permutation(len(ids))[:rest]] += 1
    return EpochPlan({c: int(k) for c, k in zip(ids, copies) if k}, None, int(n_draws), None)


def class_histogram(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts per class of the labels >= 0 (unknown = -1 is left out)."""
    lab = np.asarray(labels, dtype=np.int64)
    return np.bincount(lab[lab >= 0], minlength=num_classes).astype(np.int64)


def pseudo_label_tpr(table: LabelTable, num_classes: int) -> tuple[np.ndarray, float]:
    """How often the teacher's pseudo-label is the hidden true class, per true class
    (NaN where the class has no colony with a known label), and over all known colonies."""
    known = table.truth >= 0
    acc = float((table.pseudo[known] == table.truth[known]).mean()) if known.any() else float("nan")
    return pseudo_label_quality(table, num_classes)["recall"], acc


def pseudo_label_quality(table: LabelTable, num_classes: int) -> dict[str, np.ndarray]:
    """Per class, against the hidden labels of U (colonies without one are left out):
    ``precision`` (of the colonies called c, the share that are c), ``recall`` (of the
    colonies that are c, the share called c), ``called`` and ``true`` counts. NaN where a
    class is never called (precision) or has no colony (recall)."""
    known = table.truth >= 0
    t, p = table.truth[known], table.pseudo[known]
    hits = np.bincount(t[p == t], minlength=num_classes).astype(np.float64)
    called = np.bincount(p, minlength=num_classes).astype(np.float64)
    true = np.bincount(t, minlength=num_classes).astype(np.float64)
    precision, recall = np.full(num_classes, np.nan), np.full(num_classes, np.nan)
    np.divide(hits, called, out=precision, where=called > 0)
    np.divide(hits, true, out=recall, where=true > 0)
    return {"precision": precision, "recall": recall, "called": called, "true": true}


def draw_figures(plan: EpochPlan, table: LabelTable, num_classes: int) -> dict[str, Any]:
    """What an epoch's pseudo-balanced draw holds: each pseudo-class's share of the draws
    (``draw_share``), each hidden true class's share (``draw_true_share``, colonies with a
    known label), the share of draws whose pseudo-label is right (``draw_precision``), the
    most copies of any one colony (``max_copies``) and how many colonies were drawn."""
    if not plan.counts:
        return {"max_copies": 0, "drawn_colonies": 0, "draw_precision": float("nan"),
                "draw_share": np.zeros(num_classes), "draw_true_share": np.zeros(num_classes)}
    rows = table.lookup(list(plan.counts))
    k = np.asarray(list(plan.counts.values()), np.int64)
    pseudo, truth = table.pseudo[rows], table.truth[rows]
    by_pseudo = np.bincount(pseudo, weights=k, minlength=num_classes)
    known = truth >= 0
    by_truth = np.bincount(truth[known], weights=k[known], minlength=num_classes)
    right = float(k[known & (pseudo == truth)].sum())
    return {"max_copies": int(k.max()), "drawn_colonies": int(len(k)),
            "draw_precision": right / float(k[known].sum()) if known.any() else float("nan"),
            "draw_share": by_pseudo / max(by_pseudo.sum(), 1.0),
            "draw_true_share": by_truth / max(by_truth.sum(), 1.0)}
