"""The patch streams of a run's epochs, as plans over the run's crops
(:mod:`ipb_ray.patches.plan`) handed to whoever cuts them (:class:`ipb_ray.engine.ports.Patches`):
the class-balanced draw of L each epoch, the unlabelled stream of a balancer's plan, and
the evaluation streams (the BatchNorm calibration stream, V and T), the first two cut
once and kept when they fit in ``eval.cache_mb``.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping

from ipb_ray.config import ExperimentConfig
from ipb_ray.engine.fold import calibration_counts, eval_batch, labelled_draws
from ipb_ray.engine.ports import Patches
from ipb_ray.patches.core import StreamSpec

__all__ = ["EpochStreams"]


class EpochStreams:
    """One rank's streams of a run (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, ctx: Any, patches: Patches):
        self.cfg, self.m, self.ctx, self.patches = cfg, cfg.method, ctx, patches
        self.inputs, self.specs = ctx.inputs, ctx.streams
        self._kept: dict[str, list[Any] | None] = {}  # V's and the BN stream's batches, once cut
        self.cuts = 0  # evaluation streams cut so far

    def plan(self, **kwargs: Any) -> dict[str, Any]:
        """A plan over the run's crops (:func:`ipb_ray.patches.plan.stream_plan`)."""
        from ipb_ray.patches.plan import stream_plan

        return stream_plan(self.patches.ids, seed=self.cfg.seed, **kwargs)

    def training(self, spec: StreamSpec, stream: str, epoch: int, batch_size: int, steps: int,
                 counts: Mapping[str, int], coords: Mapping[str, Any] | None = None) -> Iterable[dict[str, Any]]:
        """This rank's ``steps`` batches of a training stream's epoch: the draw ``counts``
        (and fixed windows ``coords``) in a whole-epoch seeded order (unless
        ``method.shuffle`` is false)."""
        plan = self.plan(stream=stream, epoch=epoch, counts=counts, coords=coords, shuffle=self.m.shuffle,
                         rank=self.ctx.rank, world=self.ctx.world, batch_size=batch_size, steps=steps)
        return self.patches.batches(spec, plan, epoch, batch_size)

    def labelled(self, g: int, steps: int) -> Iterable[dict[str, Any]]:
        """This rank's share of epoch ``g``'s class-balanced draw of L: ``steps`` batches
        (every rank computes the same draw from the seed)."""
        m = self.m
        counts = labelled_draws(self.inputs, steps * self.ctx.world * m.batch_size, self.cfg.seed, g,
                                m.balance_labelled)
        return self.training(self.specs.train, "labelled", g, m.batch_size, steps, counts)

    def unlabelled(self, epoch: int, steps: int, counts: Mapping[str, int],
                   coords: Mapping[str, Any] | None) -> Iterable[dict[str, Any]]:
        """This rank's ``steps`` batches of the balancer's draw of U for ``epoch``."""
        return self.training(self.specs.uda, "unlabelled", epoch, self.m.unlabelled_batch_size, steps, counts,
                             coords)

    def evaluation(self, kind: str) -> Iterable[dict[str, Any]]:
        """``kind``'s evaluation batches (:meth:`cut`); V's and the BatchNorm stream's are
        the same windows every epoch, so they are cut once and kept when they fit in
        ``eval.cache_mb`` (T is evaluated once a run and always streamed)."""
        if kind == "test" or self.cfg.eval.cache_mb <= 0 or self._kept.get(kind, []) is None:
            return self.cut(kind)
        if kind in self._kept:
            return iter(self._kept[kind])
        stream, batches, size = iter(self.cut(kind)), [], 0
        for batch in stream:
            batches.append(batch)
            size += sum(v.element_size() * v.nelement() for v in batch.values() if hasattr(v, "nelement"))
            if size > self.cfg.eval.cache_mb * 2 ** 20:  # too big to keep: this pass goes on streaming
                self._kept[kind] = None
                return itertools.chain(batches, stream)
        self._kept[kind] = batches
        return iter(batches)

    def cut(self, kind: str) -> Iterable[dict[str, Any]]:
        """Rank 0's evaluation streams: ``calib``: un-augmented L in the training class mix
        (:func:`ipb_ray.engine.fold.calibration_counts`), shuffled (a batch of one colony's
        copies, or of one class, has a smaller variance than the mixed batches the network
        trains on, and BatchNorm averages per-batch variances), at most ``eval.bn_batches``
        batches; ``val`` / ``test``: V / T, each colony ``eval.tta`` times (the mask-centre
        window, then seeded random ones). The same windows every epoch (epoch 0's draws),
        so validations compare."""
        self.cuts += 1
        cfg, m, inputs = self.cfg, self.m, self.inputs
        if kind == "calib":
            spec = self.specs.plain
            plan = self.plan(stream="calibration", epoch=0, counts=calibration_counts(cfg, inputs))
            plan = {k: v[:cfg.eval.bn_batches * m.batch_size] for k, v in plan.items()}
        else:
            spec = self.specs.eval
            ids = inputs.test if kind == "test" else (inputs.validation or inputs.labelled[:1])
            plan = self.plan(stream="evaluation", epoch=0, ids=ids, copies=spec.tta, shuffle=False)
        size = m.batch_size if kind == "calib" else eval_batch(cfg)
        return self.patches.batches(spec, plan, 0, size, drop_last=False)
