"""Balancers: what a semi-supervised method's unlabelled stream holds in each epoch.

A balancer lives on rank 0 of the training loop. Before every unlabelled epoch the loop
asks it for the epoch's plan (:meth:`Balancer.plan`: which colonies, how many copies,
which windows) and writes that to the unlabelled stream; after the epoch's steps it shows
it the pseudo-labels the method gave (:meth:`Balancer.observe`). Any method that streams
U composes with any balancer (``method.balancer``):

- ``none``: every unlabelled colony once per epoch at a fresh random window (plain MPL);
- ``pseudo_balance``: IPB's per-epoch pseudo-balancing (shared/IPB.md, step 2a): the
  method's labeller network labels one random window of every unlabelled colony in a
  Ray Data pass (:mod:`ipb_ray.distributed.rebalance`), and the epoch's windows are drawn from the
  multinomial with weight 1/n_c per pseudo-label class. The pass for the next epoch runs
  in a background thread as soon as the labeller is final for it (:meth:`Balancer.prefetch`),
  overlapping validation and checkpointing.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, ClassVar

import numpy as np

from ipb_ray.methods.base import Registry

__all__ = ["BALANCERS", "Balancer", "PseudoBalancer", "UniformDraw", "get_balancer", "list_balancers",
           "register_balancer"]


def _per_class(prefix: str, values: Any, names: tuple[str, ...]) -> dict[str, float]:
    return {f"{prefix}/{n}": float(v) for n, v in zip(names, values)}


def shares(prefix: str, counts: Any, names: tuple[str, ...]) -> dict[str, float]:
    """``<prefix>/<class>``: each class's share of ``counts``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = max(float(counts.sum()), 1.0)
    return {f"{prefix}/{n}": float(c) / total for n, c in zip(names, counts)}


class Balancer:
    """Base: the plan of an unlabelled epoch (see the module docstring). ``ctx`` is the
    loop's context (configuration, fold inputs, stream specs, Ray state names)."""

    name: ClassVar[str] = ""
    keys: ClassVar[tuple[str, ...]] = ()  # the method.* keys of its own

    def __init__(self, cfg: Any, ctx: Any):
        self.cfg, self.ctx = cfg, ctx
        self.names = ctx.inputs.class_names

    def prefetch(self, epoch: int, labeller: Any) -> None:
        """``labeller`` is final for unlabelled epoch ``epoch``: start what the plan needs."""

    def plan(self, epoch: int, n_draws: int, labeller: Any) -> tuple[Any, dict[str, Any]]:
        """The :class:`ipb_ray.distributed.rebalance.EpochPlan` of unlabelled epoch ``epoch`` (``n_draws``
        patches) and its figures; ``labeller`` is the method's labelling network as it is now."""
        raise NotImplementedError

    def observe(self, colony_ids: list[str], pseudo: list[int]) -> dict[str, Any]:
        """The epoch's streamed colonies and the method's pseudo-labels of them; figures."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


BALANCERS = Registry("balancer", Balancer, "register_balancer")


def register_balancer(name: str) -> Callable[[type[Balancer]], type[Balancer]]:
    """Class decorator: make a :class:`Balancer` available as ``method.balancer=<name>``."""
    return BALANCERS.register(name)


def list_balancers() -> list[str]:
    return BALANCERS.names()


def get_balancer(name: str) -> type[Balancer]:
    return BALANCERS.get(name)


@register_balancer("none")
class UniformDraw(Balancer):
    """Every unlabelled colony once per epoch at a fresh random window (plain MPL)."""

    def plan(self, epoch: int, n_draws: int, labeller: Any) -> tuple[Any, dict[str, Any]]:
        from ipb_ray.distributed.rebalance import epoch_plan

        inputs = self.ctx.inputs
        return epoch_plan(inputs.unlabelled, None, len(self.names), self.cfg.seed, epoch, n_draws, self.names), {}


@register_balancer("pseudo_balance")
class PseudoBalancer(Balancer):
    """IPB's pseudo-balanced draw over the labeller's pseudo-labels of U; with
    ``method.relabel=reuse`` only the first epoch of a run has a labelling pass, later ones
    draw on the pseudo-labels of the previous epoch's steps."""

    keys = ("relabel",)

    def __init__(self, cfg: Any, ctx: Any):
        super().__init__(cfg, ctx)
        self.table: Any = None
        self.class_weights: list[float] | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ipb-label")
        self.pending: dict[int, concurrent.futures.Future] = {}
        self.labeller: Any = None

    def _needs_pass(self) -> bool:
        return self.cfg.method.relabel == "pass" or self.table is None

    def prefetch(self, epoch: int, labeller: Any) -> None:
        if self._needs_pass() and epoch not in self.pending:
            self._start(epoch, labeller)

    def _start(self, epoch: int, labeller: Any) -> None:
        import ray

        from ipb_ray.distributed.rebalance import labelling_dataset, run_labelling
        from ipb_ray.distributed.streams import state_handle

        ctx, m, r = self.ctx, self.cfg.method, self.cfg.resources
        weights = ray.put(ctx.snapshot(labeller))
        ids = ctx.inputs.unlabelled
        p_state = state_handle(ctx.config["label_state"])

        def work() -> tuple[Any, float]:
            t0 = time.perf_counter()
            ray.get(p_state.set.remote(epoch, {cid: 1 for cid in ids}))
            ray.get(p_state.publish.remote(time.time_ns(), [weights]))
            table = run_labelling(labelling_dataset(
                ctx.inputs.catalog, ctx.specs["spec_label"], ctx.config["label_state"], ctx.model_kwargs(),
                batch_size=max(4 * m.unlabelled_batch_size, 128), cpus=r.data_cpus, actors=r.teacher_actors,
                gpus=r.label_gpus, use_actors=r.label_stage == "actors" or (r.label_stage == "auto"
                                                                            and r.label_gpus > 0)))
            return table, time.perf_counter() - t0

        self.pending[epoch] = self.pool.submit(work)

    def plan(self, epoch: int, n_draws: int, labeller: Any) -> tuple[Any, dict[str, Any]]:
        from ipb_ray.distributed.rebalance import epoch_plan, pseudo_label_tpr

        label_s = pass_s = 0.0
        if self._needs_pass():
            if epoch not in self.pending:  # not prefetched (e.g. the run resumed here): label now
                self._start(epoch, labeller)
            t0 = time.perf_counter()
            table, pass_s = self.pending.pop(epoch).result()
            label_s = time.perf_counter() - t0
            if len(table) != len(self.ctx.inputs.unlabelled):
                raise RuntimeError(f"the labelling pass labelled {len(table)} of {len(self.ctx.inputs.unlabelled)} "
                                   "unlabelled colonies")
            self.table = table
        n_cls = len(self.names)
        plan = epoch_plan(self.ctx.inputs.unlabelled, self.table, n_cls, self.cfg.seed, epoch, n_draws, self.names)
        self.class_weights = plan.balance.class_weights.tolist()
        tpr, acc = pseudo_label_tpr(self.table, n_cls)
        figures = {"label_seconds": label_s, "label_pass_seconds": pass_s,
                   **_per_class("teacher_proportion", plan.balance.proportions, self.names),
                   **_per_class("sampling_weight", plan.balance.class_weights, self.names),
                   "missing_classes": len(plan.balance.missing),
                   **_per_class("pseudo_tpr", tpr, self.names), "pseudo_accuracy": acc}
        return plan, figures

    def observe(self, colony_ids: list[str], pseudo: list[int]) -> dict[str, Any]:
        from ipb_ray.distributed.rebalance import class_histogram

        if self.table is None:
            return {}
        # the student's stream by the pseudo-label its window was drawn with
        out = shares("stream_share", class_histogram(self.table.pseudo[self.table.lookup(colony_ids)],
                                                     len(self.names)), self.names)
        if self.cfg.method.relabel == "reuse" and len(pseudo) == len(colony_ids):
            self.table = self.table.with_labels(colony_ids, pseudo)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table.to_dict() if self.table is not None else None,
                "class_weights": self.class_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ipb_ray.distributed.rebalance import LabelTable

        self.table = LabelTable.from_rows(state["table"]) if state.get("table") else None
        self.class_weights = state.get("class_weights")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
