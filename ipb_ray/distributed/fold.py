"""One fold, run the one way every entry point runs it: ``ipb train``, each fold of
``ipb cv`` and each trial of ``ipb tune`` call :func:`run_fold`.

It trains and tests the fold on Ray Train (:func:`ipb_ray.distributed.training.train_fold`:
stages, selection on V, the test on T, checkpoints, the MLflow epochs when a run is given)
and draws the run's curves beside its checkpoint. What each entry point does around it
stays with it: the CLI prints, ``ipb cv`` opens and closes the MLflow child runs, a trial
reports to Tune.
"""

from __future__ import annotations

from typing import Any

from ipb_ray.config import ExperimentConfig

__all__ = ["run_fold"]


def run_fold(cfg: ExperimentConfig, fold: int, *, mlflow_run: tuple[str, str] | None = None,
             callbacks: list[Any] | None = None, curves: bool = True) -> dict[str, Any]:
    """Train and test fold ``fold`` of ``cfg`` (its catalog already the one whose folds
    ``cfg.split`` asks for: :func:`ipb_ray.data.fold_views.resolve_fold_catalog`); returns
    the run's metrics (``test_report``, ``history``, ``checkpoint``, ...), with ``curves``:
    the path of ``curves.png`` when the run's directory is on this machine."""
    from ipb_ray.distributed.training import local_run_dir, train_fold

    metrics = train_fold(cfg, fold, callbacks=callbacks, mlflow_run=mlflow_run)
    run_dir = local_run_dir(metrics)
    if curves and metrics.get("history") and run_dir:
        from ipb_ray.tracking.viz import save_training_curves

        path = save_training_curves(metrics["history"], metrics["test_report"]["class_names"], run_dir / "curves.png",
                                    title=f"{cfg.name} {cfg.method.name} fold {fold}")
        metrics["curves"] = str(path)
    return metrics
