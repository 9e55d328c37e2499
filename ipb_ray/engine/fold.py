"""One fold as the engine sees it: the colonies of its roles (:class:`FoldInputs`), the
patch streams it needs (:class:`Streams`), the whole typed record a run starts from
(:class:`FoldRun`), and the arithmetic of its epochs (steps, the labelled draw). Pure:
no Ray, no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ipb_ray.config import ExperimentConfig
from ipb_ray.patches.core import StreamSpec

__all__ = ["FoldInputs", "FoldRun", "Streams", "calibration_counts", "check_fold", "eval_batch", "fold_inputs",
           "labelled_draws",
           "labelled_steps", "local_run_storage", "own_run_dir", "run_name", "storage_uri", "stream_specs",
           "unlabelled_steps"]


@dataclass(frozen=True)
class FoldInputs:
    """Colony ids of one fold's roles and the labels of L (class indices)."""

    catalog: str
    class_names: tuple[str, ...]
    labelled: tuple[str, ...]
    labelled_labels: tuple[int, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]
    unlabelled: tuple[str, ...]
    unlabelled_truth: tuple[int, ...] = ()  # hidden class of each U colony, -1 = unknown/multi-label (metrics only)
    pixel_mean: float = 0.0  # the catalog's pixel statistics ([0, 1] units), applied inside the model
    pixel_std: float = 1.0


def fold_inputs(cfg: ExperimentConfig, fold: int) -> FoldInputs:
    """Read the catalog manifest and the stored folds; check the fold can be trained."""
    from ipb_ray.data import catalog
    from ipb_ray.data.folds import read_folds

    root = cfg.data.catalog
    names = tuple(cfg.data.class_names or catalog.read_manifest(root)["class_names"])
    plan = read_folds(root)
    if not 0 <= fold < plan.k:
        raise ValueError(f"fold {fold} does not exist: {root} has folds 0..{plan.k - 1} "
                         "(set split.fold, or redraw with `ipb folds split.folds=N`)")
    roles = plan.roles(fold)
    table = plan.table.filter(np.asarray(plan.table.column("fold").to_numpy() == fold))
    label_of = dict(zip(table.column("colony_id").to_pylist(), table.column("label").to_pylist()))
    index = {n: i for i, n in enumerate(names)}
    missing = sorted({label_of[c] for c in roles["L"]} - set(index))
    if missing:
        raise ValueError(f"labels {missing} of {root} are not in data.class_names {list(names)}")
    if not roles["L"]:
        raise ValueError(f"fold {fold} of {root} has no labelled colonies; raise split.labelled_fraction")
    unlabelled = roles["U"]
    if not cfg.data.multi_label:  # the paper's "ML" switch off: multi-label colonies stay out of U
        multi = catalog.read_catalog(root, columns=["colony_id", "multi_label"])
        drop = {c for c, flag in zip(multi.column("colony_id").to_pylist(), multi.column("multi_label").to_pylist())
                if flag}
        unlabelled = [c for c in unlabelled if c not in drop]
    # Train workers run in their own working directory: hand them an absolute local path
    where = root if "://" in str(root) else os.path.abspath(root)
    mean, std = catalog.normalisation(root)
    return FoldInputs(where, names, tuple(roles["L"]), tuple(index[label_of[c]] for c in roles["L"]),
                      tuple(roles["V"]), tuple(roles["T"]), tuple(unlabelled),
                      tuple(index.get(label_of.get(c), -1) for c in unlabelled), mean, std)


def labelled_steps(n_labelled: int, world: int, batch_size: int, steps_per_epoch: int | None) -> int:
    """Optimizer steps per epoch on the labelled stream: ``method.steps_per_epoch``, or one
    pass over L (|L| draws) rounded up to whole batches on every worker (at least one)."""
    if steps_per_epoch:
        return int(steps_per_epoch)
    return max(1, -(-int(n_labelled) // (max(world, 1) * batch_size)))


def labelled_draws(inputs: FoldInputs, n: int, seed: int, epoch: int, balanced: bool = True) -> dict[str, int]:
    """Copies of each labelled colony in an epoch's draw of ``n`` from L (class-balanced
    unless ``balanced`` is False; :func:`ipb_ray.patches.balance.resample_counts`); colonies not
    drawn are left out."""
    from ipb_ray.patches.balance import resample_counts

    counts = resample_counts(inputs.labelled_labels, n, seed, epoch, balanced=balanced)
    return {cid: int(c) for cid, c in zip(inputs.labelled, counts) if c}


def eval_batch(cfg: ExperimentConfig) -> int:
    """Windows per forward pass when a network only predicts (validation, test, labelling)."""
    return cfg.eval.batch_size or cfg.method.batch_size


def calibration_counts(cfg: ExperimentConfig, inputs: FoldInputs) -> dict[str, int]:
    """Copies of each labelled colony in the BatchNorm calibration stream: ``eval.bn_batches``
    batches drawn from L in the class mix the networks train on (class-balanced unless
    ``method.balance_labelled=false``), seeded. Statistics of the natural mix would shift
    every feature toward the majority class (on BCCD, 85 % RBC) and bias eval-mode
    predictions away from it."""
    return labelled_draws(inputs, cfg.eval.bn_batches * cfg.method.batch_size, cfg.seed, 0,
                          cfg.method.balance_labelled)


def unlabelled_steps(n_unlabelled: int, world: int, m: Any) -> int:
    """Steps per unlabelled epoch on every worker: ``method.steps_per_epoch``, or the full
    batches of ``method.draws_per_epoch`` (default |U|) draws; refuses a stream that makes
    no full batch."""
    from ipb_ray.patches.pseudo_labels import steps_per_epoch

    n_u = m.draws_per_epoch or n_unlabelled
    steps = m.steps_per_epoch or steps_per_epoch(n_u, world, m.unlabelled_batch_size)
    if steps == 0:
        raise ValueError(f"{n_u} unlabelled patches per epoch make less than one batch of "
                         f"method.unlabelled_batch_size={m.unlabelled_batch_size} for each of {world} worker(s); "
                         "lower method.unlabelled_batch_size or raise method.draws_per_epoch")
    return int(steps)


def run_name(cfg: ExperimentConfig, fold: int) -> str:
    return f"{cfg.name}-{cfg.method.name}-fold{fold}"


def check_fold(cfg: ExperimentConfig, fold: int, inputs: FoldInputs, semi: bool, world: int) -> None:
    """Refuse, before anything starts, a semi-supervised run whose fold has no unlabelled
    colonies or too few of them for one batch on each of ``world`` ranks."""
    if semi and not inputs.unlabelled:
        raise ValueError(f"fold {fold} of {inputs.catalog} has no unlabelled colonies; method.name="
                         f"{cfg.method.name} needs some (lower split.labelled_fraction, or use a supervised method)")
    if semi:
        try:
            unlabelled_steps(len(inputs.unlabelled), max(world, 1), cfg.method)
        except ValueError as exc:
            raise ValueError(f"fold {fold}: {exc}") from None


def storage_uri(path: str) -> str:
    """Run storage: a URI (``s3://``, ``gs://``, ...) as given, a local path made absolute
    (Train workers run in their own working directories)."""
    return path if "://" in path else os.path.abspath(path)


def own_run_dir(cfg: ExperimentConfig, fold: int) -> str:
    """Where a run that keeps its own checkpoints (in this process, or Ray Train's local
    mode, with no controller to persist them) keeps them: ``<storage>/<run name>``, as
    Train would; refuses remote storage."""
    where = cfg.tracking.storage_path
    if "://" in where:
        raise ValueError(f"resources.num_workers=0 trains in this process and keeps checkpoints itself, on a "
                         f"local path; tracking.storage_path={where!r} is remote. Use resources.num_workers>=1 "
                         "for remote storage, or give a local (or mounted) tracking.storage_path")
    return os.path.join(storage_uri(where), run_name(cfg, fold))


def local_run_storage(cfg: ExperimentConfig, fold: int) -> str | None:
    """:func:`own_run_dir` for a run without Train workers (``resources.num_workers=0``);
    None with them (Train persists their checkpoints)."""
    return None if cfg.resources.num_workers > 0 else own_run_dir(cfg, fold)



@dataclass(frozen=True)
class Streams:
    """The patch streams of a run: ``train`` (augmented L, ``augment.*``), ``eval`` (V and T,
    ``eval.tta`` windows per colony), ``plain`` (un-augmented L for BatchNorm
    recalibration) and, for a semi-supervised method, ``uda`` (weak and strong views of U)
    and ``label`` (the labelling pass's windows of U)."""

    train: StreamSpec
    eval: StreamSpec
    plain: StreamSpec
    uda: StreamSpec | None = None
    label: StreamSpec | None = None


def stream_specs(cfg: ExperimentConfig, class_names: tuple[str, ...], semi: bool) -> Streams:
    """The :class:`Streams` a run of ``cfg`` needs (``uda`` and ``label`` when ``semi``)."""
    from ipb_ray.patches.geometry import PatchGeometry

    geometry, aug = PatchGeometry.from_config(cfg.data), cfg.augment

    def spec(mode: str, **kwargs: Any) -> StreamSpec:
        return StreamSpec(geometry, class_names, seed=cfg.seed, mode=mode, **kwargs)

    extra = dict(uda=spec("uda", augment=aug), label=spec("label")) if semi else {}
    return Streams(train=spec("train", augment=aug), eval=spec("test", tta=cfg.eval.tta), plain=spec("plain"), **extra)


@dataclass(frozen=True)
class FoldRun:
    """Everything a run of one fold starts from, whatever runs it (a Ray Train worker or
    this process): the experiment configuration as a dict (it is written into every
    checkpoint), the fold's colonies, its streams, and where its checkpoints, MLflow
    epochs and parameter digests go."""

    config: dict[str, Any]
    inputs: FoldInputs
    streams: Streams
    local_run_dir: str | None = None  # a run that keeps its own checkpoints (no Train controller)
    checkpoints_to_keep: int = 2
    mlflow_run: tuple[str, str] | None = None  # (tracking URI, run id): every epoch's history row goes there
    digest_dir: str | None = None  # lets tests compare the ranks' final parameters
