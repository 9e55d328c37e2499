"""The one training loop of every method, whoever runs it.

For each stage's epochs (:meth:`ipb_ray.methods.Method.stages`): the epoch's streams, the
training (cross-entropy on class-balanced L for a labelled stage, the method's
``train_step`` on paired L and U batches for an unlabelled one, U drawn by the
balancer), then on rank 0 BatchNorm recalibration, the next labelling pass, validation on
V, best-on-V selection, the history row and the checkpoint; at the end the chosen network
on T. Resume: a run restarts from its reporter's latest state. ``docs/methods.md`` lists
the history and checkpoint keys.

What runs it provides the ports (:mod:`ipb_ray.engine.ports`): Ray Train
(:mod:`ipb_ray.distributed.training`) or this process (:mod:`ipb_ray.engine.inprocess`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ipb_ray.config import from_dict
from ipb_ray.engine.context import LoopContext
from ipb_ray.engine.fold import FoldRun, labelled_steps, unlabelled_steps
from ipb_ray.engine.judge import Judge
from ipb_ray.engine.ports import Board, Collective, Labeller, Patches, Reporter
from ipb_ray.engine.schedule import Schedule
from ipb_ray.engine.streams import EpochStreams
from ipb_ray.engine.steps import param_digest, supervised_epoch, unwrap
from ipb_ray.engine.unlabelled import unlabelled_epoch
from ipb_ray.engine import resume

if TYPE_CHECKING:  # pragma: no cover
    from ipb_ray.methods import Stage

__all__ = ["Engine", "Ports"]


@dataclass(frozen=True)
class Ports:
    """What runs the engine provides (see :mod:`ipb_ray.engine.ports`)."""

    collective: Collective
    patches: Patches
    board: Board
    reporter: Reporter
    device: Any
    prepare: Callable[[Any], Any]
    labeller: Labeller | None = None


class Engine:
    """One run of one fold (see the module docstring)."""

    def __init__(self, run: FoldRun, ports: Ports):
        from ipb_ray.methods import get_balancer, get_method

        cfg = from_dict(run.config)
        self.cfg, self.m, self.run, self.inputs, self.ports = cfg, cfg.method, run, run.inputs, ports
        self.rank, self.world = ports.collective.rank, ports.collective.world
        amp = self.m.mixed_precision and getattr(ports.device, "type", "cpu") == "cuda"
        self.ctx = LoopContext(cfg, run, ports.collective, ports.device, amp, ports.prepare, ports.labeller)
        self.method = get_method(self.m.name)(cfg, self.ctx)
        self.method.build()
        self.calendar = Schedule(self.method.stages(cfg), self.m.warmup_fraction, self.m.schedule, cfg.eval.every)
        self.stages, self.total = self.calendar.stages, self.calendar.total
        self.semi = self.method.semi_supervised
        self.l_steps = labelled_steps(len(self.inputs.labelled), self.world, self.m.batch_size, self.m.steps_per_epoch)
        self.u_steps = unlabelled_steps(len(self.inputs.unlabelled), self.world, self.m) if self.semi else 0
        self.balancer = get_balancer(self.method.balancer_name(cfg))(cfg, self.ctx) if self.semi else None
        self.method.balancer = self.balancer  # every rank: a balancer may correct pseudo-labels; rank 0 plans
        self.streams = EpochStreams(cfg, self.ctx, ports.patches)
        truth = self.inputs.unlabelled_truth or (-1,) * len(self.inputs.unlabelled)  # U's hidden labels (figures only)
        self.truth_of = dict(zip(self.inputs.unlabelled, truth))
        self.judge = Judge(self.ctx, self.streams, self.method.nets)
        self.book = resume.Book()
        self.state = resume.restore(self, ports.reporter.load())

    def run_all(self, setup_s: float = 0.0) -> None:
        """Every epoch from where the run stands to its end (a finished run: the test again)."""
        state, start = self.state, self.book.start
        for g in range(start, self.total):
            i, e = self.calendar.stage_at(g)
            stage = self.stages[i]
            if e == 0:
                self._begin(i)
            t0 = time.perf_counter()
            metrics: dict[str, Any] = {"epoch": g, "stage": stage.name, "stage_index": i, "stage_epoch": e,
                                       "world_size": self.world}
            if g == start:
                metrics["setup_seconds"] = setup_s
            metrics.update(unlabelled_epoch(self, stage, g, e) if stage.unlabelled else self._labelled(stage, g, e))
            metrics.update(self.method.epoch_metrics(stage))
            state = self._close_epoch(stage, g, metrics, t0) if self.rank == 0 else None
            t_report = time.perf_counter()
            self.ports.reporter.report(metrics, state)
            self.book.report_s += time.perf_counter() - t_report
        if self.balancer is not None:
            self.balancer.close()
        if start >= self.total:  # the run had already finished: test its selected network again
            metrics = {"epoch": self.total - 1, "world_size": self.world}
            if self.rank == 0:
                metrics.update(self.final())
            self.ports.reporter.report(metrics, state if self.rank == 0 else None)
        if self.run.digest_dir:  # lets tests compare the ranks' final parameters
            with open(f"{self.run.digest_dir}/rank{self.rank}.txt", "w") as fh:
                fh.write(param_digest(unwrap(self.method.nets[self.stages[-1].net])))

    def _begin(self, i: int) -> None:
        """Stage ``i`` starts: a restarting stage takes the choice so far (rank 0's) into its
        network and selects anew (with ``method.keep_start``, a semi-supervised run's guard,
        its networks must beat that choice's score on V to replace it: fine-tuning cannot
        hand back a network worse on V than the one it started from); then the method's
        own hook."""
        stage = self.stages[i]
        if stage.restart and i > 0:
            chosen = self.ports.collective.from_rank_zero(self.judge.best.state)
            self.judge.restart(stage, chosen, self.semi and self.m.keep_start and chosen is not None)
        self.method.begin_stage(stage)

    def _labelled(self, stage: Stage, g: int, e: int) -> dict[str, Any]:
        """An epoch of cross-entropy on class-balanced L for ``stage.net``."""
        ctx, steps = self.ctx, self.l_steps
        opt = self.method.opts[stage.optimizer]
        out = supervised_epoch(self.method.nets[stage.net], opt, self.streams.labelled(g, steps), ctx.columns,
                               ctx.device, ctx.amp, self.m,
                               lambda step: stage.lr * self.calendar.lr_factor(stage, 0, step, steps), e * steps,
                               all_reduce=self.ports.collective.all_reduce)
        self.book.global_step += out["train_steps"]
        return {**out, "lr": opt.param_groups[0]["lr"]}

    def _close_epoch(self, stage: Stage, g: int, metrics: dict[str, Any], t0: float) -> dict[str, Any]:
        """Rank 0: recalibrate, start the next labelling pass, validate, select, record;
        returns the checkpoint state."""
        nets, labeller = self.method.nets, self.method.labeller
        labels_next = self.balancer is not None and self.calendar.next_is_unlabelled(g)
        due = self.calendar.validation_due(stage, metrics["stage_epoch"])
        evaluated = ([stage.net, *stage.also_validate] if due else []) + ([labeller] if labels_next else [])
        t_close, cuts = time.perf_counter(), self.streams.cuts
        if evaluated:
            self.judge.recalibrate(evaluated)
        t_val = time.perf_counter()
        metrics["bn_seconds"] = t_val - t_close
        if labels_next:  # the labeller is final for the next epoch: label U meanwhile
            self.balancer.prefetch(self.calendar.unlabelled_epoch(g + 1), nets[labeller])
            metrics["prefetch_seconds"] = time.perf_counter() - t_val
            t_val = time.perf_counter()
        if due:
            self.judge.judge(stage, g, metrics)
        else:  # eval.every: no validation this epoch; Tune's schedulers still see an objective
            last = next((h["objective"] for h in reversed(self.book.history) if "objective" in h), None)
            if last is not None:  # the last validation's (also after a resume: the history is restored)
                metrics["objective"] = last
        metrics["val_seconds"] = time.perf_counter() - t_val
        metrics["eval_cuts"] = self.streams.cuts - cuts
        metrics["epoch_seconds"] = time.perf_counter() - t0
        metrics["report_seconds"] = self.book.report_s  # the earlier epochs' reports, so far
        self.book.history.append(dict(metrics))
        if g == self.total - 1:
            metrics.update(self.final())
        return resume.capture(self, g)

    def final(self) -> dict[str, Any]:
        """Rank 0's end-of-run figures (:meth:`ipb_ray.engine.judge.Judge.final`)."""
        return self.judge.final(self.stages[-1].net, self.book.resumed_from)
