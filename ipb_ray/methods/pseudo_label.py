"""Pseudo-Label (Lee, "Pseudo-Label: the simple and efficient semi-supervised learning
method for deep neural networks", ICML 2013 workshop), with a confidence threshold.

One network. After ``method.teacher_epochs`` epochs of supervised pre-training on
class-balanced L, every step of the ``pseudo_label`` stage takes a labelled batch and a
batch of unlabelled patches (the weak view), labels the unlabelled ones with the network
itself (its most likely class, no gradient, BatchNorm statistics left alone), keeps those
at confidence >= ``method.pseudo_label.threshold``, and minimises cross-entropy on L plus
``lambda_u(t)`` times cross-entropy on the kept pseudo-labels; ``lambda_u`` ramps
linearly from 0 to ``method.pseudo_label.weight`` (default 1) over
``method.pseudo_label.ramp_steps`` steps of the stage, as the paper's alpha(t) does. With ``method.balancer=pseudo_balance`` the same network labels U before
each epoch and the unlabelled stream is drawn pseudo-balanced (IPB's balancer on a
different method). ``method.finetune_epochs`` adds the fine-tuning stage on L.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ipb_ray.methods.base import OneNetworkMethod, Stage, register_method
from ipb_ray.params import Params, param

__all__ = ["PseudoLabel", "PseudoLabelParams"]


@dataclass(frozen=True)
class PseudoLabelParams(Params):
    """`pseudo_label` (Lee 2013): which pseudo-labels count, and how much."""

    threshold: float = param(0.65, lo=0.0, hi=1.0, doc="confidence a pseudo-label needs to count")
    weight: float = param(1.0, lo=0.0, hi=100.0, doc="final weight of the loss on confident pseudo-labels "
                          "(Lee's alpha_f; FixMatch's lambda_u is 1)")
    ramp_steps: int = param(5000, lo=1, doc="steps of the linear ramp of the weight from 0 (Lee's alpha(t))")


@register_method("pseudo_label")
class PseudoLabel(OneNetworkMethod):
    title = "Pseudo-Label (Lee 2013), confidence threshold"
    stage_name, stage_title = "pseudo_label", "pseudo-labelling"
    params = PseudoLabelParams

    def build(self) -> None:
        super().build()
        self._weight = 0.0

    def train_step(self, stage: Stage, labelled: dict[str, Any], unlabelled: dict[str, Any], *,
                   step: int, lr_factor: float, stage_epoch: int) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        from ipb_ray.nn.mpl import pseudo_labels, student_loss, uda_weight
        from ipb_ray.nn.optim import frozen_bn_stats, optimizer_step, set_lr

        m, p, ctx, net, opt = self.m, self.p, self.ctx, self.nets["model"], self.opts["model"]
        set_lr(opt, m.lr * lr_factor)
        x_l, y_l = ctx.tensors(labelled, ctx.columns), ctx.labels(labelled)
        x_u = ctx.tensors(unlabelled, ctx.weak_columns)
        with torch.no_grad(), frozen_bn_stats(ctx.unwrap(net)), ctx.autocast():
            out_u = net(*x_u)
        hard, _, mask = pseudo_labels(self.adjust(out_u[0] if isinstance(out_u, (tuple, list)) else out_u),
                                      p.threshold)
        n_l = y_l.shape[0]
        with ctx.autocast():  # labelled and unlabelled as one batch: shared BatchNorm statistics
            out = net(*[torch.cat(pair) for pair in zip(x_l, x_u)])
        logits = (out[0] if isinstance(out, (tuple, list)) else out).float()
        loss_l = F.cross_entropy(logits[:n_l], y_l, label_smoothing=m.label_smoothing)
        loss_u = student_loss(logits[n_l:], hard, mask)
        self._weight = uda_weight(step, p.weight, p.ramp_steps)
        loss = loss_l + self._weight * loss_u
        optimizer_step(opt, net, loss, m.grad_clip)
        values = torch.stack([loss, loss_l, loss_u, mask.mean()]).detach().tolist()
        return {**dict(zip(self.step_metrics, values)), "pseudo_labels": hard.tolist()}

    def epoch_metrics(self, stage: Stage) -> dict[str, Any]:
        return {"unlabelled_weight": self._weight} if stage.unlabelled else {}
