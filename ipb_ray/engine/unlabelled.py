"""An epoch of an unlabelled stage: rank 0 has the balancer plan the epoch's draw of U
and posts it; every rank streams its share of that draw beside a class-balanced draw of
L and calls the method's ``train_step`` on each pair of batches; rank 0 then records
what the stream held, by U's hidden truth and by the method's pseudo-labels.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ipb_ray.engine.steps import Timer

if TYPE_CHECKING:  # pragma: no cover
    from ipb_ray.engine.loop import Engine
    from ipb_ray.methods import Stage

__all__ = ["stream_figures", "unlabelled_epoch"]


def _plan(engine: Engine, u_epoch: int, steps: int) -> dict[str, Any]:
    """Rank 0: the balancer's draw of U for ``u_epoch``, posted on the board; its figures."""
    t0 = time.perf_counter()
    n_draws = steps * engine.world * engine.m.unlabelled_batch_size
    plan, figures = engine.balancer.plan(u_epoch, n_draws, engine.method.nets[engine.method.labeller])
    engine.ports.board.post(u_epoch, plan.counts, plan.coords)
    figures.update(plan_seconds=time.perf_counter() - t0, unlabelled_draws=n_draws)
    return figures


def unlabelled_epoch(engine: Engine, stage: Stage, g: int, e: int) -> dict[str, Any]:
    """Run epoch ``g`` (epoch ``e`` of ``stage``): the method's steps on paired labelled
    and unlabelled batches; returns the epoch's figures."""
    import torch

    method, m, steps, col = engine.method, engine.m, engine.u_steps, engine.ports.collective
    u_epoch = engine.calendar.unlabelled_epoch(g)
    figures = _plan(engine, u_epoch, steps) if engine.rank == 0 else {}
    col.barrier()
    for net in method.nets.values():
        net.train()
    u_counts, u_coords = engine.ports.board.read()  # rank 0's plan, on every rank
    l_iter = iter(engine.streams.labelled(g, steps))
    u_iter = iter(engine.streams.unlabelled(u_epoch, steps, u_counts or {}, u_coords))
    names = method.step_metrics
    timer, sums = Timer(), torch.zeros(len(names), dtype=torch.float64)
    seen: list[str] = []
    labels: list[int] = []
    for i in range(steps):
        bl, bu = next(l_iter), next(u_iter)
        timer.got()
        out = method.train_step(stage, bl, bu, step=u_epoch * steps + i,
                                lr_factor=engine.calendar.lr_factor(stage, e, i, steps), stage_epoch=e)
        engine.book.global_step += 1
        sums += torch.tensor([out[k] for k in names], dtype=torch.float64)
        seen.extend(bu["colony_id"])
        labels.extend(out.get("pseudo_labels", []))
        timer.resume()
    for _ in l_iter:  # the shares hold exactly `steps` batches; finish both streams cleanly
        pass
    for _ in u_iter:
        pass
    metrics = timer.metrics(float(steps * m.unlabelled_batch_size * engine.world))
    col.all_reduce(sums)
    metrics.update({k: float(v) / (steps * engine.world) for k, v in zip(names, sums)})
    metrics.update(train_steps=steps, global_step=engine.book.global_step,
                   train_loss=metrics[method.loss_metric] if method.loss_metric else float("nan"))
    gathered = col.gather((seen, labels))
    if engine.rank == 0:
        metrics.update(figures)
        metrics.update(stream_figures(engine, [c for part in gathered for c in part[0]],
                                      [p for part in gathered for p in part[1]]))
    return metrics


def stream_figures(engine: Engine, ids: list[str], pseudo: list[int]) -> dict[str, Any]:
    """Rank 0: what the unlabelled stream held this epoch, by hidden truth and by the
    method's pseudo-labels; the balancer sees both."""
    from ipb_ray.methods.balancers import shares
    from ipb_ray.patches.pseudo_labels import class_histogram

    names, n, truth_of = engine.inputs.class_names, len(engine.inputs.class_names), engine.truth_of
    out = {**shares("unlabelled_true_share", class_histogram(list(truth_of.values()), n), names),
           **shares("stream_true_share", class_histogram([truth_of[c] for c in ids], n), names)}
    if pseudo:
        out.update(shares("step_pseudo_share", class_histogram(pseudo, n), names))
    out.update(engine.balancer.observe(ids, pseudo))
    return out
