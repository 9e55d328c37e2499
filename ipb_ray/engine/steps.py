"""The torch work of a run that does not care who runs it: a labelled epoch, BatchNorm
recalibration, evaluation on V or T, weight snapshots and digests. Plain functions over a
network and an iterable of batches (dicts of tensors with ``label`` and ``colony_id``).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from ipb_ray.engine.fold import FoldInputs

__all__ = ["Timer", "autocast", "evaluate", "param_digest", "recalibrate", "snapshot", "supervised_epoch",
           "test_metrics", "to_device", "unwrap", "validate"]


def to_device(batch: dict[str, Any], columns: list[str], device: Any) -> list[Any]:
    return [batch[c].to(device, non_blocking=True) for c in columns]


def autocast(device: Any, enabled: bool):
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
            with autocast(device, amp):
                logits, _ = model(*to_device(batch, columns, device))
            p = torch.softmax(logits.float(), dim=1).cpu().numpy()
            for cid, label, row in zip(batch["colony_id"], batch["label"].tolist(), p):
                probs[cid] = probs.get(cid, 0) + row
                truth[cid] = label
    ids = sorted(probs)
    return (np.array([truth[c] for c in ids], np.int64),
            np.array([int(np.argmax(probs[c])) for c in ids], np.int64), ids)


class Timer:
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


def supervised_epoch(model: Any, opt: Any, batches: Any, columns: list[str], device: Any, amp: bool,
                     m: Any, lr_at: Any = None, first_step: int = 0,
                     all_reduce: Callable[[Any], Any] = lambda t: t) -> dict[str, Any]:
    """One epoch of cross-entropy training over ``batches`` (every rank); returns the
    epoch's loss (averaged over all ranks by ``all_reduce``), steps and timings.
    ``lr_at(step)``: the lr of global step ``first_step + i`` (set before each step); None
    leaves the lr alone."""
    import torch
    import torch.nn.functional as F

    from ipb_ray.nn.optim import set_lr

    model.train()
    timer, loss_sum, seen = Timer(), torch.zeros(2, device=device), 0
    for batch in batches:
        timer.got()
        if lr_at is not None:
            set_lr(opt, lr_at(first_step + seen))
        with autocast(device, amp):
            logits, _ = model(*to_device(batch, columns, device))
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
    all_reduce(loss_sum)
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
            with autocast(device, amp):
                net(*to_device(batch, columns, device))

    nets = [unwrap(n) for n in model] if isinstance(model, (list, tuple)) else unwrap(model)
    return recalibrate_bn(nets, batches(), forward, max_batches)


def validate(model: Any, inputs: FoldInputs, batches: Any, columns: list[str], device: Any,
             amp: bool) -> dict[str, Any] | None:
    """Rank 0: ``model`` on the validation split V (None when the fold has no V);
    ``batches()`` gives V's stream."""
    from ipb_ray.evaluation.metrics import classification_report

    if not inputs.validation:
        return None
    y, p, _ = evaluate(unwrap(model), batches(), columns, device, amp)
    return classification_report(y, p, inputs.class_names)


def snapshot(model: Any) -> dict[str, Any]:
    """A CPU copy of a (possibly DDP-wrapped) model's state dict."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def test_metrics(model: Any, best_state: dict[str, Any] | None, inputs: FoldInputs, batches: Any, columns: list[str],
                 device: Any, amp: bool) -> dict[str, Any]:
    """``model`` with ``best_state`` loaded (its own weights put back after) on T."""
    from ipb_ray.evaluation.metrics import classification_report

    net = unwrap(model)
    current = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    y, p, _ = evaluate(net, batches, columns, device, amp)
    net.load_state_dict(current)
    report = classification_report(y, p, inputs.class_names)
    return {"test_balanced_accuracy": report["balanced_accuracy"], "test_macro_f1": report["macro_f1"],
            "test_report": report}


def unwrap(model: Any) -> Any:
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
