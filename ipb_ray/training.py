"""Supervised training of one fold on Ray Train (the paper's baselines; IPB's teacher
pre-training uses the same loop).

Driver side (:func:`train_fold`): read the fold's roles, build three Ray Data patch
streams (train: labelled L, resampled per epoch; val: V; test: T) and run a
``TorchTrainer``. Worker side (:func:`_train_loop`): DDP model, SGD, per-epoch
``ray.train.report`` with a checkpoint written by rank 0 that holds everything needed to
resume (model, optimiser, scheduler, epoch, RNG state, best-so-far weights). A killed
worker restarts the group from the latest checkpoint (``FailureConfig``); rerunning the
same run name resumes it. The best model is chosen on V (never on T) and tested on T at
the end by rank 0.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from ipb_ray.config import ExperimentConfig, from_dict, to_dict

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"


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


def fold_inputs(cfg: ExperimentConfig, fold: int) -> FoldInputs:
    """Read the catalog manifest and the stored folds; check the fold can be trained."""
    from ipb_ray import catalog
    from ipb_ray.folds import read_folds

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
    return FoldInputs(root, names, tuple(roles["L"]), tuple(index[label_of[c]] for c in roles["L"]),
                      tuple(roles["V"]), tuple(roles["T"]), tuple(roles["U"]))


def run_name(cfg: ExperimentConfig, fold: int) -> str:
    return f"{cfg.name}-{cfg.method.name}-fold{fold}"


# --------------------------------------------------------------------------- worker side

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


def _train_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.collective
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from ipb_ray.balance import resample_counts
    from ipb_ray.metrics import classification_report
    from ipb_ray.models import create_model
    from ipb_ray.streams import STATE_NAMESPACE, torch_batches

    cfg: ExperimentConfig = from_dict(config["cfg"])
    inputs: FoldInputs = config["inputs"]
    spec_train, spec_eval = config["spec_train"], config["spec_eval"]
    m = cfg.method
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    amp = m.mixed_precision and device.type == "cuda"
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    model = create_model(cfg.model.backbone, len(inputs.class_names), in_chans=1, width=cfg.model.width,
                         feature_dim=cfg.model.feature_dim, dropout=cfg.model.dropout,
                         multi_scale=cfg.data.multi_scale)
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=m.lr, momentum=m.momentum, weight_decay=m.weight_decay,
                          nesterov=m.nesterov)
    # the authors' teacher pre-training drops the lr tenfold halfway
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, m.epochs // 2)], gamma=0.1)
    start, best_metric, best_state, resumed_from = 0, -1.0, None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, best_metric, best_state = state["epoch"] + 1, state["best_metric"], state["best_model"]
        resumed_from = state["epoch"]
    actor = ray.get_actor(config["state"], namespace=STATE_NAMESPACE)
    columns = spec_train.patch_columns()
    labels = np.asarray(inputs.labelled_labels)

    def final() -> dict[str, Any]:
        """Rank 0's end-of-run figures: the selected model on T, and where the run began."""
        return {**_test_metrics(model, best_state, inputs, spec_eval, columns, device, amp, m.batch_size),
                "resumed_from_epoch": -1 if resumed_from is None else resumed_from,
                "param_digest": param_digest(_unwrap(model))}

    for epoch in range(start, m.epochs):
        if rank == 0:
            counts = resample_counts(labels, None, cfg.seed, epoch, balanced=m.balance_labelled)
            ray.get(actor.set.remote(epoch, {cid: int(c) for cid, c in zip(inputs.labelled, counts) if c}))
        ray.train.collective.barrier()
        model.train()
        t_epoch = time.perf_counter()
        loss_sum, seen, wait_s, first_batch_s = torch.zeros(2, device=device), 0, 0.0, None
        t_wait = t_epoch
        for batch in torch_batches(ray.train.get_dataset_shard("train"), spec_train, m.batch_size,
                                   device=str(device)):
            now = time.perf_counter()
            wait_s += now - t_wait  # time the loop stood waiting for data (start-up included)
            first_batch_s = now - t_epoch if first_batch_s is None else first_batch_s
            with _autocast(device, amp):
                logits, _ = model(*_inputs(batch, columns, device))
                loss = F.cross_entropy(logits.float(), batch["label"].to(device),
                                       label_smoothing=m.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if m.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), m.grad_clip)
            opt.step()
            loss_sum += torch.stack([loss.detach().float() * len(batch["label"]),
                                     torch.tensor(float(len(batch["label"])), device=device)])
            seen += 1
            t_wait = time.perf_counter()
        sched.step()
        train_seconds = time.perf_counter() - t_epoch
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss_sum)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": float(loss_sum[0] / max(loss_sum[1], 1)),
                                   "train_steps": seen, "train_seconds": train_seconds,
                                   "train_patches_per_s": float(loss_sum[1]) / max(train_seconds, 1e-9),
                                   "data_wait_fraction": wait_s / max(train_seconds, 1e-9),
                                   "first_batch_s": first_batch_s if first_batch_s is not None else float("nan"),
                                   "lr": sched.get_last_lr()[0], "world_size": world}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                if inputs.validation:
                    y, p, _ = evaluate(_unwrap(model), torch_batches(
                        ray.train.get_dataset_shard("val"), spec_eval, m.batch_size, drop_last=False,
                        device=str(device)), columns, device, amp)
                    val = classification_report(y, p, inputs.class_names)
                    metrics.update(val_balanced_accuracy=val["balanced_accuracy"], val_accuracy=val["accuracy"])
                    score = val["balanced_accuracy"]
                else:  # no V: the latest model is the selected one
                    score = float(epoch)
                if score >= best_metric:
                    best_metric = score
                    best_state = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
                    metrics["best_epoch"] = epoch
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": epoch, "torch_rng": torch.get_rng_state(),
                            "best_metric": best_metric, "best_model": best_state,
                            "class_names": list(inputs.class_names), "config": config["cfg"]},
                           os.path.join(tmp, CHECKPOINT_FILE))
                if epoch == m.epochs - 1:
                    metrics.update(final())
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
    if start >= m.epochs:  # the run had already finished: test its selected model again
        metrics = {"epoch": m.epochs - 1, "world_size": world}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                metrics.update(final())
                # the run's result carries the metrics of its latest checkpoint: report the
                # finished state again so that these figures are the ones returned
                torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
    if config.get("digest_dir"):  # lets tests compare the ranks' final parameters
        with open(os.path.join(config["digest_dir"], f"rank{rank}.txt"), "w") as fh:
            fh.write(param_digest(_unwrap(model)))


def _test_metrics(model, best_state, inputs: FoldInputs, spec_eval, columns, device, amp, batch_size):
    import ray.train

    from ipb_ray.metrics import classification_report
    from ipb_ray.streams import torch_batches

    net = _unwrap(model)
    current = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    y, p, _ = evaluate(net, torch_batches(ray.train.get_dataset_shard("test"), spec_eval, batch_size,
                                          drop_last=False, device=str(device)), columns, device, amp)
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

def train_fold(cfg: ExperimentConfig, fold: int | None = None, *, digest_dir: str | None = None
               ) -> dict[str, Any]:
    """Train and test one fold; returns the final metrics (with ``test_report``)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ipb_ray.patches import PatchGeometry
    from ipb_ray.ray_setup import init_ray
    from ipb_ray.streams import StreamSpec, patch_dataset, stream_state

    fold = cfg.split.fold if fold is None else fold
    inputs = fold_inputs(cfg, fold)
    init_ray(cfg.resources)
    geometry = PatchGeometry.from_config(cfg.data)
    spec_train = StreamSpec(geometry, inputs.class_names, seed=cfg.seed, mode="train")
    spec_eval = StreamSpec(geometry, inputs.class_names, seed=cfg.seed, mode="test")
    state_name = f"ipb-stream-{uuid.uuid4().hex[:12]}"
    state = stream_state(state_name)
    r = cfg.resources
    data_kw = dict(batch_size=cfg.method.batch_size, cpus=r.data_cpus)
    datasets = {
        "train": patch_dataset(inputs.catalog, spec_train, state_name=state_name, **data_kw),
        "val": patch_dataset(inputs.catalog, spec_eval, ids=inputs.validation or inputs.labelled[:1], **data_kw),
        "test": patch_dataset(inputs.catalog, spec_eval, ids=inputs.test, **data_kw),
    }
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": to_dict(cfg), "inputs": inputs, "spec_train": spec_train,
                           "spec_eval": spec_eval, "state": state_name, "digest_dir": digest_dir},
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=run_name(cfg, fold), storage_path=os.path.abspath(cfg.tracking.storage_path),
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=r.checkpoints_to_keep)),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]))
    try:
        result = trainer.fit()
    finally:
        ray.kill(state)
    metrics = dict(result.metrics or {})
    if "test_report" not in metrics:
        raise RuntimeError(f"run {run_name(cfg, fold)} ended without test metrics; see {result.path}")
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    return metrics
