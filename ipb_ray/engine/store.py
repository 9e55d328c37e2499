"""Checkpoints a run keeps itself, on a local (or mounted) path: ``<run dir>/checkpoint_<epoch>``
with ``state.pt`` and ``history.json`` (:mod:`ipb_ray.nn.checkpoint`), written atomically,
the newest few kept. The in-process engine and Ray Train's local mode use them; Ray Train
workers hand the same files to Train instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ipb_ray.nn.checkpoint import CHECKPOINT_FILE, HISTORY_FILE

__all__ = ["keep_epoch", "latest_local_state", "local_checkpoints", "read_history", "save_local", "write_state"]


def write_state(directory: str, state: dict[str, Any]) -> None:
    """``state.pt`` (and ``history.json`` from ``state["history"]``) into ``directory``."""
    import json

    import torch

    if "history" in state:
        with open(os.path.join(directory, HISTORY_FILE), "w") as fh:
            json.dump(state["history"], fh, default=float)
    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))


def local_checkpoints(run_dir: str | Path) -> list[Path]:
    """A local-mode run's finished checkpoint directories, oldest first."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir() and not p.name.endswith(".tmp"))


def save_local(run_dir: str, epoch: int, state: dict[str, Any], keep: int) -> str:
    """A run that keeps its own checkpoints (no Train controller to persist them): write
    ``<run_dir>/checkpoint_<epoch>`` atomically and keep the newest ``keep``; returns it."""
    import shutil

    target = Path(run_dir) / f"checkpoint_{int(epoch):06d}"
    partial = target.with_name(target.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_state(str(partial), state)
    shutil.rmtree(target, ignore_errors=True)  # a finished run's rerun reports its last epoch again
    partial.rename(target)
    for old in local_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return str(target)


def keep_epoch(metrics: dict[str, Any], state: dict[str, Any] | None, run: Any) -> str | None:
    """What every reporter does with an epoch's report before handing it on: the search
    metric in every report (NaN: no V), the epoch's history row to ``run.mlflow_run`` (rank
    0, when an epoch just ran), and, for a run that keeps its own checkpoints
    (``run.local_run_dir``), the checkpoint written there; returns that checkpoint's path."""
    metrics.setdefault("objective", float("nan"))
    live = run.mlflow_run
    if state is not None and live and state.get("history") and "epoch_seconds" in metrics:
        from ipb_ray.tracking.runs import log_epoch

        log_epoch(live[0], live[1], state["history"][-1])
    if state is None or not run.local_run_dir:
        return None
    return save_local(run.local_run_dir, metrics["epoch"], state, run.checkpoints_to_keep)


def latest_local_state(run_dir: str | None) -> dict[str, Any] | None:
    """The newest checkpoint state under ``run_dir`` (None: no directory, or none written yet)."""
    from ipb_ray.nn.checkpoint import load_state

    found = local_checkpoints(run_dir) if run_dir else []
    return load_state(found[-1] / CHECKPOINT_FILE) if found else None


def read_history(checkpoint_dir: str | None) -> list[dict[str, Any]]:
    """Per-epoch metrics stored with a checkpoint (empty when it has none)."""
    import json

    path = os.path.join(checkpoint_dir, HISTORY_FILE) if checkpoint_dir else None
    if not path or not os.path.exists(path):
        return []
    with open(path) as fh:
        return json.load(fh)
