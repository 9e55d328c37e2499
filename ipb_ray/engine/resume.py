"""A run's own record between epochs (:class:`Book`: where it starts, its step count, its
history, its time in reports) and the checkpoint that carries it across a restart:
:func:`capture` (every network, optimiser, the method's and balancer's state, the choice
on V, the RNG, the history) and :func:`restore`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ipb_ray.engine.schedule import Selection
from ipb_ray.engine.steps import unwrap

if TYPE_CHECKING:  # pragma: no cover
    from ipb_ray.engine.loop import Engine

__all__ = ["Book", "capture", "restore"]


@dataclass
class Book:
    start: int = 0  # the first epoch this process runs
    global_step: int = 0
    resumed_from: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    report_s: float = 0.0  # seconds in reports (checkpoint writes, MLflow logging, Train's report)


def capture(engine: Engine, g: int) -> dict[str, Any]:
    """The checkpoint state after run epoch ``g``."""
    import torch

    method, balancer, best, book = engine.method, engine.balancer, engine.judge.best, engine.book
    return {"stage": engine.stages[engine.calendar.stage_at(g)[0]].name, "epoch": g,
            "global_step": book.global_step,
            "networks": {k: unwrap(n).state_dict() for k, n in method.nets.items()},
            "optimizers": {k: o.state_dict() for k, o in method.opts.items()},
            "method": method.state_dict(), "balancer": balancer.state_dict() if balancer is not None else None,
            "best_metric": best.metric, "best_model": best.state, "earlier_best": best.earlier,
            "torch_rng": torch.get_rng_state(), "class_names": list(engine.inputs.class_names),
            "config": engine.run.config, "history": book.history}


def restore(engine: Engine, state: dict[str, Any] | None) -> dict[str, Any] | None:
    """Put a checkpoint ``state`` (None: a fresh run) back into ``engine``; returns it."""
    import torch

    if state is None:
        return None
    if "networks" not in state:  # written before the one loop (keys model/teacher/student/...)
        raise ValueError(f"the checkpoint this run would resume from was written by an older ipb-ray (keys "
                         f"{sorted(state)[:6]}...; no 'networks'); it cannot be resumed. Train under another "
                         "run name (`name=...`) or remove the run's directory under tracking.storage_path")
    method = engine.method
    for name, weights in state["networks"].items():
        unwrap(method.nets[name]).load_state_dict(weights)
    for name, opt_state in state["optimizers"].items():
        method.opts[name].load_state_dict(opt_state)
    method.load_state_dict(state.get("method") or {})
    if engine.balancer is not None:
        engine.balancer.load_state_dict(state.get("balancer") or {})
    torch.set_rng_state(state["torch_rng"])
    engine.book = Book(start=state["epoch"] + 1, global_step=state["global_step"], resumed_from=state["epoch"],
                       history=list(state.get("history", [])))
    engine.judge.best = Selection(state["best_metric"], state["best_model"], dict(state.get("earlier_best") or {}))
    return state
