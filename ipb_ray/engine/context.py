"""What a method (:mod:`ipb_ray.methods`) and its balancer may use while they train: the
configuration, the fold, this rank and device, and helpers to build networks and
optimisers, move batches and ask for a labelling pass. The engine builds one per run
(:class:`ipb_ray.engine.loop.Engine`), whoever runs it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ipb_ray.config import ExperimentConfig
from ipb_ray.engine.fold import FoldRun
from ipb_ray.engine.ports import Collective, Labeller
from ipb_ray.engine.steps import autocast, snapshot, to_device, unwrap
from ipb_ray.nn.models import build_model, model_kwargs

__all__ = ["LoopContext"]


class LoopContext:
    """A run's services for its method and balancer (see the module docstring).

    ``prepare``: puts a freshly built module on this rank's device and wraps it for data
    parallelism (Ray Train's ``prepare_model``; in process, a move to the device).
    ``labeller``: the labelling service (None for a supervised run)."""

    def __init__(self, cfg: ExperimentConfig, run: FoldRun, collective: Collective, device: Any, amp: bool,
                 prepare: Callable[[Any], Any], labeller: Labeller | None = None):
        self.cfg, self.run, self.inputs, self.streams = cfg, run, run.inputs, run.streams
        self.collective, self.rank, self.world = collective, collective.rank, collective.world
        self.device, self.amp = device, amp
        self._prepare, self._labeller = prepare, labeller
        self.columns: list[str] = run.streams.train.patch_columns()
        uda = run.streams.uda.patch_columns() if run.streams.uda is not None else []
        self.weak_columns, self.strong_columns = uda[:len(uda) // 2], uda[len(uda) // 2:]  # weak*, then strong*

    def model_kwargs(self) -> dict[str, Any]:
        return model_kwargs(self.cfg, len(self.inputs.class_names), self.inputs)

    def network(self, seed: int) -> Any:
        """A fresh network of the experiment, initialised from ``seed`` (the same on every
        rank), prepared for data parallelism."""
        return self.prepare(lambda: build_model(self.cfg, len(self.inputs.class_names), self.inputs), seed)

    def prepare(self, make: Callable[[], Any], seed: int) -> Any:
        """The module ``make()`` builds with torch seeded by ``seed`` (so the same on every
        rank), prepared like :meth:`network` (e.g. a method's projection head)."""
        import torch

        torch.manual_seed(seed)
        return self._prepare(make())

    def optimizer(self, net: Any, lr: float) -> Any:
        from ipb_ray.nn.optim import make_optimizer

        m = self.cfg.method
        return make_optimizer(net.parameters(), m.optimizer, lr, momentum=m.momentum, weight_decay=m.weight_decay,
                              nesterov=m.nesterov)

    def tensors(self, batch: dict[str, Any], columns: list[str]) -> list[Any]:
        return to_device(batch, columns, self.device)

    def labels(self, batch: dict[str, Any]) -> Any:
        return batch["label"].to(self.device)

    def autocast(self) -> Any:
        return autocast(self.device, self.amp)

    @staticmethod
    def unwrap(model: Any) -> Any:
        return unwrap(model)

    @staticmethod
    def snapshot(model: Any) -> dict[str, Any]:
        return snapshot(model)

    def labelling_job(self, epoch: int, ids: Sequence[str], net: Any) -> Callable[[], Any]:
        """IPB's labelling service for a balancer: ``net``'s weights are taken now, and the
        returned job (run it on any thread) has them label one fresh window of every colony
        of U in ``ids`` for ``epoch``, returning their
        :class:`ipb_ray.patches.pseudo_labels.LabelTable`."""
        if self._labeller is None:
            raise RuntimeError("this run has no labelling service (a supervised method asked for a labelling pass)")
        return self._labeller.job(epoch, ids, self.snapshot(net), self.model_kwargs())

