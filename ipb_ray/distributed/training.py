"""Training one fold on Ray Train: the engine (:mod:`ipb_ray.engine`) on DDP workers.

Driver side (:func:`train_fold`): read the fold's roles, build the run's record
(:class:`ipb_ray.engine.fold.FoldRun`), decode the catalog's crops into the object store
once per process (:func:`ipb_ray.distributed.epoch_stream.crop_cache`), lease the actors
that carry rank 0's plan of U and the labeller's weights, and run a ``TorchTrainer``.
Worker side (:func:`_train_loop`): the engine with Ray's ports: DDP collectives, patch
streams cut by Ray Data tasks, the plan board on an actor, the labelling pass on Ray
Data, and ``ray.train.report`` with a checkpoint written by rank 0 that holds everything
needed to resume. A killed worker restarts the group from the latest checkpoint
(``FailureConfig``); rerunning the same run name resumes it. ``docs/methods.md`` lists
the history and checkpoint keys.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ipb_ray.config import ExperimentConfig, to_dict
from ipb_ray.engine.fold import (FoldRun, check_fold, eval_batch, fold_inputs, local_run_storage, run_name,
                                 storage_uri, stream_specs)
from ipb_ray.engine.store import keep_epoch, latest_local_state, read_history, write_state
from ipb_ray.nn.checkpoint import CHECKPOINT_FILE
from ipb_ray.patches.core import StreamSpec

__all__ = [
    "RayBoard", "RayCollective", "RayLabeller", "RayPatches", "RayWiring", "TrainReporter", "URI_SCHEMES",
    "checkpoint_locations", "data_workers", "local_run_dir", "needs_ray", "report_epoch", "runs_in_process", "train_fold",
    "worker_device",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayWiring:
    """What Ray's ports of one run share across its workers: the crop cache, how many
    patch tasks a stream may run at once, and the names of the run's two state actors
    (rank 0's plan of U; the labeller's published weights)."""

    cache: Any
    data_workers: int
    u_state: str | None = None
    label_state: str | None = None


def worker_device(cfg: ExperimentConfig) -> Any:
    """This Train worker's torch device, with ``resources.torch_threads`` applied."""
    import ray.train.torch
    import torch

    if cfg.resources.torch_threads:
        torch.set_num_threads(cfg.resources.torch_threads)
    return ray.train.torch.get_device()


class RayCollective:
    """DDP's collectives (identity without a process group) and Ray Train's barrier."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    @staticmethod
    def _group() -> bool:
        import torch

        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        import ray.train.collective

        ray.train.collective.barrier()

    def all_reduce(self, tensor: Any) -> Any:
        import torch

        if self._group():
            torch.distributed.all_reduce(tensor)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        import torch

        if not self._group():
            return [obj]
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out

    def from_rank_zero(self, obj: Any) -> Any:
        import torch

        if not self._group():
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


class RayPatches:
    """Patch batches of a plan cut from the run's crop cache by Ray Data tasks
    (:func:`ipb_ray.distributed.epoch_stream.plan_batches`)."""

    def __init__(self, wiring: RayWiring, cpus: float, device: Any):
        self.wiring, self.cpus, self.device = wiring, cpus, device
        self.ids = wiring.cache.ids

    def batches(self, spec: StreamSpec, plan: Mapping[str, Any], epoch: int, batch_size: int,
                drop_last: bool = True) -> Any:
        from ipb_ray.distributed.epoch_stream import plan_batches

        return plan_batches(self.wiring.cache, spec, plan, epoch=epoch, batch_size=batch_size,
                            workers=self.wiring.data_workers, cpus=self.cpus, device=str(self.device),
                            drop_last=drop_last)


class RayBoard:
    """Rank 0's plan of U on the run's stream-state actor, read back by every rank."""

    def __init__(self, name: str | None):
        from ipb_ray.distributed.streams import state_handle

        self.handle = state_handle(name) if name else None

    def post(self, epoch: int, counts: Mapping[str, int], coords: Mapping[str, Any] | None) -> None:
        import ray

        ray.get(self.handle.set.remote(epoch, counts, coords))

    def read(self) -> tuple[dict[str, int], dict[str, Any] | None]:
        import ray

        _, _, counts, coords = ray.get(self.handle.get.remote())
        return counts or {}, coords


class RayLabeller:
    """The labelling pass on Ray Data (:mod:`ipb_ray.distributed.rebalance`): the weights
    go to the object store when the job is made; the job publishes them on the run's
    label-state actor and labels one fresh window of each colony, cut from the crop cache."""

    def __init__(self, cfg: ExperimentConfig, wiring: RayWiring, spec: StreamSpec):
        self.cfg, self.wiring, self.spec = cfg, wiring, spec

    def job(self, epoch: int, ids: Sequence[str], weights: dict[str, Any],
            model_kwargs: dict[str, Any]) -> Callable[[], Any]:
        import ray

        from ipb_ray.distributed.rebalance import labelling_dataset, run_labelling
        from ipb_ray.distributed.streams import state_handle

        r, name = self.cfg.resources, self.wiring.label_state
        ref, state = ray.put(weights), state_handle(name)
        use_actors = r.label_stage == "actors" or (r.label_stage == "auto" and r.label_gpus > 0)

        def job() -> Any:
            ray.get(state.set.remote(epoch, {cid: 1 for cid in ids}))
            ray.get(state.publish.remote(time.time_ns(), [ref]))
            return run_labelling(labelling_dataset(
                self.wiring.cache.catalog, self.spec, name, model_kwargs,
                batch_size=eval_batch(self.cfg), cpus=r.data_cpus, actors=r.teacher_actors,
                gpus=r.label_gpus, use_actors=use_actors, workers=self.wiring.data_workers, cache=self.wiring.cache,
                ids=ids))

        return job


def report_epoch(metrics: dict[str, Any], state: dict[str, Any] | None, run: FoldRun) -> None:
    """``ray.train.report`` on every rank; rank 0 passes its ``state`` to checkpoint.

    A ``state["history"]`` list (one metrics dict per epoch so far) is also written as
    ``history.json`` beside the weights, so the curves survive with the checkpoint. A run
    with ``run.local_run_dir`` (local mode) keeps its checkpoints there itself; with
    ``run.mlflow_run`` rank 0 logs the epoch's history row there."""
    import ray.train

    kept = keep_epoch(metrics, state, run)  # local mode: kept by the loop itself, Train copies nothing
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if state is not None:
            if kept is None:
                write_state(tmp, state)
            checkpoint = ray.train.Checkpoint.from_directory(kept or tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


class TrainReporter:
    """Ray Train's checkpoints and reports (:func:`report_epoch`); a restarted or resumed
    run's latest state from Train (or, in local mode, from the run's own directory)."""

    def __init__(self, run: FoldRun):
        self.run = run

    def load(self) -> dict[str, Any] | None:
        import ray.train

        from ipb_ray.nn.checkpoint import load_state

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                return load_state(os.path.join(d, CHECKPOINT_FILE))
        return latest_local_state(self.run.local_run_dir)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        report_epoch(metrics, state, self.run)


def _train_loop(config: dict[str, Any]) -> None:
    """Worker side of every run: the engine (:class:`ipb_ray.engine.loop.Engine`) with Ray's ports."""
    import ray.data
    import ray.train.torch

    from ipb_ray.config import from_dict
    from ipb_ray.engine.loop import Engine, Ports

    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    run, wiring = config["run"], config["wiring"]
    cfg = from_dict(run.config)
    device = worker_device(cfg)
    labeller = RayLabeller(cfg, wiring, run.streams.label) if run.streams.label is not None else None
    ports = Ports(RayCollective(), RayPatches(wiring, cfg.resources.data_cpus, device), RayBoard(wiring.u_state),
                  TrainReporter(run), device, ray.train.torch.prepare_model, labeller)
    engine = Engine(run, ports)
    engine.run_all(setup_s=time.perf_counter() - t0)


def train_fold(cfg: ExperimentConfig, fold: int | None = None, *, digest_dir: str | None = None,
               callbacks: list[Any] | None = None, mlflow_run: tuple[str, str] | None = None) -> dict[str, Any]:
    """Train and test one fold; returns the final metrics (with ``test_report``).

    ``callbacks``: Ray Train callbacks for the run (a Tune trial passes
    ``TuneReportCallback`` so every epoch's ``objective`` reaches the scheduler).
    ``mlflow_run``: ``(tracking URI, run id)`` that rank 0 logs every epoch's history row
    to as the epoch ends (:func:`ipb_ray.tracking.runs.log_epoch`).

    ``resources.runner`` decides who runs it: Ray Train, or this process alone
    (:func:`ipb_ray.engine.inprocess.train_fold_in_process`; ``auto``: with
    ``resources.num_workers=0`` outside a Tune trial, i.e. without ``callbacks``)."""
    if runs_in_process(cfg, callbacks):
        from ipb_ray.engine.inprocess import train_fold_in_process

        return train_fold_in_process(cfg, fold, digest_dir=digest_dir, mlflow_run=mlflow_run)
    from ipb_ray.distributed.ray_setup import init_ray
    from ipb_ray.distributed.epoch_stream import crop_cache
    from ipb_ray.distributed.streams import lease_states, release_states
    from ipb_ray.methods import get_method

    fold = cfg.split.fold if fold is None else fold
    local_dir = local_run_storage(cfg, fold)  # local mode refuses remote storage before anything starts
    inputs = fold_inputs(cfg, fold)
    semi = get_method(cfg.method.name).semi_supervised
    check_fold(cfg, fold, inputs, semi, world=cfg.resources.num_workers)
    init_ray(cfg.resources)
    run = FoldRun(to_dict(cfg), inputs, stream_specs(cfg, inputs.class_names, semi), local_run_dir=local_dir,
                  checkpoints_to_keep=cfg.resources.checkpoints_to_keep, mlflow_run=mlflow_run, digest_dir=digest_dir)
    cache = crop_cache(inputs.catalog, cpus=cfg.resources.data_cpus, workers=data_workers(cfg))
    leased = lease_states(2 if semi else 0)
    names = [name for name, _handle in leased] + [None, None]
    wiring = RayWiring(cache, data_workers(cfg), u_state=names[0], label_state=names[1])
    try:
        result = _trainer(cfg, fold, run, wiring, callbacks).fit()
    finally:
        release_states(leased)
    metrics = dict(result.metrics or {})
    if "test_report" not in metrics:
        raise RuntimeError(f"run {run_name(cfg, fold)} ended without test metrics; see {result.path}")
    metrics["checkpoint"], metrics["local_checkpoint"] = checkpoint_locations(result.checkpoint)
    metrics["history"] = read_history(metrics["local_checkpoint"])
    return metrics


def runs_in_process(cfg: ExperimentConfig, callbacks: list[Any] | None = None) -> bool:
    """Whether ``resources.runner`` has this process run the fold (no Ray Train)."""
    runner = cfg.resources.runner
    if runner == "in_process" and callbacks:
        raise ValueError("resources.runner=in_process cannot report to Ray Tune (a trial's epochs reach its "
                         "scheduler through Ray Train); use resources.runner=auto or ray_train in a search")
    return runner == "in_process" or (runner == "auto" and cfg.resources.num_workers == 0 and not callbacks)


def needs_ray(cfg: ExperimentConfig) -> bool:
    """Whether a fold command (``ipb train``, ``ipb cv``) should start or join Ray: always
    for Ray Train; for folds in this process only when a cluster is named
    (``resources.address``, or ``RAY_ADDRESS`` as in a Ray job), so its shared-storage
    checks still run there, while a laptop run starts no cluster at all."""
    return not runs_in_process(cfg) or bool(cfg.resources.address or os.environ.get("RAY_ADDRESS"))


def _trainer(cfg: ExperimentConfig, fold: int, run: FoldRun, wiring: RayWiring, callbacks: list[Any] | None) -> Any:
    """The ``TorchTrainer`` of one fold: its loop, scaling and storage. Every stream
    (training, calibration, validation, test) is cut from the crop cache by Ray Data tasks
    the loop starts itself (:mod:`ipb_ray.distributed.epoch_stream`): each rank takes its
    share of a plan, so Train splits no dataset."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.resources
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    return TorchTrainer(
        _train_loop,
        train_loop_config={"run": run, "wiring": wiring},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=run_name(cfg, fold), storage_path=storage_uri(cfg.tracking.storage_path),
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=r.checkpoints_to_keep),
                             callbacks=callbacks or None))


def data_workers(cfg: ExperimentConfig) -> int:
    """Patch tasks per stream at once: ``resources.data_workers``, or the CPUs the Train
    workers leave free on the cluster (at least one). Bounding them keeps Ray from
    starting a new Python worker process for every fractional-CPU task (each one imports
    torch and OpenCV, seconds of start-up on a small machine)."""
    import ray

    r = cfg.resources
    if r.data_workers:
        return int(r.data_workers)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, int(cpus - max(r.num_workers, 1) * r.cpus_per_worker))


# pyarrow filesystem type -> URI scheme, where they differ
URI_SCHEMES = {"gcs": "gs"}


def checkpoint_locations(checkpoint: Any) -> tuple[str | None, str | None]:
    """(where the checkpoint lives, a local directory holding it). On local or mounted
    storage both are its path; on remote storage (``s3://``, ``gs://``, ...) the first is
    its URI and the second a copy downloaded here (removed when the process exits), so
    the history, the curves and the MLflow model never depend on where Train stored it."""
    import atexit
    import shutil

    if checkpoint is None:
        return None, None
    kind = checkpoint.filesystem.type_name
    if kind == "local":
        return checkpoint.path, checkpoint.path
    copy = tempfile.mkdtemp(prefix="ipb-checkpoint-")
    atexit.register(shutil.rmtree, copy, True)
    scheme = URI_SCHEMES.get(kind, kind)
    where = checkpoint.path if "://" in checkpoint.path else f"{scheme}://{checkpoint.path}"
    return where, checkpoint.to_directory(copy)


def local_run_dir(metrics: dict[str, Any]) -> Path | None:
    """The run's directory on this machine (where ``curves.png`` goes), or None when
    the checkpoint lives on remote storage (its local copy is temporary)."""
    where, local = metrics.get("checkpoint"), metrics.get("local_checkpoint")
    return Path(where).parent if where and where == local else None

