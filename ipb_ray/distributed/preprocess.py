"""``ipb preprocess``: inputs -> colony catalog, on Ray Data.

The driver plans shards (:mod:`ipb_ray.data.importers`), drops the ones a previous run
finished, and streams the rest through ``ray.data`` so frames are read and segmented in
parallel across the cluster. Each task writes its shard atomically (so a crash loses at
most the shards in flight); the manifest is written last (:mod:`ipb_ray.data.catalog`).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ipb_ray.data import catalog, importers
from ipb_ray.config import ConfigError, DataConfig, ExperimentConfig, from_dict, to_dict

log = logging.getLogger(__name__)
# Numbers, boxes and quoted names vary per reject; the summary counts the kinds.
_REASON_DETAIL = re.compile(r"\[[^\]]*\]|'[^']*'|\d+x\d+|\d+")


@dataclass
class PreprocessSummary:
    catalog: str
    importer: str
    shards: int
    shards_skipped: int
    colonies: int
    counts: dict[str, int]
    rejects: int
    reject_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    folds: list[dict[str, Any]] = field(default_factory=list)
    #: Why no folds were drawn and what to do ("" when folds were drawn).
    folds_note: str = ""
    #: What to look at in the labels (:func:`ipb_ray.data.catalog.label_warnings`).
    warnings: list[str] = field(default_factory=list)


class _ShardWriter:
    """Ray Data UDF: run one shard and write it; returns a one-row summary."""

    def __init__(self, root: str, data: dict[str, Any]):
        self.root = root
        self.data = from_dict(data, DataConfig)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        task = importers.ShardTask.from_json(row["task"])
        t0 = time.perf_counter()
        rows, rejects = importers.run_shard(task, self.data)
        catalog.write_shard(self.root, task.key, rows, rejects)
        return {"key": task.key, "colonies": len(rows), "rejects": len(rejects),
                "seconds": time.perf_counter() - t0}


def build_catalog(cfg: ExperimentConfig, importer: str = "auto", out: str | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  overwrite: bool = False) -> PreprocessSummary:
    """Build (or finish) the catalog of ``cfg.data`` at ``out`` (default ``cfg.data.catalog``).

    A catalog of other inputs already there is refused (``CatalogExistsError``) unless
    ``overwrite``; the same inputs again resume."""
    import ray

    from ipb_ray.distributed.ray_setup import init_ray

    t0 = time.perf_counter()
    root = Path(out or cfg.data.catalog)
    plan = importers.plan(cfg.data, importer)
    plan_key = "plan-" + importers._key(plan.importer, plan.rejects, cfg.data.segmentation)
    keys = [t.key for t in plan.tasks] + [plan_key]
    record = {"importer": plan.importer, "inputs": plan.inputs, "point_box": cfg.data.point_box,
              "segmentation": to_dict(cfg.data.segmentation)}
    todo_keys = set(catalog.begin_build(root, keys, record, overwrite=overwrite))
    if plan_key in todo_keys:
        catalog.write_shard(root, plan_key, [], plan.rejects)
        todo_keys.discard(plan_key)
    todo = [t for t in plan.tasks if t.key in todo_keys]
    total = len(plan.tasks)
    done = total - len(todo)
    if progress:
        progress(done, total)
    log.info("%s: %d shards, %d already done", root, total, done)
    if todo:
        init_ray(cfg.resources)
        from ipb_ray.cluster.paths import check_cluster_paths

        check_cluster_paths(cfg.replace(f"data.catalog={root}"), storage=False)
        ds = ray.data.from_items([{"task": t.to_json()} for t in todo], override_num_blocks=len(todo))
        fn = _ShardWriter(str(root.resolve()), to_dict(cfg.data))
        for _ in ds.map(fn, num_cpus=1).iter_rows():
            done += 1
            if progress:
                progress(done, total)
    manifest = catalog.finish_build(root, keys, {
        "importer": plan.importer, "inputs": plan.inputs,
        "pixel_size_um": cfg.data.pixel_size_um,
        "segmentation": to_dict(cfg.data.segmentation)})
    folds = make_catalog_folds(root, cfg)
    folds_note = "" if folds else why_no_folds(root, cfg)
    reasons: dict[str, int] = {}
    for reason in catalog.read_rejects(root).column("reason").to_pylist():
        kind = _REASON_DETAIL.sub("…", reason.split(":")[0])
        reasons[kind] = reasons.get(kind, 0) + 1
    warnings = [*plan.notes, *catalog.label_warnings(manifest["counts"], cfg.split.folds)]
    for text in warnings:
        log.warning("%s: %s", root, text)
    return PreprocessSummary(str(root), plan.importer, total, total - len(todo), manifest["colonies"],
                             manifest["counts"], manifest["rejects"], reasons,
                             time.perf_counter() - t0, folds.summary() if folds else [], folds_note, warnings)


def make_catalog_folds(root: str | Path, cfg: ExperimentConfig):
    """Draw the CV folds of a finished catalog with ``cfg.split`` and store them beside it.

    Returns the :class:`~ipb_ray.data.folds.FoldPlan`, or None (with a warning) when the
    catalog has too few single-labelled colonies for ``split.folds`` folds. With
    ``split.group_by`` whole groups go to the test folds (:mod:`ipb_ray.data.folds`); a
    grouping the catalog cannot give, or too few groups, raises ConfigError.
    """
    from ipb_ray.data.folds import make_folds, write_folds

    group_by = cfg.split.group_by
    wanted = ["colony_id", "label", "multi_label"]
    if group_by:  # everything a grouping may name, but the pixels
        wanted = [n for n in catalog.SCHEMA.names if n not in ("image", "mask")]
    table = catalog.read_catalog(root, columns=wanted)
    groups = catalog.colony_groups(table, group_by, catalog=str(root)) if group_by else None
    try:
        plan = make_folds(table.column("colony_id").to_pylist(), table.column("label").to_pylist(),
                          table.column("multi_label").to_pylist(), k=cfg.split.folds,
                          labelled_fraction=cfg.split.labelled_fraction,
                          val_fraction=cfg.split.val_fraction, seed=cfg.seed,
                          groups=groups, group_by=group_by)
    except ConfigError:
        raise
    except ValueError as exc:
        why = why_no_folds(root, cfg)
        if not why and group_by:  # labels enough, groups too few: a setting to change
            raise ConfigError(str(exc), key="split.group_by", source=str(root)) from None
        log.warning("%s: no folds drawn: %s", root, why or exc)
        return None
    write_folds(plan, root)
    return plan


def why_no_folds(root: str | Path, cfg: ExperimentConfig) -> str:
    """Why the finished catalog ``root`` has too few labels for ``split.folds`` folds, and
    what to do; "" when it has enough.

    A catalog without labels usually means the annotation rows were rejected (a frame
    path that resolves nowhere, an unknown class, a box on no colony), so the message
    counts them and quotes the first reason.
    """
    table = catalog.read_catalog(root, columns=["label", "multi_label"])
    labels, multi = table.column("label").to_pylist(), table.column("multi_label").to_pylist()
    single = sum(1 for lab, m in zip(labels, multi) if lab is not None and not m)
    k = cfg.split.folds
    if single >= k:
        return ""
    n_multi = sum(1 for m in multi if m)
    if single == 0:
        head = (f"no colony has a single label ({len(labels)} colonies: {n_multi} multi-label, "
                f"{len(labels) - n_multi} unlabelled)")
    else:
        head = f"only {single} single-labelled colonies for split.folds={k}; every test fold needs one"
    rejects = (catalog.read_rejects(root).to_pylist() if (Path(root) / "rejects").is_dir() else [])
    rows = [r for r in rejects if " row " in r["item"]]  # rows of the annotation table
    see = f"see {root}/rejects/ (Parquet: source, item, reason)"
    if rows:
        were = "row was" if len(rows) == 1 else "rows were"
        cause = (f"{len(rows)} annotation {were} rejected, first reason ({rows[0]['item']}): "
                 f"{rows[0]['reason']}; {see}")
        fix = "fix those rows (or data.frames/data.annotations) and rerun `ipb preprocess`"
    elif rejects:
        were = "input was" if len(rejects) == 1 else "inputs were"
        cause = f"{len(rejects)} {were} rejected, first reason ({rejects[0]['source']}): " \
                f"{rejects[0]['reason']}; {see}"
        fix = "fix those inputs and rerun `ipb preprocess`"
    else:
        importer = catalog.read_manifest(root).get("importer")
        if single:
            cause = "nothing was rejected; the inputs label too few colonies"
            fix = "label more colonies and rerun `ipb preprocess`"
        elif importer in ("frames", "synth"):
            cause = "the import read no annotation rows (data.annotations unset or empty)"
            fix = ("set data.annotations to a table with columns frame, x0,y0,x1,y1 (or x,y), label "
                   "and rerun `ipb preprocess`")
        elif importer == "imagefolder":
            cause = "no crops sit in a <root>/<class>/ folder (only multi_label/ or unlabeled/)"
            fix = "put single-label crops in <root>/<class>/ and rerun `ipb preprocess`"
        else:
            cause, fix = "nothing was rejected", "label more colonies and rerun `ipb preprocess`"
    if 2 <= single < k:
        fix += f", or lower split.folds (to at most {single})"
    return f"{head}: {cause}. To fix: {fix}"
