"""Cross-validation of one configuration: every fold on Ray Train, tracked in MLflow.

:func:`run_cv` runs the folds of ``cfg`` (all of them by default), each as its own
``TorchTrainer`` (:func:`ipb_ray.distributed.training.train_fold`), logs each finished fold as a
child run of the configuration's parent run (:mod:`ipb_ray.tracking.runs`), and finally the
mean ± std over folds. Rerunning the same command skips folds whose child run finished
and resumes unfinished ones from their Ray Train checkpoints.

Folds run ``parallel`` at a time. The default is what the cluster holds without
starving anyone: its CPUs divided by what one fold takes (the Train workers' CPUs plus
one for its data tasks), at most the number of folds; on a 2-core machine that is one.

The catalog's stored fold plan must match ``cfg.split``; when it does not, the folds are
drawn into a view of the catalog (:mod:`ipb_ray.data.fold_views`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ipb_ray.config import ExperimentConfig
from ipb_ray.data.fold_views import fold_catalog

__all__ = ["CVResult", "default_parallel", "run_cv"]

log = logging.getLogger(__name__)


@dataclass
class CVResult:
    parent_run_id: str
    reports: dict[int, dict[str, Any]]  # fold -> test report
    summary: dict[str, Any]  # ipb_ray.evaluation.stats.aggregate_folds of the reports
    skipped: list[int]  # folds found finished in MLflow
    catalog: str  # the catalog (or view) whose folds ran


def default_parallel(cfg: ExperimentConfig, n_folds: int) -> int:
    """Folds the cluster can run at once (see the module docstring); one at a time when
    folds run in this process (``resources.runner``: each one uses every core already)."""
    import ray

    from ipb_ray.distributed.training import runs_in_process

    if runs_in_process(cfg):
        return 1
    r = cfg.resources
    per_fold = max(r.num_workers, 1) * r.cpus_per_worker + 1.0
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    if r.use_gpu:
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        per_gpu = max(r.num_workers, 1) * r.gpus_per_worker
        cap = int(gpus // per_gpu) if per_gpu > 0 else n_folds
        return max(1, min(n_folds, int(cpus // per_fold), cap))
    return max(1, min(n_folds, int(cpus // per_fold)))


def run_cv(cfg: ExperimentConfig, folds: Sequence[int] | None = None, *, parallel: int | None = None,
           log_model: bool = True, run_name: str | None = None,
           on_event: Callable[[str, int, dict[str, Any]], None] | None = None) -> CVResult:
    """Run (or finish) the cross-validation of ``cfg``; see the module docstring.

    ``folds``: which folds (default: all of the plan's). ``on_event(kind, fold, info)``
    is called with ``"skipped"``, ``"started"`` and ``"finished"`` (info: the fold's
    metrics) for progress displays; calls may come from worker threads.
    """
    from ipb_ray.tracking import runs as tracking
    from ipb_ray.cluster.paths import check_cluster_paths
    from ipb_ray.data.folds import read_folds
    from ipb_ray.distributed.ray_setup import init_ray
    from ipb_ray.distributed.fold import run_fold
    from ipb_ray.distributed.training import needs_ray

    connected = needs_ray(cfg)  # folds in this process need no Ray, unless a cluster is named
    if connected:
        init_ray(cfg.resources)
    check_cluster_paths(cfg, connected=connected)
    root = fold_catalog(cfg)
    cfg = cfg.replace(f"data.catalog={root}")
    k = read_folds(root).k
    todo = list(range(k)) if folds is None else list(folds)
    bad = [f for f in todo if not 0 <= f < k]
    if bad:
        raise ValueError(f"folds {bad} do not exist: {root} has folds 0..{k - 1}")
    uri, experiment = cfg.tracking.tracking_uri, cfg.tracking.experiment
    parent = tracking.open_parent(uri, experiment, cfg, run_name=run_name)
    done = tracking.finished_folds(uri, parent)
    reports: dict[int, dict[str, Any]] = {f: done[f] for f in todo if f in done}
    skipped = sorted(reports)
    event = on_event or (lambda kind, fold, info: None)
    for f in skipped:
        event("skipped", f, {"test_report": done[f]})
    lock = threading.Lock()

    def one(fold: int) -> None:
        event("started", fold, {})
        with lock:
            child = tracking.open_fold(uri, parent, fold, cfg)  # the epochs reach MLflow as they end
        metrics = run_fold(cfg, fold, mlflow_run=(tracking.absolute_uri(uri), child))
        with lock:  # one MLflow writer at a time
            tracking.log_fold(uri, parent, fold, metrics, cfg, log_model=log_model, child_id=child)
            reports[fold] = metrics["test_report"]
        event("finished", fold, metrics)

    pending = [f for f in todo if f not in reports]
    width = parallel or default_parallel(cfg, len(pending) or 1)
    if cfg.resources.num_workers == 0 and width > 1:  # local mode: Ray Train keeps one run per process
        log.info("resources.num_workers=0 trains in this process: folds run one after another")
        width = 1
    if width <= 1:
        for fold in pending:
            one(fold)
    else:
        with concurrent.futures.ThreadPoolExecutor(width, thread_name_prefix="ipb-fold") as pool:
            for fut in concurrent.futures.as_completed([pool.submit(one, f) for f in pending]):
                fut.result()
    summary = tracking.log_summary(uri, parent, dict(sorted(reports.items())))
    return CVResult(parent, dict(sorted(reports.items())), summary, skipped, root)

