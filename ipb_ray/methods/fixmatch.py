"""FixMatch (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency
and Confidence", NeurIPS 2020).

One network. Every step of the ``fixmatch`` stage passes a labelled batch (weak view) and
an unlabelled batch in its weak and its strong view through the network as one batch
(shared BatchNorm statistics, as the paper's code does); the weak view's prediction,
without gradient, is the pseudo-label of the patch, kept where its confidence is at least
``method.fixmatch.threshold`` (0.95, the paper's), and the strong view is trained to
predict it: loss = CE(L) + ``method.fixmatch.weight`` (lambda_u = 1) times the masked
cross-entropy averaged over the whole unlabelled batch (:func:`ipb_ray.nn.ssl.fixmatch_loss`).
The strong view is the project's RandAugment for grayscale microscopy plus cutout
(``augment.strong_*``), as the paper's is RandAugment plus Cutout.

Optional stages shared with the other semi-supervised methods: ``method.teacher_epochs``
of supervised warm-up on class-balanced L first, ``method.finetune_epochs`` of fine-tuning
on L last. Balancers compose: ``method.balancer=pseudo_balance`` draws each epoch's U
pseudo-balanced on this network's labels (IPB's resampling); ``logit_adjust`` debiases
the weak-view pseudo-labels by U's estimated class prior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ipb_ray.methods.base import OneNetworkMethod, Stage, register_method
from ipb_ray.params import Params, param

__all__ = ["FixMatch", "FixMatchParams"]


@dataclass(frozen=True)
class FixMatchParams(Params):
    """`fixmatch`: which weak-view pseudo-labels count, and how much."""

    threshold: float = param(0.95, lo=0.0, hi=1.0, doc="confidence a weak-view pseudo-label needs (the paper's "
                             "tau = 0.95)")
    weight: float = param(1.0, lo=0.0, hi=100.0, doc="lambda_u: weight of the unlabelled loss (the paper's 1)")
    lr: float = param(0.0, lo=0.0, hi=10.0, doc="peak lr of the FixMatch stage; 0 = method.lr. After a "
                      "supervised warm-up a lower peak keeps the stage from re-heating a trained network")


@register_method("fixmatch")
class FixMatch(OneNetworkMethod):
    title = "FixMatch (Sohn et al. 2020): weak-view pseudo-labels, strong-view consistency"
    stage_name, stage_title = "fixmatch", "FixMatch"
    params = FixMatchParams

    def train_step(self, stage: Stage, labelled: dict[str, Any], unlabelled: dict[str, Any], *,
                   step: int, lr_factor: float, stage_epoch: int) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        from ipb_ray.nn.mpl import pseudo_labels
        from ipb_ray.nn.optim import optimizer_step, set_lr
        from ipb_ray.nn.ssl import fixmatch_loss

        m, p, ctx, net, opt = self.m, self.p, self.ctx, self.nets["model"], self.opts["model"]
        set_lr(opt, (p.lr or m.lr) * lr_factor)
        x_l, y_l = ctx.tensors(labelled, ctx.columns), ctx.labels(labelled)
        x_uw, x_us = ctx.tensors(unlabelled, ctx.weak_columns), ctx.tensors(unlabelled, ctx.strong_columns)
        n_l, n_u = y_l.shape[0], x_uw[0].shape[0]
        with ctx.autocast():  # labelled, weak and strong as one batch
            out = net(*[torch.cat(views) for views in zip(x_l, x_uw, x_us)])
        logits = (out[0] if isinstance(out, (tuple, list)) else out).float()
        logits_l, logits_uw, logits_us = logits.split([n_l, n_u, n_u])
        hard, _, mask = pseudo_labels(self.adjust(logits_uw.detach()), p.threshold)
        loss_l = F.cross_entropy(logits_l, y_l, label_smoothing=m.label_smoothing)
        loss_u = fixmatch_loss(logits_us, hard, mask)
        loss = loss_l + p.weight * loss_u
        optimizer_step(opt, net, loss, m.grad_clip)
        values = torch.stack([loss, loss_l, loss_u, mask.mean()]).detach().tolist()
        return {**dict(zip(self.step_metrics, values)), "pseudo_labels": hard.tolist()}
