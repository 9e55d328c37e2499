"""Optimisation pieces shared by every training loop (pure torch, no Ray).

- :func:`lr_factor`: the learning-rate multiplier at an optimizer step (linear warm-up,
  then cosine decay to zero; or constant; or the authors' x0.1 at half the steps).
  Training loops set ``lr = base_lr * lr_factor(step, total, ...)`` before every step,
  so the schedule depends on the step counter alone and a resumed run continues it
  exactly, with no scheduler state to save.
- :func:`make_optimizer`: SGD (the paper's, momentum) or AdamW from the method config.
- :func:`recalibrate_bn`: re-estimate every BatchNorm layer's running statistics on
  un-augmented batches, so eval-mode predictions see the statistics of the inputs they
  are given (the running averages of training mix augmented, strong-view or too few
  batches, and an eval-mode network can then predict one class for everything).
- :func:`frozen_bn_stats`: a forward in train mode that leaves the running statistics
  untouched (MPL's measurements of the student's labelled loss).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "frozen_bn_stats", "lr_factor", "make_optimizer", "optimizer_step", "recalibrate_bn", "set_lr",
    "warmup_steps",
]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "cosine") -> float:
    """Multiplier of the base lr at 0-based ``step`` of ``total`` steps.

    ``cosine``: linear warm-up from ``1 / (warmup + 1)`` to 1 over ``warmup`` steps, then
    ``0.5 (1 + cos(pi t))`` with ``t`` the share of the remaining steps done (the last step
    is still above zero). ``constant``: warm-up then 1. ``step``: warm-up, then 1 until
    half the steps and 0.1 afterwards (the authors' teacher pre-training)."""
    if total <= 0:
        raise ValueError(f"a schedule needs at least one step, got total={total}")
    step = min(max(int(step), 0), total - 1)
    warmup = min(max(int(warmup), 0), total - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 1.0 if step < max(1, total // 2) else 0.1
    if schedule == "cosine":
        t = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown lr schedule {schedule!r} (method.schedule); choose cosine, constant or step")


def warmup_steps(total: int, fraction: float) -> int:
    """Warm-up steps of a phase of ``total`` steps (``method.warmup_fraction``)."""
    return int(round(total * fraction))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer: torch.optim.Optimizer, model: nn.Module, loss: torch.Tensor,
                   grad_clip: float = 0.0) -> None:
    """One optimiser step on ``loss``: clear the gradients, backward, clip ``model``'s
    gradient norm to ``grad_clip`` (0 = off), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def make_optimizer(params: Iterable[nn.Parameter], kind: str, lr: float, *, momentum: float = 0.9,
                   weight_decay: float = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    """``sgd`` (with ``momentum``, optionally Nesterov) or ``adamw`` (weight decay
    decoupled, betas (0.9, 0.999))."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r} (method.optimizer); choose sgd or adamw")


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BN)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module | Sequence[nn.Module], batches: Iterable[Any],
                   forward: Callable[[nn.Module, Any], Any], max_batches: int | None = None) -> int:
    """Replace the running mean/var of every BatchNorm layer of ``model`` (or of each of
    several models, over one pass of the batches) by the exact average over ``batches``
    (at most ``max_batches``); returns the batches used.

    ``forward(model, batch)`` runs a model on one batch. The models are left in eval mode
    with their parameters and momentum unchanged; with no batch (or no BN layer) the
    statistics are left as they were."""
    models = [model] if isinstance(model, nn.Module) else list(model)
    layers = [m for net in models for m in _bn_layers(net)]
    if not layers:
        for net in models:
            net.eval()
        return 0
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    for net in models:
        net.train()
    used = 0
    try:
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            for net in models:
                forward(net, batch)
            used += 1
    finally:
        for m, momentum, mean, var, count in saved:
            m.momentum = momentum
            if used == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        for net in models:
            net.eval()
    return used


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers normalise with batch statistics as usual in
    train mode, but their running statistics do not move (momentum 0)."""
    layers = _bn_layers(model)
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
