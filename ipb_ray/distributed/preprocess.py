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
from ipb_ray.config import DataConfig, ExperimentConfig, from_dict, to_dict
from ipb_ray.data.fold_views import make_catalog_folds, why_no_folds

__all__ = ["PreprocessSummary", "build_catalog"]

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
