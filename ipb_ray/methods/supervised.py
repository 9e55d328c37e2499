"""The supervised baseline: one network, cross-entropy on class-balanced L."""

from __future__ import annotations

from ipb_ray.methods.base import Method, Stage, register_method

__all__ = ["Supervised"]


@register_method("supervised")
class Supervised(Method):
    """The paper's baselines (VGG19, HRNet, multi-scale HRNet): one network trained on L,
    resampled to balance its classes every epoch, for ``method.epochs`` epochs at
    ``method.lr``."""

    title = "supervised on class-balanced L"
    baseline = True

    @classmethod
    def stages(cls, cfg):
        m = cfg.method
        return [Stage("supervised", m.epochs, "model", title="supervised", optimizer="model", lr=m.lr)]

    def build(self) -> None:
        self.nets["model"] = self.ctx.network(self.cfg.seed)
        self.opts["model"] = self.ctx.optimizer(self.nets["model"], self.m.lr)
