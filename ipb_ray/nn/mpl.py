"""Meta Pseudo Labels with UDA: the losses and one teacher/student step (pure torch).

One MPL step (shared/IPB.md, "Training (Algorithm 1)", step b), for a labelled batch
``(x_l, y_l)`` and weak/strong views ``x_uw``/``x_us`` of the same unlabelled patches:

1. Teacher forward on ``x_l``, ``x_uw`` and ``x_us`` as one batch.
2. Student: cross-entropy of ``S(x_us)`` against the teacher's hard pseudo-labels
   ``argmax T(x_us)`` (optionally only those with confidence >= threshold), one SGD step.
3. Feedback ``h``: the student's labelled loss before minus after that step
   (``method.mpl.mpl_feedback`` flips the sign to the MPL authors' code).
4. Teacher: CE on ``x_l`` + ramped UDA loss + ``h`` * CE of ``T(x_us)`` against its own
   hard pseudo-labels; one step.

Models are plain ``nn.Module``s called as ``model(*inputs)`` with one input batch per
scale (two for a multi-scale model); they may return ``(logits, features)`` or logits.
Nothing here imports Ray; mixed precision comes in as an ``autocast`` factory from the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, ContextManager, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from ipb_ray.nn.optim import frozen_bn_stats, optimizer_step

__all__ = [
    "ema_update",
    "mpl_feedback",
    "mpl_step",
    "pseudo_labels",
    "student_loss",
    "student_lr_at",
    "uda_loss",
    "uda_weight",
]

Inputs = torch.Tensor | Sequence[torch.Tensor]
_Num = TypeVar("_Num", float, torch.Tensor)


# --------------------------------------------------------------------------- losses

def uda_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor, temperature: float,
             threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """UDA consistency loss of the teacher.

    ``logits_weak``, ``logits_strong``: (B, C), the teacher on the weak and the strong
    view of the same patches. Targets are ``softmax(logits_weak / temperature)``
    (detached); the loss per patch is KL(target || softmax(logits_strong)), which has the
    gradient of the soft cross-entropy and is 0 when both views agree at temperature 1.
    A patch counts only where the unsharpened confidence ``max softmax(logits_weak)``
    >= ``threshold``; the sum is divided by B (masked patches count as zero).
    Returns ``(loss, mask)``: a scalar and a (B,) float 0/1 mask.
    """
    weak = logits_weak.detach().float()
    log_target = F.log_softmax(weak / temperature, dim=-1)
    log_pred = F.log_softmax(logits_strong.float(), dim=-1)
    per_patch = F.kl_div(log_pred, log_target, reduction="none", log_target=True).sum(-1)
    mask = (F.softmax(weak, dim=-1).amax(-1) >= threshold).float()
    return (per_patch * mask).sum() / max(per_patch.numel(), 1), mask


def uda_weight(step: int, uda_weight: float, uda_steps: int) -> float:
    """Weight of the UDA loss at global MPL ``step`` (0-based): ``λ_u · min(1, step / uda_steps)``.
    ``uda_steps`` <= 0 means no ramp (full weight from the start)."""
    if uda_steps <= 0:
        return float(uda_weight)
    return float(uda_weight) * min(1.0, max(step, 0) / uda_steps)


def pseudo_labels(logits: torch.Tensor, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels of (B, C) logits (detached): ``(hard, confidence, mask)`` with
    ``hard`` (B,) int64 argmax, ``confidence`` (B,) max softmax probability, and ``mask``
    (B,) float, 1 where ``confidence >= threshold``."""
    probs = F.softmax(logits.detach().float(), dim=-1)
    confidence, hard = probs.max(dim=-1)
    return hard, confidence, (confidence >= threshold).float()


def student_loss(student_logits: torch.Tensor, hard_labels: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of (B, C) logits against (B,) hard pseudo-labels.

    Without ``mask``: the batch mean. With a (B,) 0/1 ``mask``: the mean over the patches
    that pass; when none passes, an exact 0 that is still part of the graph (its
    gradient is zero, never NaN), so every worker runs the same backward.
    """
    per_patch = F.cross_entropy(student_logits.float(), hard_labels, reduction="none")
    if mask is None:
        return per_patch.mean()
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def mpl_feedback(loss_old: _Num, loss_new: _Num, mode: str) -> _Num:
    """The MPL feedback ``h`` from the student's labelled loss before (``loss_old``) and
    after (``loss_new``) its step. ``"old_minus_new"`` (the first-order derivation,
    positive when the student improved) or ``"new_minus_old"`` (the MPL authors' code)."""
    if mode == "old_minus_new":
        return loss_old - loss_new
    if mode == "new_minus_old":
        return loss_new - loss_old
    raise ValueError(f"unknown MPL feedback mode {mode!r} (method.mpl.mpl_feedback); "
                     "choose old_minus_new or new_minus_old")


# --------------------------------------------------------------------------- one step

def _as_inputs(x: Inputs) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _logits(out: Any) -> torch.Tensor:
    """Logits of a model output: ``(logits, features)`` or a bare tensor."""
    return out[0] if isinstance(out, (tuple, list)) else out


def mpl_step(teacher: nn.Module, student: nn.Module, t_opt: torch.optim.Optimizer,
             s_opt: torch.optim.Optimizer, x_l: Inputs, y_l: torch.Tensor, x_uw: Inputs,
             x_us: Inputs, *, step: int, cfg: Any, label_smoothing: float = 0.0, grad_clip: float = 0.0,
             autocast: Callable[[], ContextManager[Any]] | None = None,
             adjust: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """One Meta Pseudo Labels step: updates ``student`` then ``teacher`` in place.

    ``x_l``, ``x_uw``, ``x_us``: one (N, 1, H, W) batch per scale (a tuple/list, or a
    tensor for a single scale); ``y_l``: (N_l,) int64 labels; the weak and strong views
    share their batch size. ``step``: the global MPL step (0-based) for the UDA ramp.
    ``cfg``: MPL's hyperparameters (``method.mpl``, :class:`ipb_ray.methods.mpl.MPLParams`);
    ``label_smoothing`` (the teacher's labelled loss) and ``grad_clip`` are the run's.
    ``adjust``: a correction of the teacher's strong-view logits before they become the
    student's hard pseudo-labels (e.g. a balancer's logit adjustment); None = as they are.
    ``autocast``: a zero-argument context-manager factory (e.g. bf16 autocast on GPU) that
    wraps the forward passes, never the backward ones. Both models should be in train mode. The student's labelled loss is measured
    without grad, in the same mode, just before and just after its step, so ``h``
    reflects the parameter change only.

    Returns floats: ``teacher_loss`` (total) and its parts ``teacher_loss_l``,
    ``uda_loss`` (unweighted), ``uda_weight``, ``teacher_loss_mpl`` (unweighted CE);
    ``student_loss``, ``student_loss_l_old``/``_new``, ``mpl_h``, ``student_loss_sup`` (the
    student's labelled step with ``cfg.student_labelled`` > 0, else 0); ``mask_rate`` (share of
    strong-view pseudo-labels with confidence >= threshold, the ones the student learns
    from when ``cfg.threshold_student``), ``uda_mask_rate``; and
    ``pseudo_label_counts``, a list of per-class counts of all hard pseudo-labels, and
    ``pseudo_labels``, the hard pseudo-label of every unlabelled patch (a list).
    """
    x_l, x_uw, x_us = _as_inputs(x_l), _as_inputs(x_uw), _as_inputs(x_us)
    if not len(x_l) == len(x_uw) == len(x_us):
        raise ValueError(f"x_l, x_uw and x_us must have one batch per scale each, got "
                         f"{len(x_l)}, {len(x_uw)} and {len(x_us)}")
    n_l, n_u = x_l[0].shape[0], x_uw[0].shape[0]

    # 1. teacher on labelled + weak + strong as one batch (shared BN statistics, as in MPL)
    t_in = [torch.cat(views) for views in zip(x_l, x_uw, x_us)]
    fwd = autocast or contextlib.nullcontext  # mixed precision wraps the forwards only
    with fwd():
        t_logits = _logits(teacher(*t_in))
    t_logits_l, t_logits_uw, t_logits_us = t_logits.split([n_l, n_u, n_u])
    t_loss_l = F.cross_entropy(t_logits_l.float(), y_l, label_smoothing=label_smoothing)
    t_loss_uda, uda_mask = uda_loss(t_logits_uw, t_logits_us, cfg.temperature, cfg.threshold)
    w_uda = uda_weight(step, cfg.uda_weight, cfg.uda_steps)
    hard, _, mask = pseudo_labels(adjust(t_logits_us.detach()) if adjust else t_logits_us, cfg.threshold)
    student_mask = mask if cfg.threshold_student else None

    # 2. student on the teacher's hard pseudo-labels of the strong view
    # the two measurements of the student's labelled loss run in train mode (as the step
    # itself) but must not move its BatchNorm running statistics towards L
    with torch.no_grad(), frozen_bn_stats(student):
        with fwd():
            s_loss_l_old = F.cross_entropy(_logits(student(*x_l)).float(), y_l)
    with fwd():
        s_logits = _logits(student(*x_us))
    s_loss = student_loss(s_logits, hard, student_mask)
    optimizer_step(s_opt, student, s_loss, grad_clip)
    with torch.no_grad(), frozen_bn_stats(student):
        with fwd():
            s_loss_l_new = F.cross_entropy(_logits(student(*x_l)).float(), y_l)

    # 3-4. feedback and teacher step; the MPL term uses the student's mask, since the
    # first-order derivation rewards the teacher only for labels the student learnt from
    h = mpl_feedback(s_loss_l_old, s_loss_l_new, cfg.mpl_feedback).detach()
    t_loss_mpl = student_loss(t_logits_us, hard, student_mask)
    t_loss = t_loss_l + w_uda * t_loss_uda + h * t_loss_mpl
    optimizer_step(t_opt, teacher, t_loss, grad_clip)

    # 5. optionally, the student's own labelled step (after h, which must measure the
    # pseudo-label step alone): the MPL student otherwise never sees a label until fine-tuning
    w_l = float(getattr(cfg, "student_labelled", 0.0) or 0.0)
    s_loss_sup = torch.zeros((), device=s_loss.device)
    if w_l > 0:
        with fwd():
            s_logits_l = _logits(student(*x_l))
        s_loss_sup = F.cross_entropy(s_logits_l.float(), y_l, label_smoothing=label_smoothing)
        optimizer_step(s_opt, student, w_l * s_loss_sup, grad_clip)

    names = ("teacher_loss", "teacher_loss_l", "uda_loss", "teacher_loss_mpl", "student_loss",
             "student_loss_l_old", "student_loss_l_new", "mpl_h", "mask_rate", "uda_mask_rate", "student_loss_sup")
    values = torch.stack([t_loss, t_loss_l, t_loss_uda, t_loss_mpl, s_loss, s_loss_l_old,
                          s_loss_l_new, h, mask.mean(), uda_mask.mean(), s_loss_sup.detach().float()]).detach()
    out: dict[str, Any] = dict(zip(names, values.tolist()))  # one device sync
    out["uda_weight"] = w_uda
    out["pseudo_label_counts"] = torch.bincount(hard, minlength=t_logits.shape[-1]).tolist()
    out["pseudo_labels"] = hard.tolist()
    return out


# --------------------------------------------------------------------------- schedule, EMA

def student_lr_at(epoch: int, cfg: Any) -> float:
    """Student learning rate in MPL/IPB ``epoch`` (0-based): ``cfg.student_warmup_lr`` for
    the first ``cfg.student_warmup_epochs`` epochs, ``cfg.student_lr`` afterwards."""
    return cfg.student_warmup_lr if epoch < cfg.student_warmup_epochs else cfg.student_lr


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """In place: every floating parameter of ``ema_model`` becomes
    ``decay * ema + (1 - decay) * model``; buffers (BN statistics, counters) are copied.
    ``decay`` = 0 (``method.mpl.ema`` off) leaves ``ema_model`` an exact copy of ``model``,
    so callers may skip the call. Both models must have the same structure."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1] (method.mpl.ema), got {decay}")
    ema_params, params = dict(ema_model.named_parameters()), dict(model.named_parameters())
    ema_bufs, bufs = dict(ema_model.named_buffers()), dict(model.named_buffers())
    if ema_params.keys() != params.keys() or ema_bufs.keys() != bufs.keys():
        raise ValueError("ema_model and model have different parameters or buffers; "
                         "build the EMA model as a deep copy of the model")
    for name, p in params.items():
        e = ema_params[name]
        if e.dtype.is_floating_point:
            e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
        else:
            e.copy_(p)
    for name, b in bufs.items():
        ema_bufs[name].copy_(b)
