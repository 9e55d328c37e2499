"""Training one fold on Ray Train: the one loop of every method (:mod:`ipb_ray.methods`).

Driver side (:func:`train_fold`): read the fold's roles, build the Ray Data patch streams
(train: labelled L, resampled per epoch; val: V; test: T; calib: un-augmented L for
BatchNorm recalibration; and, for a semi-supervised method, the unlabelled stream whose
per-epoch content a balancer plans) and run a ``TorchTrainer``. Worker side
(:class:`_Loop`, via :func:`_train_loop`): the method's networks and optimisers, its
stages epoch by epoch (labelled stages run here; unlabelled ones call the method's
``train_step``), per-epoch ``ray.train.report`` with a checkpoint written by rank 0 that
holds everything needed to resume (networks, optimisers, method and balancer state, epoch,
step, RNG state, best-so-far weights, history). A killed worker restarts the group from the
latest checkpoint (``FailureConfig``); rerunning the same run name resumes it. The network
is chosen on V (never on T) and tested on T at the end by rank 0. ``docs/methods.md``
lists the history and checkpoint keys.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ipb_ray.config import ExperimentConfig, from_dict, to_dict
from ipb_ray.nn.checkpoint import CHECKPOINT_FILE, HISTORY_FILE
from ipb_ray.nn.models import build_model, model_kwargs

if TYPE_CHECKING:  # pragma: no cover
    from ipb_ray.methods import Stage

__all__ = [
    "FoldInputs", "LoopContext", "PRE_FINETUNE", "URI_SCHEMES", "calibration_counts",
    "checkpoint_locations", "data_workers", "evaluate", "fold_inputs", "labelled_draws", "labelled_steps",
    "load_checkpoint", "local_checkpoints", "local_run_dir", "local_run_storage", "param_digest",
    "pre_stage_prefix", "read_history", "recalibrate", "report_epoch", "report_finished", "run_name",
    "snapshot", "storage_uri", "stream_specs", "supervised_epoch", "train_fold", "unlabelled_steps",
    "validate", "worker_device", "write_digest",
]

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- worker side

def worker_device(cfg: ExperimentConfig) -> Any:
    """This Train worker's torch device, with ``resources.torch_threads`` applied."""
    import ray.train.torch
    import torch

    if cfg.resources.torch_threads:
        torch.set_num_threads(cfg.resources.torch_threads)
    return ray.train.torch.get_device()


def _inputs(batch: dict[str, Any], columns: list[str], device: Any) -> list[Any]:
    return [batch[c].to(device, non_blocking=True) for c in columns]


def _autocast(device: Any, enabled: bool):
    import contextlib

    import torch

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(model: Any, batches: Any, columns: list[str], device: Any, amp: bool = False
             ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Predictions of ``model`` over a patch stream: (true labels, predicted, colony ids).
    Views of one colony (test-time augmentation copies) are averaged in softmax space."""
    import torch

    model.eval()
    probs: dict[str, np.ndarray] = {}
    truth: dict[str, int] = {}
    with torch.no_grad():
        for batch in batches:
            with _autocast(device, amp):
                logits, _ = model(*_inputs(batch, columns, device))
            p = torch.softmax(logits.float(), dim=1).cpu().numpy()
            for cid, label, row in zip(batch["colony_id"], batch["label"].tolist(), p):
                probs[cid] = probs.get(cid, 0) + row
                truth[cid] = label
    ids = sorted(probs)
    return (np.array([truth[c] for c in ids], np.int64),
            np.array([int(np.argmax(probs[c])) for c in ids], np.int64), ids)


class _Timer:
    """Per-epoch data-wait bookkeeping: call :meth:`got` when a batch arrives and
    :meth:`resume` when the step that used it is done."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.wait_s, self.first_batch_s = 0.0, None

    def got(self) -> None:
        now = time.perf_counter()
        self.wait_s += now - self.last  # time the loop stood waiting for data (start-up included)
        self.first_batch_s = now - self.start if self.first_batch_s is None else self.first_batch_s

    def resume(self) -> None:
        self.last = time.perf_counter()

    def metrics(self, patches: float) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        return {"train_seconds": seconds, "train_patches_per_s": patches / max(seconds, 1e-9),
                "data_wait_fraction": self.wait_s / max(seconds, 1e-9),
                "first_batch_s": self.first_batch_s if self.first_batch_s is not None else float("nan")}


def _all_reduce(t: Any) -> Any:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def supervised_epoch(model: Any, opt: Any, batches: Any, columns: list[str], device: Any, amp: bool,
                     m: Any, lr_at: Any = None, first_step: int = 0) -> dict[str, Any]:
    """One epoch of cross-entropy training over ``batches`` (every rank); returns the
    epoch's loss (averaged over all ranks), steps and timings. ``lr_at(step)``: the lr of
    global step ``first_step + i`` (set before each step); None leaves the lr alone."""
    import torch
    import torch.nn.functional as F

    from ipb_ray.nn.optim import set_lr

    model.train()
    timer, loss_sum, seen = _Timer(), torch.zeros(2, device=device), 0
    for batch in batches:
        timer.got()
        if lr_at is not None:
            set_lr(opt, lr_at(first_step + seen))
        with _autocast(device, amp):
            logits, _ = model(*_inputs(batch, columns, device))
            loss = F.cross_entropy(logits.float(), batch["label"].to(device), label_smoothing=m.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if m.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), m.grad_clip)
        opt.step()
        loss_sum += torch.stack([loss.detach().float() * len(batch["label"]),
                                 torch.tensor(float(len(batch["label"])), device=device)])
        seen += 1
        timer.resume()
    out = timer.metrics(0.0)
    _all_reduce(loss_sum)
    out["train_patches_per_s"] = float(loss_sum[1]) / max(out["train_seconds"], 1e-9)
    return {"train_loss": float(loss_sum[0] / max(loss_sum[1], 1)), "train_steps": seen, **out}


def recalibrate(model: Any, batches: Any, columns: list[str], device: Any, amp: bool, max_batches: int,
                enabled: bool = True) -> int:
    """Rank 0: re-estimate the BatchNorm statistics of ``model`` (a network, or a list of
    them sharing one pass) on ``batches`` of the un-augmented labelled stream before it
    evaluates or labels; returns the batches used. ``batches``: a callable that gives the
    stream (not called when ``enabled`` is False)."""
    from ipb_ray.nn.optim import recalibrate_bn

    if not enabled:
        return 0

    def forward(net: Any, batch: dict[str, Any]) -> None:
        if len(batch["label"]) > 1:  # a BatchNorm1d in train mode needs two samples
            with _autocast(device, amp):
                net(*_inputs(batch, columns, device))

    nets = [_unwrap(n) for n in model] if isinstance(model, (list, tuple)) else _unwrap(model)
    return recalibrate_bn(nets, batches(), forward, max_batches)


def validate(model: Any, inputs: FoldInputs, batches: Any, columns: list[str], device: Any,
             amp: bool) -> dict[str, Any] | None:
    """Rank 0: ``model`` on the validation split V (None when the fold has no V);
    ``batches()`` gives V's stream."""
    from ipb_ray.evaluation.metrics import classification_report

    if not inputs.validation:
        return None
    y, p, _ = evaluate(_unwrap(model), batches(), columns, device, amp)
    return classification_report(y, p, inputs.class_names)


def _write_state(directory: str, state: dict[str, Any]) -> None:
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


def _save_local(run_dir: str, epoch: int, state: dict[str, Any], keep: int) -> str:
    """Local mode (``resources.num_workers=0``, no Train controller to persist checkpoints):
    write ``<run_dir>/checkpoint_<epoch>`` atomically and keep the newest ``keep``."""
    import shutil

    target = Path(run_dir) / f"checkpoint_{int(epoch):06d}"
    partial = target.with_name(target.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _write_state(str(partial), state)
    shutil.rmtree(target, ignore_errors=True)  # a finished run's rerun reports its last epoch again
    partial.rename(target)
    for old in local_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return str(target)


def report_epoch(metrics: dict[str, Any], state: dict[str, Any] | None, run: dict[str, Any] | None = None) -> None:
    """``ray.train.report`` on every rank; rank 0 passes its ``state`` to checkpoint.

    A ``state["history"]`` list (one metrics dict per epoch so far) is also written as
    ``history.json`` beside the weights, so the curves survive with the checkpoint.
    ``run["local_run_dir"]`` (local mode) is where the loop keeps its checkpoints itself;
    ``run["mlflow_run"]`` (``(uri, run id)``): rank 0 logs the epoch's history row there."""
    import ray.train

    metrics.setdefault("objective", float("nan"))  # the search metric, in every report (NaN: no V)
    live = (run or {}).get("mlflow_run")
    if state is not None and live and state.get("history") and "epoch_seconds" in metrics:  # an epoch just ran
        from ipb_ray.tracking.runs import log_epoch

        log_epoch(live[0], live[1], state["history"][-1])
    local = (run or {}).get("local_run_dir")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if state is not None:
            if local:  # kept by the loop itself: Train copies nothing in local mode
                where = _save_local(local, metrics["epoch"], state, int(run.get("checkpoints_to_keep", 2)))
            else:
                _write_state(tmp, state)
                where = tmp
            checkpoint = ray.train.Checkpoint.from_directory(where)
        ray.train.report(metrics, checkpoint=checkpoint)


def load_checkpoint(run: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The run's latest checkpoint state (a resumed or restarted run), else None. In local
    mode (``run["local_run_dir"]``) the newest checkpoint the loop wrote there itself."""
    import ray.train

    from ipb_ray.nn.checkpoint import load_state

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            return load_state(os.path.join(d, CHECKPOINT_FILE))
    local = (run or {}).get("local_run_dir")
    found = local_checkpoints(local) if local else []
    if not found:
        return None
    return load_state(found[-1] / CHECKPOINT_FILE)


def snapshot(model: Any) -> dict[str, Any]:
    """A CPU copy of a (possibly DDP-wrapped) model's state dict."""
    return {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}


class LoopContext:
    """What a method (:mod:`ipb_ray.methods`) and its balancer may use on a Train worker:
    the configuration, the fold, the stream specs, this worker's device, and helpers to
    build networks and optimisers and to move batches."""

    def __init__(self, cfg: ExperimentConfig, inputs: FoldInputs, config: dict[str, Any], rank: int, world: int,
                 device: Any, amp: bool, prepare: Callable[[Any], Any] | None = None):
        self.cfg, self.inputs, self.config = cfg, inputs, config
        self.rank, self.world, self.device, self.amp = rank, world, device, amp
        self._prepare = prepare  # None: Ray Train's prepare_model (DDP on a Train worker)
        self.specs = {k: v for k, v in config.items() if k.startswith("spec_")}
        self.columns = config["spec_train"].patch_columns()
        uda = self.specs["spec_uda"].patch_columns() if "spec_uda" in self.specs else []
        self.weak_columns, self.strong_columns = uda[:len(uda) // 2], uda[len(uda) // 2:]  # weak*, then strong*

    def model_kwargs(self) -> dict[str, Any]:
        return model_kwargs(self.cfg, len(self.inputs.class_names), self.inputs)

    def network(self, seed: int) -> Any:
        """A fresh network of the experiment, initialised from ``seed`` (the same on every
        rank), prepared for DDP."""
        return self.prepare(lambda: build_model(self.cfg, len(self.inputs.class_names), self.inputs), seed)

    def prepare(self, make: Callable[[], Any], seed: int) -> Any:
        """The module ``make()`` builds with torch seeded by ``seed`` (so the same on every
        rank), on this worker's device and prepared for DDP (e.g. a method's projection head)."""
        import torch

        torch.manual_seed(seed)
        net = make()
        if self._prepare is not None:
            return self._prepare(net)
        import ray.train.torch

        return ray.train.torch.prepare_model(net)

    def optimizer(self, net: Any, lr: float) -> Any:
        from ipb_ray.nn.optim import make_optimizer

        m = self.cfg.method
        return make_optimizer(net.parameters(), m.optimizer, lr, momentum=m.momentum, weight_decay=m.weight_decay,
                              nesterov=m.nesterov)

    def tensors(self, batch: dict[str, Any], columns: list[str]) -> list[Any]:
        return _inputs(batch, columns, self.device)

    def labels(self, batch: dict[str, Any]) -> Any:
        return batch["label"].to(self.device)

    def autocast(self) -> Any:
        return _autocast(self.device, self.amp)

    unwrap = staticmethod(lambda model: _unwrap(model))
    snapshot = staticmethod(lambda model: snapshot(model))

    def labelling_job(self, epoch: int, ids: list[str], net: Any) -> Callable[[], Any]:
        """IPB's labelling service for a balancer: ``net``'s weights are taken now, and the
        returned job (run it on any thread) has them label one fresh window of every colony
        of U in ``ids`` for ``epoch`` on Ray Data (:mod:`ipb_ray.distributed.rebalance`),
        returning their :class:`ipb_ray.patches.pseudo_labels.LabelTable`."""
        import ray

        from ipb_ray.distributed.rebalance import labelling_dataset, run_labelling
        from ipb_ray.distributed.streams import state_handle

        m, r = self.cfg.method, self.cfg.resources
        weights = ray.put(self.snapshot(net))
        name = self.config["label_state"]
        state = state_handle(name)

        def job() -> Any:
            ray.get(state.set.remote(epoch, {cid: 1 for cid in ids}))
            ray.get(state.publish.remote(time.time_ns(), [weights]))
            return run_labelling(labelling_dataset(
                self.inputs.catalog, self.specs["spec_label"], name, self.model_kwargs(),
                batch_size=max(4 * m.unlabelled_batch_size, 128), cpus=r.data_cpus, actors=r.teacher_actors,
                gpus=r.label_gpus, use_actors=r.label_stage == "actors" or (r.label_stage == "auto"
                                                                            and r.label_gpus > 0),
                workers=self.config.get("data_workers"), cache=self.config.get("cache"), ids=ids))

        return job


@dataclass
class _Selection:
    """Best-on-V bookkeeping of a run: the score and weights of the chosen network, and the
    choices of earlier stages that a restarting stage (fine-tuning) set aside."""

    metric: float = -1.0
    state: dict[str, Any] | None = None
    earlier: dict[str, dict[str, Any]] = field(default_factory=dict)

    def offer(self, score: float, net: Any) -> bool:
        if score >= self.metric:
            self.metric, self.state = score, snapshot(net)
            return True
        return False


#: Key prefix of an earlier stage's own test figures, e.g. ``pre_finetune_test_*``: the
#: choice of the stage before fine-tuning, tested as well.
def pre_stage_prefix(stage: str) -> str:
    return f"pre_{stage}_"


PRE_FINETUNE = pre_stage_prefix("finetune")


class _Loop:
    """The one training loop of every method (worker side; see :func:`_train_loop`)."""

    def __init__(self, config: dict[str, Any]):
        import ray.train

        from ipb_ray.methods import get_balancer, get_method
        from ipb_ray.distributed.streams import state_handle

        cfg: ExperimentConfig = from_dict(config["cfg"])
        self.cfg, self.m, self.config, self.inputs = cfg, cfg.method, config, config["inputs"]
        tctx = ray.train.get_context()
        self.rank, self.world = tctx.get_world_rank(), tctx.get_world_size()
        device = worker_device(cfg)
        self.ctx = LoopContext(cfg, self.inputs, config, self.rank, self.world, device,
                               self.m.mixed_precision and device.type == "cuda")
        self.method = get_method(self.m.name)(cfg, self.ctx)
        self.method.build()
        self.stages = self.method.stages(cfg)
        self.first = np.cumsum([0] + [s.epochs for s in self.stages]).tolist()  # each stage's first epoch
        self.total = self.first[-1]
        self.semi = self.method.semi_supervised
        self.l_steps = labelled_steps(len(self.inputs.labelled), self.world, self.m.batch_size, self.m.steps_per_epoch)
        self.u_steps = unlabelled_steps(len(self.inputs.unlabelled), self.world, self.m) if self.semi else 0
        self.balancer = get_balancer(self.method.balancer_name(cfg))(cfg, self.ctx) if self.semi else None
        self.method.balancer = self.balancer  # every rank: a balancer may correct pseudo-labels; rank 0 plans
        self.u_state = state_handle(config["u_state"]) if self.semi else None
        self.start, self.global_step, self.resumed_from = 0, 0, None
        self.best, self.history = _Selection(), []
        self._eval_cache: dict[str, list[Any] | None] = {}  # V's and the BN stream's batches, once cut
        self.eval_cuts = 0  # evaluation streams cut so far (each one a Ray Data pipeline)
        self.report_s = 0.0  # seconds in report_epoch (checkpoint writes, MLflow logging, Train's report)
        self.setup_s = 0.0  # seconds to build this loop (networks, optimisers, restore), set by _train_loop
        self.u_truth = np.asarray(self.inputs.unlabelled_truth or [-1] * len(self.inputs.unlabelled), np.int64)
        self.truth_of = dict(zip(self.inputs.unlabelled, self.u_truth.tolist()))
        self.state = self._restore()

    def stage_at(self, g: int) -> tuple[int, int]:
        """(stage index, epoch within the stage) of run epoch ``g``."""
        i = int(np.searchsorted(self.first, g, side="right")) - 1
        return i, g - self.first[i]

    def _unlabelled_epoch(self, g: int) -> int:
        """How many unlabelled epochs came before run epoch ``g`` (the balancer's epoch)."""
        return sum(min(max(g - self.first[i], 0), s.epochs) for i, s in enumerate(self.stages) if s.unlabelled)

    # ---- checkpoints
    def _restore(self) -> dict[str, Any] | None:
        import torch

        state = load_checkpoint(self.config)
        if state is None:
            return None
        if "networks" not in state:  # written before the one loop (keys model/teacher/student/...)
            raise ValueError(f"the checkpoint this run would resume from was written by an older ipb-ray (keys "
                             f"{sorted(state)[:6]}...; no 'networks'); it cannot be resumed. Train under another "
                             "run name (`name=...`) or remove the run's directory under tracking.storage_path")
        for name, weights in state["networks"].items():
            _unwrap(self.method.nets[name]).load_state_dict(weights)
        for name, opt_state in state["optimizers"].items():
            self.method.opts[name].load_state_dict(opt_state)
        self.method.load_state_dict(state.get("method") or {})
        if self.balancer is not None:
            self.balancer.load_state_dict(state.get("balancer") or {})
        torch.set_rng_state(state["torch_rng"])
        self.start, self.global_step, self.resumed_from = state["epoch"] + 1, state["global_step"], state["epoch"]
        self.best = _Selection(state["best_metric"], state["best_model"], dict(state.get("earlier_best") or {}))
        self.history = list(state.get("history", []))
        return state

    def checkpoint_state(self, g: int) -> dict[str, Any]:
        import torch

        return {"stage": self.stages[self.stage_at(g)[0]].name, "epoch": g, "global_step": self.global_step,
                "networks": {k: _unwrap(n).state_dict() for k, n in self.method.nets.items()},
                "optimizers": {k: o.state_dict() for k, o in self.method.opts.items()},
                "method": self.method.state_dict(),
                "balancer": self.balancer.state_dict() if self.balancer is not None else None,
                "best_metric": self.best.metric, "best_model": self.best.state, "earlier_best": self.best.earlier,
                "torch_rng": torch.get_rng_state(), "class_names": list(self.inputs.class_names),
                "config": self.config["cfg"], "history": self.history}

    # ---- epochs
    def run(self) -> None:
        state = self.state
        for g in range(self.start, self.total):
            i, e = self.stage_at(g)
            stage = self.stages[i]
            if e == 0:
                self._begin(i)
            t0 = time.perf_counter()
            metrics: dict[str, Any] = {"epoch": g, "stage": stage.name, "stage_index": i, "stage_epoch": e,
                                       "world_size": self.world}
            if g == self.start:
                metrics["setup_seconds"] = self.setup_s
            if stage.unlabelled:
                metrics.update(self._unlabelled(stage, g, e))
            else:
                metrics.update(self._labelled(stage, g, e))
            metrics.update(self.method.epoch_metrics(stage))
            state = self._close_epoch(stage, g, metrics, t0)
            t_report = time.perf_counter()
            report_epoch(metrics, state, self.config)
            self.report_s += time.perf_counter() - t_report
        if self.balancer is not None:
            self.balancer.close()
        if self.start >= self.total:  # the run had already finished: test its selected network again
            report_finished(state, self.final, self.rank, self.world, self.total - 1, self.config)
        write_digest(self.config, self.rank, self.method.nets[self._last_net()])

    def _begin(self, i: int) -> None:
        """Stage ``i`` starts: a restarting stage takes the choice so far (rank 0's) into its
        network and selects anew (with ``method.keep_start``, a semi-supervised run's guard,
        its networks must beat that choice's score on V to replace it: fine-tuning cannot
        hand back a network worse on V than the one it started from); then the method's
        own hook."""
        stage = self.stages[i]
        if stage.restart and i > 0:
            chosen = _from_rank_zero(self.best.state)
            earlier = {**self.best.earlier, stage.name: chosen}
            keep = self.semi and self.m.keep_start and chosen is not None
            self.best = _Selection(self.best.metric, chosen, earlier) if keep else _Selection(earlier=earlier)
            _unwrap(self.method.nets[stage.net]).load_state_dict(chosen)
        self.method.begin_stage(stage)

    def _lr_factor(self, stage: Stage, e: int, i: int, steps: int) -> float:
        from ipb_ray.nn.optim import lr_factor, warmup_steps

        total = max(steps * stage.epochs, 1)
        return lr_factor(e * steps + i, total, warmup_steps(total, self.m.warmup_fraction), self.m.schedule)

    def _eval_batches(self, kind: str) -> Any:
        """``kind``'s evaluation batches (:meth:`_cut_eval_batches`); V's and the BatchNorm
        stream's are the same windows every epoch, so they are cut once and kept when they
        fit in ``eval.cache_mb`` (T is evaluated once a run and always streamed)."""
        import itertools

        if kind == "test" or self.cfg.eval.cache_mb <= 0 or self._eval_cache.get(kind, []) is None:
            return self._cut_eval_batches(kind)
        if kind in self._eval_cache:
            return iter(self._eval_cache[kind])
        stream, batches, size = iter(self._cut_eval_batches(kind)), [], 0
        for batch in stream:
            batches.append(batch)
            size += sum(v.element_size() * v.nelement() for v in batch.values() if hasattr(v, "nelement"))
            if size > self.cfg.eval.cache_mb * 2 ** 20:  # too big to keep: this pass goes on streaming
                self._eval_cache[kind] = None
                return itertools.chain(batches, stream)
        self._eval_cache[kind] = batches
        return iter(batches)

    def _cut_eval_batches(self, kind: str) -> Any:
        """Rank 0's evaluation streams, cut from the crop cache like the training ones:
        ``calib``: un-augmented L in the training class mix (:func:`calibration_counts`),
        shuffled (a batch of one colony's copies, or of one class, has a smaller variance
        than the mixed batches the network trains on, and BatchNorm averages per-batch
        variances), at most ``eval.bn_batches`` batches; ``val`` / ``test``: V / T, each
        colony ``eval.tta`` times (the mask-centre window, then seeded random ones). The
        same windows every epoch (epoch 0's draws), so validations compare."""
        self.eval_cuts += 1
        cfg, ctx, m, inputs = self.cfg, self.ctx, self.m, self.inputs
        if kind == "calib":
            spec = ctx.specs["spec_plain"]
            plan = self._plan(stream="calibration", epoch=0, counts=calibration_counts(cfg, inputs))
            plan = {k: v[:cfg.eval.bn_batches * m.batch_size] for k, v in plan.items()}
        else:
            spec = ctx.specs["spec_eval"]
            ids = inputs.test if kind == "test" else (inputs.validation or inputs.labelled[:1])
            plan = self._plan(stream="evaluation", epoch=0, ids=ids, copies=spec.tta, shuffle=False)
        return self._batches(spec, plan, 0, m.batch_size, drop_last=False)

    def _plan(self, **kwargs: Any) -> dict[str, Any]:
        """A plan over the run's crop cache (:func:`ipb_ray.patches.plan.stream_plan`)."""
        from ipb_ray.patches.plan import stream_plan

        return stream_plan(self.config["cache"].ids, seed=self.cfg.seed, **kwargs)

    def _batches(self, spec: Any, plan: dict[str, Any], epoch: int, batch_size: int, drop_last: bool = True) -> Any:
        """``plan``'s torch batches, cut from the run's crop cache by Ray Data tasks
        (:mod:`ipb_ray.distributed.epoch_stream`)."""
        from ipb_ray.distributed.epoch_stream import plan_batches

        return plan_batches(self.config["cache"], spec, plan, epoch=epoch, batch_size=batch_size,
                            workers=self.config["data_workers"], cpus=self.cfg.resources.data_cpus,
                            device=str(self.ctx.device), drop_last=drop_last)

    def _training_batches(self, spec: Any, stream: str, epoch: int, batch_size: int, steps: int,
                          counts: Mapping[str, int], coords: Mapping[str, Any] | None = None) -> Any:
        """This rank's ``steps`` batches of a training stream's epoch: the draw ``counts``
        (and fixed windows ``coords``) in a whole-epoch seeded order (unless
        ``method.shuffle`` is false)."""
        plan = self._plan(stream=stream, epoch=epoch, counts=counts, coords=coords, shuffle=self.m.shuffle,
                          rank=self.rank, world=self.world, batch_size=batch_size, steps=steps)
        return self._batches(spec, plan, epoch, batch_size)

    def _labelled_batches(self, g: int, steps: int) -> Any:
        """This rank's share of epoch ``g``'s class-balanced draw of L: ``steps`` batches
        (every rank computes the same draw from the seed)."""
        m = self.m
        counts = labelled_draws(self.inputs, steps * self.world * m.batch_size, self.cfg.seed, g, m.balance_labelled)
        return self._training_batches(self.ctx.specs["spec_train"], "labelled", g, m.batch_size, steps, counts)

    def _labelled(self, stage: Stage, g: int, e: int) -> dict[str, Any]:
        """An epoch of cross-entropy on class-balanced L for ``stage.net``."""
        ctx, m = self.ctx, self.m
        opt = self.method.opts[stage.optimizer]
        out = supervised_epoch(self.method.nets[stage.net], opt, self._labelled_batches(g, self.l_steps),
                               ctx.columns, ctx.device, ctx.amp, m,
                               lambda step: stage.lr * self._lr_factor(stage, 0, step, self.l_steps), e * self.l_steps)
        self.global_step += out["train_steps"]
        return {**out, "lr": opt.param_groups[0]["lr"]}

    def _unlabelled(self, stage: Stage, g: int, e: int) -> dict[str, Any]:
        """An epoch of the method's steps on paired labelled and unlabelled batches."""
        import ray
        import ray.train
        import ray.train.collective
        import torch

        ctx, m, steps = self.ctx, self.m, self.u_steps
        u_epoch = self._unlabelled_epoch(g)
        figures: dict[str, Any] = {}
        if self.rank == 0:  # the epoch's streams: the balancer's plan of U, a class-balanced draw of L
            t0 = time.perf_counter()
            n_draws = steps * self.world * m.unlabelled_batch_size
            plan, figures = self.balancer.plan(u_epoch, n_draws, self.method.nets[self.method.labeller])
            ray.get(self.u_state.set.remote(u_epoch, plan.counts, plan.coords))
            figures.update(plan_seconds=time.perf_counter() - t0, unlabelled_draws=n_draws)
        ray.train.collective.barrier()
        for net in self.method.nets.values():
            net.train()
        _, _, u_counts, u_coords = ray.get(self.u_state.get.remote())  # rank 0's plan, on every rank
        l_iter = iter(self._labelled_batches(g, steps))
        u_iter = iter(self._training_batches(ctx.specs["spec_uda"], "unlabelled", u_epoch, m.unlabelled_batch_size,
                                             steps, u_counts or {}, u_coords))
        names = self.method.step_metrics
        timer, sums = _Timer(), torch.zeros(len(names), dtype=torch.float64)
        seen: list[str] = []
        labels: list[int] = []
        for i in range(steps):
            bl, bu = next(l_iter), next(u_iter)
            timer.got()
            out = self.method.train_step(stage, bl, bu, step=u_epoch * steps + i,
                                         lr_factor=self._lr_factor(stage, e, i, steps), stage_epoch=e)
            self.global_step += 1
            sums += torch.tensor([out[k] for k in names], dtype=torch.float64)
            seen.extend(bu["colony_id"])
            labels.extend(out.get("pseudo_labels", []))
            timer.resume()
        for _ in l_iter:  # the shares hold exactly `steps` batches; finish both executions cleanly
            pass
        for _ in u_iter:
            pass
        metrics = timer.metrics(float(steps * m.unlabelled_batch_size * self.world))
        _all_reduce(sums)
        metrics.update({k: float(v) / (steps * self.world) for k, v in zip(names, sums)})
        metrics.update(train_steps=steps, global_step=self.global_step,
                       train_loss=metrics[self.method.loss_metric] if self.method.loss_metric else float("nan"))
        gathered = _gather((seen, labels))
        if self.rank == 0:
            metrics.update(figures)
            metrics.update(self._stream_figures([c for part in gathered for c in part[0]],
                                                [p for part in gathered for p in part[1]]))
        return metrics

    def _stream_figures(self, ids: list[str], pseudo: list[int]) -> dict[str, Any]:
        """Rank 0: what the unlabelled stream held this epoch, by hidden truth and by the
        method's pseudo-labels; the balancer sees both."""
        from ipb_ray.methods.balancers import shares
        from ipb_ray.patches.pseudo_labels import class_histogram

        names, n = self.inputs.class_names, len(self.inputs.class_names)
        out = {**shares("unlabelled_true_share", class_histogram(self.u_truth, n), names),
               **shares("stream_true_share", class_histogram([self.truth_of[c] for c in ids], n), names)}
        if pseudo:
            out.update(shares("step_pseudo_share", class_histogram(pseudo, n), names))
        out.update(self.balancer.observe(ids, pseudo))
        return out

    def _close_epoch(self, stage: Stage, g: int, metrics: dict[str, Any], t0: float) -> dict[str, Any] | None:
        """Rank 0: recalibrate, start the next labelling pass, validate, select, record;
        returns the checkpoint state (None on other ranks)."""
        if self.rank != 0:
            return None
        ctx, nets = self.ctx, self.method.nets
        nxt = self.stage_at(g + 1)[0] if g + 1 < self.total else None
        labels_next = nxt is not None and self.stages[nxt].unlabelled and self.balancer is not None
        due = self._validation_due(stage, metrics["stage_epoch"])
        evaluated = ([stage.net, *stage.also_validate] if due else []) + ([self.method.labeller] if labels_next else [])
        t_close, cuts = time.perf_counter(), self.eval_cuts
        if evaluated:
            recalibrate([nets[k] for k in dict.fromkeys(evaluated)], lambda: self._eval_batches("calib"),
                        ctx.columns, ctx.device, ctx.amp, max_batches=self.cfg.eval.bn_batches,
                        enabled=self.cfg.eval.bn_recalibrate)
        t_val = time.perf_counter()
        metrics["bn_seconds"] = t_val - t_close
        if labels_next:  # the labeller is final for the next epoch: label U meanwhile
            self.balancer.prefetch(self._unlabelled_epoch(g + 1), nets[self.method.labeller])
            metrics["prefetch_seconds"] = time.perf_counter() - t_val
            t_val = time.perf_counter()
        if not due:  # eval.every: no validation this epoch; Tune's schedulers still see an objective
            last = next((h["objective"] for h in reversed(self.history) if "objective" in h), None)
            if last is not None:  # the last validation's (also after a resume: the history is restored)
                metrics["objective"] = last
            return self._record(g, metrics, cuts, t0, t_val)
        for name in stage.also_validate:
            val = validate(nets[name], self.inputs, lambda: self._eval_batches("val"), ctx.columns, ctx.device,
                           ctx.amp)
            if val is not None:
                metrics[f"{name}_val_balanced_accuracy"] = val["balanced_accuracy"]
                if stage.select and name in stage.also_select and self.best.offer(val["balanced_accuracy"],
                                                                                  nets[name]):
                    metrics.update(best_epoch=g, best_net=name)
        val = validate(nets[stage.net], self.inputs, lambda: self._eval_batches("val"), ctx.columns, ctx.device,
                       ctx.amp)
        if val is not None:
            metrics.update(val_balanced_accuracy=val["balanced_accuracy"], val_accuracy=val["accuracy"],
                           objective=val["balanced_accuracy"])
        if stage.select and self.best.offer(val["balanced_accuracy"] if val is not None else float(g),
                                            nets[stage.net]):  # no V: the latest network
            metrics.update(best_epoch=g, best_net=stage.net)
        return self._record(g, metrics, cuts, t0, t_val)

    def _validation_due(self, stage: Stage, stage_epoch: int) -> bool:
        """``eval.every``: validate every that many epochs of a stage, and at its last."""
        every = self.cfg.eval.every
        return every <= 1 or (stage_epoch + 1) % every == 0 or stage_epoch == stage.epochs - 1

    def _record(self, g: int, metrics: dict[str, Any], cuts: int, t0: float, t_val: float) -> dict[str, Any] | None:
        """The epoch's closing figures into its history row; at the run's end the test."""
        metrics["val_seconds"] = time.perf_counter() - t_val
        metrics["eval_cuts"] = self.eval_cuts - cuts
        metrics["epoch_seconds"] = time.perf_counter() - t0
        metrics["report_seconds"] = self.report_s  # the earlier epochs' reports, so far
        self.history.append(dict(metrics))
        if g == self.total - 1:
            metrics.update(self.final())
        return self.checkpoint_state(g)

    def _last_net(self) -> str:
        return self.stages[-1].net

    def final(self) -> dict[str, Any]:
        """Rank 0's end-of-run figures: the selected network on T (and the choices earlier
        stages set aside, ``pre_<stage>_test_*``), where the run began, parameter digests."""
        ctx, nets = self.ctx, self.method.nets
        last = self._last_net()

        def test(weights: dict[str, Any] | None) -> dict[str, Any]:
            return _test_metrics(nets[last], weights, self.inputs, self._eval_batches("test"), ctx.columns,
                                 ctx.device, ctx.amp)

        t0 = time.perf_counter()
        out = test(self.best.state)
        for stage_name, weights in self.best.earlier.items():
            out.update({f"{pre_stage_prefix(stage_name)}{k}": v for k, v in test(weights).items()})
        out["test_seconds"] = time.perf_counter() - t0
        out.update(resumed_from_epoch=-1 if self.resumed_from is None else self.resumed_from,
                   param_digest=param_digest(_unwrap(nets[last])))
        out.update({f"{k}_param_digest": param_digest(_unwrap(n)) for k, n in nets.items() if k != last})
        return out


def _gather(obj: Any) -> list[Any]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def _from_rank_zero(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (itself without a process group)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _train_loop(config: dict[str, Any]) -> None:
    """Worker side of every run, whatever the method (:mod:`ipb_ray.methods`): for each
    stage's epochs, the streams of the epoch, the training (cross-entropy on balanced L, or
    the method's steps on L and U), then on rank 0 BatchNorm recalibration, the next
    labelling pass, validation on V, best-on-V selection and the checkpoint; at the end the
    selected network on T."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    loop = _Loop(config)
    loop.setup_s = time.perf_counter() - t0
    loop.run()


def report_finished(state: dict[str, Any] | None, final: Any, rank: int, world: int, last_epoch: int,
                    run: dict[str, Any] | None = None) -> None:
    """A rerun of a finished run: rank 0 tests its selected model again and reports the
    finished state once more (a run's result carries its latest checkpoint's metrics)."""
    metrics: dict[str, Any] = {"epoch": last_epoch, "world_size": world}
    if rank == 0:
        metrics.update(final())
    report_epoch(metrics, state if rank == 0 else None, run)


def write_digest(config: dict[str, Any], rank: int, model: Any) -> None:
    if config.get("digest_dir"):  # lets tests compare the ranks' final parameters
        with open(os.path.join(config["digest_dir"], f"rank{rank}.txt"), "w") as fh:
            fh.write(param_digest(_unwrap(model)))


def _test_metrics(model, best_state, inputs: FoldInputs, batches, columns, device, amp):
    from ipb_ray.evaluation.metrics import classification_report

    net = _unwrap(model)
    current = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    y, p, _ = evaluate(net, batches, columns, device, amp)
    net.load_state_dict(current)
    report = classification_report(y, p, inputs.class_names)
    return {"test_balanced_accuracy": report["balanced_accuracy"], "test_macro_f1": report["macro_f1"],
            "test_report": report}


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def param_digest(model: Any) -> str:
    """A short hash of the trainable parameters (equal weights, equal digests).

    Buffers are left out: DDP broadcasts rank 0's BatchNorm running statistics at the start
    of every forward, so after the last step each rank holds its own batch's update, and
    only rank 0's (the one checkpointed) are used."""
    import hashlib

    h = hashlib.sha1()
    for name, tensor in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- driver side

def stream_specs(cfg: ExperimentConfig, class_names: tuple[str, ...], semi: bool) -> dict[str, Any]:
    """The patch streams a run needs: ``spec_train`` (augmented L, ``augment.*``),
    ``spec_eval`` (V and T, ``eval.tta`` windows per colony), ``spec_plain`` (un-augmented
    L for BatchNorm recalibration) and, for MPL/IPB, ``spec_uda`` and ``spec_label``."""
    from ipb_ray.patches.geometry import PatchGeometry
    from ipb_ray.patches.core import StreamSpec

    geometry, aug = PatchGeometry.from_config(cfg.data), cfg.augment
    specs = {"spec_train": StreamSpec(geometry, class_names, seed=cfg.seed, mode="train", augment=aug),
             "spec_eval": StreamSpec(geometry, class_names, seed=cfg.seed, mode="test", tta=cfg.eval.tta),
             "spec_plain": StreamSpec(geometry, class_names, seed=cfg.seed, mode="plain")}
    if semi:
        specs.update(spec_uda=StreamSpec(geometry, class_names, seed=cfg.seed, mode="uda", augment=aug),
                     spec_label=StreamSpec(geometry, class_names, seed=cfg.seed, mode="label"))
    return specs


def train_fold(cfg: ExperimentConfig, fold: int | None = None, *, digest_dir: str | None = None,
               callbacks: list[Any] | None = None, mlflow_run: tuple[str, str] | None = None) -> dict[str, Any]:
    """Train and test one fold; returns the final metrics (with ``test_report``).

    ``callbacks``: Ray Train callbacks for the run (a Tune trial passes
    ``TuneReportCallback`` so every epoch's ``objective`` reaches the scheduler).
    ``mlflow_run``: ``(tracking URI, run id)`` that rank 0 logs every epoch's history row
    to as the epoch ends (:func:`ipb_ray.tracking.runs.log_epoch`)."""
    from ipb_ray.distributed.ray_setup import init_ray
    from ipb_ray.distributed.epoch_stream import crop_cache
    from ipb_ray.distributed.streams import lease_states, release_states

    from ipb_ray.methods import get_method

    fold = cfg.split.fold if fold is None else fold
    local_run_storage(cfg, fold)  # local mode refuses remote storage before anything starts
    inputs = fold_inputs(cfg, fold)
    semi = get_method(cfg.method.name).semi_supervised
    if semi and not inputs.unlabelled:
        raise ValueError(f"fold {fold} of {inputs.catalog} has no unlabelled colonies; method.name="
                         f"{cfg.method.name} needs some (lower split.labelled_fraction, or use a supervised method)")
    if semi:
        try:
            unlabelled_steps(len(inputs.unlabelled), max(cfg.resources.num_workers, 1), cfg.method)
        except ValueError as exc:
            raise ValueError(f"fold {fold}: {exc}") from None
    init_ray(cfg.resources)
    specs = stream_specs(cfg, inputs.class_names, semi)
    cache = crop_cache(inputs.catalog, cpus=cfg.resources.data_cpus, workers=data_workers(cfg))
    keys = ("u_state", "label_state") if semi else ()
    leased = lease_states(len(keys))
    states = {key: name for key, (name, _handle) in zip(keys, leased)}
    try:
        result = _trainer(cfg, fold, inputs, specs, states, cache, digest_dir, callbacks, mlflow_run).fit()
    finally:
        release_states(leased)
    metrics = dict(result.metrics or {})
    if "test_report" not in metrics:
        raise RuntimeError(f"run {run_name(cfg, fold)} ended without test metrics; see {result.path}")
    metrics["checkpoint"], metrics["local_checkpoint"] = checkpoint_locations(result.checkpoint)
    metrics["history"] = read_history(metrics["local_checkpoint"])
    return metrics


def _trainer(cfg: ExperimentConfig, fold: int, inputs: FoldInputs, specs: dict[str, Any], states: dict[str, str],
             cache: Any, digest_dir: str | None, callbacks: list[Any] | None,
             mlflow_run: tuple[str, str] | None = None) -> Any:
    """The ``TorchTrainer`` of one fold: its patch streams, loop, scaling and storage.
    Every stream (training, calibration, validation, test) is cut from ``cache`` by Ray
    Data tasks the loop starts itself (:mod:`ipb_ray.distributed.epoch_stream`): each
    rank takes its share of a plan, so Train splits no dataset."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.resources
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    return TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": to_dict(cfg), "inputs": inputs, **specs, **states, "digest_dir": digest_dir,
                           "local_run_dir": local_run_storage(cfg, fold),
                           "checkpoints_to_keep": r.checkpoints_to_keep, "mlflow_run": mlflow_run,
                           "cache": cache, "data_workers": data_workers(cfg)},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=run_name(cfg, fold), storage_path=storage_uri(cfg.tracking.storage_path),
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=r.checkpoints_to_keep),
                             callbacks=callbacks or None))


def local_run_storage(cfg: ExperimentConfig, fold: int) -> str | None:
    """Where a local-mode run (``resources.num_workers=0``: Ray Train runs the loop in this
    process, with no controller to persist checkpoints) keeps them itself:
    ``<storage>/<run name>``, as Train would; None with Train workers."""
    if cfg.resources.num_workers > 0:
        return None
    where = cfg.tracking.storage_path
    if "://" in where:
        raise ValueError(f"resources.num_workers=0 trains in this process and keeps checkpoints itself, on a "
                         f"local path; tracking.storage_path={where!r} is remote. Use resources.num_workers>=1 "
                         "for remote storage, or give a local (or mounted) tracking.storage_path")
    return os.path.join(storage_uri(where), run_name(cfg, fold))


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


def read_history(checkpoint_dir: str | None) -> list[dict[str, Any]]:
    """Per-epoch metrics stored with a checkpoint (empty when it has none)."""
    import json

    path = os.path.join(checkpoint_dir, HISTORY_FILE) if checkpoint_dir else None
    if not path or not os.path.exists(path):
        return []
    with open(path) as fh:
        return json.load(fh)


def storage_uri(path: str) -> str:
    """Ray Train storage: a URI (``s3://``, ``gs://``, ...) as given, a local path made
    absolute (Train workers run in their own working directories)."""
    return path if "://" in path else os.path.abspath(path)
