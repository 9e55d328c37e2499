"""The engine in this process, with no Ray at all: one rank, the catalog's crops decoded
into memory once per process, each batch cut on a thread while the previous one trains,
the labelling pass run here, checkpoints kept on a local path (as Ray Train's local mode
keeps them, so either can resume the other's run).

:func:`train_fold_in_process` trains and tests one fold and returns what
:func:`ipb_ray.distributed.training.train_fold` returns. A patch depends on ``(seed,
epoch, mode, colony, copy)`` only (:mod:`ipb_ray.patches.core`), so these are the very
patches Ray Data would cut.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ipb_ray.config import ExperimentConfig, to_dict
from ipb_ray.engine.fold import (FoldInputs, FoldRun, check_fold, eval_batch, fold_inputs, own_run_dir, run_name,
                                 stream_specs)
from ipb_ray.engine.labelling import collect_labels, label_rows
from ipb_ray.engine.loop import Engine, Ports
from ipb_ray.engine.ports import SingleProcess, Slate
from ipb_ray.engine.store import keep_epoch, latest_local_state, read_history
from ipb_ray.patches.core import StreamSpec
from ipb_ray.patches.crops import CropViews, catalog_key, cut_plan, read_crops

__all__ = ["LocalReporter", "MemoryLabeller", "MemoryPatches", "collate", "train_fold_in_process"]


def collate(rows: Mapping[str, np.ndarray], columns: Sequence[str]) -> dict[str, Any]:
    """Patch rows -> a training batch: float32 tensors per patch column, int64 ``label``,
    the list of ``colony_id`` s (what the Ray streams hand the loop)."""
    import torch

    out: dict[str, Any] = {c: torch.from_numpy(np.require(rows[c], requirements="W")).to(torch.float32)
                           for c in columns}
    out["label"] = torch.from_numpy(np.asarray(rows["label"])).to(torch.int64)
    out["colony_id"] = list(rows["colony_id"])
    return out


def _ahead(items: Iterable[Any], make: Callable[[Any], Any]) -> Iterator[Any]:
    """``make(item)`` of each item in order, the next one made on a thread meanwhile."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ipb-cut") as pool:
        pending = None
        for item in items:
            nxt = pool.submit(make, item)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


_CROPS_LOCK = threading.Lock()
_CROPS: dict[str, CropViews] = {}


def _crops(catalog_dir: str) -> CropViews:
    """This process's decoded crops of a catalog (read once; a rewritten catalog again)."""
    key = catalog_key(catalog_dir)
    with _CROPS_LOCK:
        if key not in _CROPS:
            if len(_CROPS) >= 2:
                _CROPS.pop(next(iter(_CROPS)))
            _CROPS[key] = read_crops(catalog_dir)
        return _CROPS[key]


class MemoryPatches:
    """:class:`ipb_ray.engine.ports.Patches` cut in this process from crops in memory."""

    def __init__(self, catalog_dir: str):
        self.crops = _crops(catalog_dir)
        self.ids = frozenset(self.crops.ids)

    def rows(self, spec: StreamSpec, plan: Mapping[str, Any], epoch: int, batch_size: int,
             drop_last: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """The plan's patch rows, ``batch_size`` at a time, in its order."""
        n = len(plan["colony_id"])
        ends = range(batch_size, n + 1, batch_size) if drop_last else range(batch_size, n + batch_size, batch_size)
        chunks = ({k: np.asarray(v)[end - batch_size:min(end, n)] for k, v in plan.items()} for end in ends)
        return _ahead(chunks, lambda chunk: cut_plan(chunk, spec, epoch, self.crops))

    def batches(self, spec: StreamSpec, plan: Mapping[str, Any], epoch: int, batch_size: int,
                drop_last: bool = True) -> Iterator[dict[str, Any]]:
        columns = spec.patch_columns()
        return (collate(rows, columns) for rows in self.rows(spec, plan, epoch, batch_size, drop_last))


class MemoryLabeller:
    """:class:`ipb_ray.engine.ports.Labeller` run in this process (on the balancer's thread)."""

    def __init__(self, patches: MemoryPatches, spec: StreamSpec, batch_size: int, device: Any):
        self.patches, self.spec, self.batch_size, self.device = patches, spec, batch_size, device

    def job(self, epoch: int, ids: Sequence[str], weights: dict[str, Any],
            model_kwargs: dict[str, Any]) -> Callable[[], Any]:
        from ipb_ray.patches.plan import epoch_rows

        plan = epoch_rows(self.patches.ids, ids=sorted(ids))

        def run() -> Any:
            from ipb_ray.nn.models import create_model

            model = create_model(**model_kwargs)
            model.load_state_dict(weights)
            model = model.to(self.device).eval()
            rows = self.patches.rows(self.spec, plan, epoch, self.batch_size, drop_last=False)
            return collect_labels(label_rows(model, r, self.spec, self.device) for r in rows)

        return run


class LocalReporter:
    """:class:`ipb_ray.engine.ports.Reporter` of a run that keeps its own checkpoints under
    ``run_dir`` (and logs each epoch's history row to ``mlflow_run``, when given)."""

    def __init__(self, run: FoldRun):
        if not run.local_run_dir:
            raise ValueError("a run in this process keeps its checkpoints itself and needs a local run directory")
        self.run, self.last, self.checkpoint = run, {}, None

    def load(self) -> dict[str, Any] | None:
        return latest_local_state(self.run.local_run_dir)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.checkpoint = keep_epoch(metrics, state, self.run) or self.checkpoint
        self.last = dict(metrics)


def _device(cfg: ExperimentConfig) -> Any:
    import torch

    if cfg.resources.torch_threads:
        torch.set_num_threads(cfg.resources.torch_threads)
    return torch.device("cuda" if cfg.resources.use_gpu and torch.cuda.is_available() else "cpu")


def train_fold_in_process(cfg: ExperimentConfig, fold: int | None = None, *, digest_dir: str | None = None,
                          mlflow_run: tuple[str, str] | None = None,
                          inputs: FoldInputs | None = None) -> dict[str, Any]:
    """Train and test one fold in this process (see the module docstring); returns the
    final metrics (``test_report``, ``history``, ``checkpoint``, ...)."""
    from ipb_ray.methods import get_method

    t0 = time.perf_counter()
    fold = cfg.split.fold if fold is None else fold
    run_dir = own_run_dir(cfg, fold)
    inputs = inputs or fold_inputs(cfg, fold)
    semi = get_method(cfg.method.name).semi_supervised
    check_fold(cfg, fold, inputs, semi, world=1)
    run = FoldRun(to_dict(cfg), inputs, stream_specs(cfg, inputs.class_names, semi), local_run_dir=run_dir,
                  checkpoints_to_keep=cfg.resources.checkpoints_to_keep, mlflow_run=mlflow_run, digest_dir=digest_dir)
    device, patches, reporter = _device(cfg), MemoryPatches(inputs.catalog), LocalReporter(run)
    labeller = MemoryLabeller(patches, run.streams.label, eval_batch(cfg), device) if semi else None
    ports = Ports(SingleProcess(), patches, Slate(), reporter, device, lambda net: net.to(device), labeller)
    engine = Engine(run, ports)
    engine.run_all(setup_s=time.perf_counter() - t0)
    metrics = dict(reporter.last)
    if "test_report" not in metrics:
        raise RuntimeError(f"run {run_name(cfg, fold)} ended without test metrics; see {run_dir}")
    metrics["checkpoint"] = metrics["local_checkpoint"] = reporter.checkpoint
    metrics["history"] = read_history(reporter.checkpoint)
    return metrics
