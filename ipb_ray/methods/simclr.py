"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020) as a baseline of the IPB paper's Table 5.

Two stages on the same folds and Ray Train path as every method:

1. ``contrastive`` (``method.epochs``, unlabelled): the backbone and a projection head (a
   two-layer MLP to ``method.simclr.projection_dim``) learn from U without labels. Each
   unlabelled patch comes as two augmented views (the stream's weak and strong views: the
   paper draws both from one strong family, here one of them is the milder flip/rotate/
   jitter view); the NT-Xent loss (:func:`ipb_ray.nn.ssl.nt_xent`, temperature
   ``method.simclr.temperature``) pulls the two views of a patch together and pushes the
   other patches of the batch away. The classifier is validated but not selected here
   (its head has not been trained).
2. ``supervised`` (``method.simclr.supervised_epochs``, labelled): the whole network
   fine-tuned with cross-entropy on class-balanced L at ``method.lr`` (the paper's
   semi-supervised protocol fine-tunes all layers), selected on V like the supervised
   baseline. ``method.finetune_epochs`` adds the shared fine-tuning stage after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ipb_ray.methods.base import Method, Stage, finetune_stage, register_method
from ipb_ray.params import Params, param

__all__ = ["SimCLR", "SimCLRParams"]


@dataclass(frozen=True)
class SimCLRParams(Params):
    """`simclr`: the contrastive stage and the supervised stage after it."""

    temperature: float = param(0.5, lo=1e-3, hi=10.0, doc="NT-Xent temperature (the paper's 0.5 for small "
                               "batches)")
    projection_dim: int = param(64, lo=2, hi=4096, doc="output size of the projection head")
    supervised_epochs: int = param(200, lo=1, doc="epochs of supervised fine-tuning on balanced L after the "
                                   "contrastive stage")


@register_method("simclr")
class SimCLR(Method):
    title = "SimCLR (Chen et al. 2020): contrastive pre-training on U, then supervised on L"
    semi_supervised = True
    pseudo_labelling = False  # learns from U without labels: nothing for a balancer to balance
    labeller = "model"
    step_metrics = ("contrastive_loss",)
    loss_metric = "contrastive_loss"
    params = SimCLRParams

    @classmethod
    def stages(cls, cfg) -> list[Stage]:
        m = cfg.method
        return [Stage("contrastive", m.epochs, "model", title="contrastive pre-training", unlabelled=True,
                      select=False),
                Stage("supervised", m.simclr.supervised_epochs, "model", title="supervised on L",
                      optimizer="model", lr=m.lr),
                *finetune_stage(cfg, "model")]

    @classmethod
    def keys(cls, cfg) -> tuple[str, ...]:
        # no pre-training stage on L before the contrastive one, and no balancer
        return tuple(k for k in super().keys(cfg) if k not in ("teacher_epochs", "balancer"))

    def build(self) -> None:
        from torch import nn

        m, ctx = self.m, self.ctx
        self.nets["model"] = ctx.network(self.cfg.seed)
        width = ctx.unwrap(self.nets["model"]).head.in_features
        self.nets["projector"] = ctx.prepare(lambda: nn.Sequential(
            nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, self.p.projection_dim)),
            self.cfg.seed + 2)
        self.opts["model"] = ctx.optimizer(self.nets["model"], m.lr)
        self.opts["projector"] = ctx.optimizer(self.nets["projector"], m.lr)
        if m.finetune_epochs:
            self.opts["finetune"] = ctx.optimizer(self.nets["model"], m.finetune_lr)

    def train_step(self, stage: Stage, labelled: dict[str, Any], unlabelled: dict[str, Any], *,
                   step: int, lr_factor: float, stage_epoch: int) -> dict[str, Any]:
        import torch

        from ipb_ray.nn.optim import set_lr
        from ipb_ray.nn.ssl import nt_xent

        m, ctx, net, proj = self.m, self.ctx, self.nets["model"], self.nets["projector"]
        for opt in (self.opts["model"], self.opts["projector"]):
            set_lr(opt, m.lr * lr_factor)
        x_uw, x_us = ctx.tensors(unlabelled, ctx.weak_columns), ctx.tensors(unlabelled, ctx.strong_columns)
        n = x_uw[0].shape[0]
        with ctx.autocast():  # both views as one batch
            logits, feats = net(*[torch.cat(views) for views in zip(x_uw, x_us)])
            z = proj(feats)
        z1, z2 = z.float().split([n, n])
        # the untrained head joins the graph at weight 0, so DDP sees every parameter used
        loss = nt_xent(z1, z2, self.p.temperature) + 0.0 * logits.float().sum()
        for opt in (self.opts["model"], self.opts["projector"]):
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if m.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([*net.parameters(), *proj.parameters()], m.grad_clip)
        for opt in (self.opts["model"], self.opts["projector"]):
            opt.step()
        return {"contrastive_loss": float(loss.detach())}
