"""IPB's per-epoch pseudo-label rebalancing: the labelling pass on Ray Data and the draw.

At the start of every IPB epoch (shared/IPB.md, step 2a):

1. **Labelling pass** (Ray Data): one fresh random window of every unlabelled colony is
   cut (stream mode ``label``, seeded by ``(seed, epoch, colony)``) and the current
   teacher predicts its class. The stage is :class:`TeacherLabeller`; it reads the
   epoch and the teacher weights that rank 0 published on a :class:`~ipb_ray.distributed.streams.StreamState`
   actor, and loads a new teacher only when the published version changes. On CPU it
   runs as Ray tasks (their processes outlive an epoch, so the teacher's module is built
   once per process); with GPUs as an actor pool holding a GPU each.
2. **Draw** (pure, :func:`epoch_plan`): every colony weighs 1/n_c of its pseudo-label's
   class and ``n`` windows are drawn from that multinomial with replacement
   (:func:`ipb_ray.patches.balance.pseudo_balance`), reproducible from ``(seed, epoch)``. The
   drawn colonies, their copy counts and the labelled windows go to the student's stream,
   so the student trains on the very patches the teacher labelled, freshly augmented.

Without balancing (plain MPL, ``method.name=mpl``) there is no labelling pass: every
unlabelled colony appears once per epoch at a fresh random window.

With ``method.pseudo_balance.relabel=reuse`` the pass runs only in the first epoch of a run; later
epochs draw on the pseudo-labels the teacher gave during the previous epoch's MPL steps
(a colony not drawn then keeps its older label and window).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ipb_ray.patches.balance import PseudoBalance, pseudo_balance
from ipb_ray.distributed.streams import StreamSpec, current_state, patch_batch, state_handle

log = logging.getLogger(__name__)

_DRAW_TAG = 0x5EED


# --------------------------------------------------------------------------- pure part

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


# --------------------------------------------------------------------------- Ray Data stage

LABEL_COLUMNS = ("colony_id", "truth", "x", "y", "scale", "pseudo", "confidence", "probs")


def _empty_labels() -> dict[str, np.ndarray]:
    return {"colony_id": np.array([], dtype=object), "truth": np.zeros(0, np.int64), "x": np.zeros(0, np.int32),
            "y": np.zeros(0, np.int32), "scale": np.zeros(0, np.float32), "pseudo": np.zeros(0, np.int64),
            "confidence": np.zeros(0, np.float32), "probs": np.zeros((0, 0), np.float32)}


class TeacherLabeller:
    """``map_batches`` stage: rows -> one pseudo-labelled window per colony.

    Rows are catalog rows (PNG bytes; the colonies to label are the state's counts) or,
    with ``cache`` (an :class:`ipb_ray.distributed.epoch_stream.CropCache`), plan rows cut
    from the decoded crops. Reads the epoch and the teacher from the named
    :class:`~ipb_ray.distributed.streams.StreamState`; rebuilds nothing but the weights when rank 0
    publishes a new teacher version. ``model_kwargs`` are
    :func:`ipb_ray.nn.models.create_model`'s arguments."""

    def __init__(self, spec: StreamSpec, state_name: str, model_kwargs: Mapping[str, Any], device: str = "cpu",
                 cache: Any = None):
        import torch

        from ipb_ray.nn.models import create_model

        if spec.mode != "label":
            raise ValueError(f"the labelling stage needs a stream of mode 'label', got {spec.mode!r}")
        if device == "cpu":
            torch.set_num_threads(1)  # one CPU per data task; no oversubscription
        self.spec, self.state_name, self.device, self.cache = spec, state_name, torch.device(device), cache
        self.model = create_model(**model_kwargs).to(self.device).eval()
        self.version = None

    def _refresh(self) -> None:
        import ray
        import torch

        version, refs = ray.get(state_handle(self.state_name).teacher.remote())
        if not refs:
            raise RuntimeError(f"no teacher has been published on {self.state_name}; rank 0 publishes it "
                               "before the labelling pass")
        if version != self.version:
            weights = ray.get(refs[0])
            self.model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
            self.version = version

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        epoch, counts, _ = current_state(self.state_name)
        if self.cache is not None:
            from ipb_ray.distributed.epoch_stream import cut_plan, unpack_plan, views_of

            rows = cut_plan(unpack_plan(batch), self.spec, epoch, views_of(self.cache))
        else:
            rows = patch_batch(batch, self.spec, epoch, counts)
        if not len(rows["colony_id"]):
            return _empty_labels()
        self._refresh()
        with torch.no_grad():
            out = self.model(*[torch.from_numpy(rows[c]).to(self.device) for c in self.spec.patch_columns()])
            probs = torch.softmax((out[0] if isinstance(out, (tuple, list)) else out).float(), dim=1).cpu()
        confidence, pseudo = probs.max(dim=1)
        return {"colony_id": rows["colony_id"], "truth": rows["label"], "x": rows["x"], "y": rows["y"],
                "scale": rows["scale"], "pseudo": pseudo.numpy().astype(np.int64),
                "confidence": confidence.numpy().astype(np.float32), "probs": probs.numpy().astype(np.float32)}


_LABELLERS: dict[tuple[str, str], TeacherLabeller] = {}


def _label_task(batch: dict[str, np.ndarray], spec: StreamSpec, state_name: str,
                model_kwargs: Mapping[str, Any], cache: Any = None) -> dict[str, np.ndarray]:
    """Task form of :class:`TeacherLabeller`: one labeller per worker process, kept between
    epochs (an actor pool would start new processes every epoch)."""
    key = (state_name, repr(sorted(model_kwargs.items())), cache.key if cache is not None else "")
    labeller = _LABELLERS.get(key)
    if labeller is None:
        labeller = _LABELLERS[key] = TeacherLabeller(spec, state_name, model_kwargs, cache=cache)
    return labeller(batch)


def labelling_dataset(catalog_dir: str, spec: StreamSpec, state_name: str, model_kwargs: Mapping[str, Any], *,
                      batch_size: int = 64, cpus: float = 1.0, actors: int = 1, gpus: float = 0.0,
                      use_actors: bool = False, workers: int | None = None, cache: Any = None,
                      ids: Sequence[str] | None = None):
    """A lazy ``ray.data.Dataset`` of :data:`LABEL_COLUMNS`: the labelling pass over the
    colonies that ``state_name`` counts, by the teacher published there.

    With ``cache`` (the run's :class:`ipb_ray.distributed.epoch_stream.CropCache`) the
    windows are cut from the decoded crops of ``ids`` (the colonies to label), not read and
    decoded from the catalog's Parquet. ``use_actors``: an actor pool of ``actors``
    labellers holding ``gpus`` each (for GPU clusters); otherwise Ray tasks of ``cpus``
    each, at most ``workers`` at once (default: as many as the free CPUs allow)."""
    import ray

    from ipb_ray.data import catalog
    from ipb_ray.distributed.streams import CATALOG_COLUMNS

    if cache is not None:
        from ipb_ray.distributed.epoch_stream import plan_source
        from ipb_ray.patches.plan import epoch_rows

        if ids is None:
            raise ValueError("a labelling pass over the crop cache needs the ids to label")
        ds = plan_source(epoch_rows(cache.ids, ids=sorted(ids)), batch_size, max(int(workers or actors), 1))
    else:
        catalog.read_manifest(catalog_dir)
        ray.data.DataContext.get_current().use_datasource_v2 = False  # see streams.patch_dataset
        ds = ray.data.read_parquet(f"{catalog_dir}/parts", columns=CATALOG_COLUMNS, num_cpus=cpus)
    rows = 1 if cache is not None else batch_size  # a plan source row holds a whole batch
    if use_actors:
        return ds.map_batches(TeacherLabeller, batch_size=rows, batch_format="numpy",
                              fn_constructor_kwargs=dict(spec=spec, state_name=state_name, model_kwargs=model_kwargs,
                                                         device="cuda" if gpus > 0 else "cpu", cache=cache),
                              compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
                              **({"num_gpus": gpus} if gpus > 0 else {}))
    extra = {"compute": ray.data.TaskPoolStrategy(size=workers)} if workers else {}
    return ds.map_batches(_label_task, batch_size=rows, batch_format="numpy", num_cpus=cpus, **extra,
                          fn_kwargs=dict(spec=spec, state_name=state_name, model_kwargs=dict(model_kwargs),
                                         cache=cache))


def run_labelling(dataset) -> LabelTable:
    """Execute a labelling dataset and collect its rows into a :class:`LabelTable`."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in LABEL_COLUMNS}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for k in LABEL_COLUMNS:
            parts[k].append(np.asarray(batch[k]))
    parts["probs"] = [p for p in parts["probs"] if p.size]  # empty batches carry a (0, 0) block
    cols = {k: np.concatenate(v) if v else _empty_labels()[k] for k, v in parts.items()}
    cols["colony_id"] = cols["colony_id"].astype(object)
    return LabelTable.from_rows(cols)
