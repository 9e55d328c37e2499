"""Rank 0's judgement of a run: BatchNorm re-estimated before a network is evaluated or
labels, validation on V, the best-on-V choice (never T), and at the end the chosen
network (and the choices earlier stages set aside) tested on T.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ipb_ray.engine.schedule import Selection, pre_stage_prefix
from ipb_ray.engine.steps import param_digest, recalibrate, test_metrics, unwrap, validate
from ipb_ray.engine.streams import EpochStreams

if TYPE_CHECKING:  # pragma: no cover
    from ipb_ray.engine.context import LoopContext
    from ipb_ray.methods import Stage

__all__ = ["Judge"]


class Judge:
    """Validation, selection and the test of one run over its ``nets`` (the method's)."""

    def __init__(self, ctx: LoopContext, streams: EpochStreams, nets: dict[str, Any]):
        self.ctx, self.streams, self.nets = ctx, streams, nets
        self.eval = ctx.cfg.eval
        self.best = Selection()

    def recalibrate(self, names: list[str]) -> None:
        """Re-estimate BatchNorm of the named networks in one pass over the calibration stream."""
        ctx = self.ctx
        recalibrate([self.nets[k] for k in dict.fromkeys(names)], lambda: self.streams.evaluation("calib"),
                    ctx.columns, ctx.device, ctx.amp, max_batches=self.eval.bn_batches,
                    enabled=self.eval.bn_recalibrate)

    def validate(self, name: str) -> dict[str, Any] | None:
        """Network ``name`` on V (None when the fold has no V)."""
        ctx = self.ctx
        return validate(self.nets[name], ctx.inputs, lambda: self.streams.evaluation("val"), ctx.columns,
                        ctx.device, ctx.amp)

    def judge(self, stage: Stage, g: int, metrics: dict[str, Any]) -> None:
        """Epoch ``g``'s validation of ``stage``'s networks into ``metrics``; those the
        stage selects compete for the run's best on V (no V: the latest network wins)."""
        for name in stage.also_validate:
            val = self.validate(name)
            if val is not None:
                metrics[f"{name}_val_balanced_accuracy"] = val["balanced_accuracy"]
                if stage.select and name in stage.also_select and self.best.offer(val["balanced_accuracy"],
                                                                                  self.nets[name]):
                    metrics.update(best_epoch=g, best_net=name)
        val = self.validate(stage.net)
        if val is not None:
            metrics.update(val_balanced_accuracy=val["balanced_accuracy"], val_accuracy=val["accuracy"],
                           objective=val["balanced_accuracy"])
        score = val["balanced_accuracy"] if val is not None else float(g)
        if stage.select and self.best.offer(score, self.nets[stage.net]):
            metrics.update(best_epoch=g, best_net=stage.net)

    def restart(self, stage: Stage, chosen: dict[str, Any] | None, keep: bool) -> None:
        """A restarting ``stage`` takes ``chosen`` (the choice so far, rank 0's) into its
        network and selects anew; with ``keep`` (the guard of a semi-supervised run) the
        choice's score stays the bar to beat."""
        earlier = {**self.best.earlier, stage.name: chosen}
        self.best = Selection(self.best.metric, chosen, earlier) if keep else Selection(earlier=earlier)
        unwrap(self.nets[stage.net]).load_state_dict(chosen)

    def final(self, last: str, resumed_from: int | None) -> dict[str, Any]:
        """The end-of-run figures: the chosen network (of ``last``'s architecture) on T,
        the choices earlier stages set aside (``pre_<stage>_test_*``), where the run
        began, parameter digests."""
        ctx, nets = self.ctx, self.nets

        def test(weights: dict[str, Any] | None) -> dict[str, Any]:
            return test_metrics(nets[last], weights, ctx.inputs, self.streams.evaluation("test"), ctx.columns,
                                ctx.device, ctx.amp)

        t0 = time.perf_counter()
        out = test(self.best.state)
        for stage_name, weights in self.best.earlier.items():
            out.update({f"{pre_stage_prefix(stage_name)}{k}": v for k, v in test(weights).items()})
        out["test_seconds"] = time.perf_counter() - t0
        out.update(resumed_from_epoch=-1 if resumed_from is None else resumed_from,
                   param_digest=param_digest(unwrap(nets[last])))
        out.update({f"{k}_param_digest": param_digest(unwrap(n)) for k, n in nets.items() if k != last})
        return out
