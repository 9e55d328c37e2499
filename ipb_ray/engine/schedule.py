"""A run's calendar and its choice on V: which stage a run epoch belongs to, the
learning-rate factor of a step, when V is validated (``eval.every``), and the best-on-V
bookkeeping (:class:`Selection`). Pure apart from the weight snapshot it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ipb_ray.engine.steps import snapshot

if TYPE_CHECKING:  # pragma: no cover
    from ipb_ray.methods import Stage

__all__ = ["PRE_FINETUNE", "Schedule", "Selection", "pre_stage_prefix"]


class Schedule:
    """The stages of a run laid end to end: run epoch ``g`` is epoch ``e`` of stage ``i``."""

    def __init__(self, stages: Sequence[Stage], warmup_fraction: float, schedule: str, every: int):
        self.stages = list(stages)
        self.first = np.cumsum([0] + [s.epochs for s in self.stages]).tolist()  # each stage's first epoch
        self.total = int(self.first[-1])
        self.warmup_fraction, self.schedule, self.every = warmup_fraction, schedule, every

    def stage_at(self, g: int) -> tuple[int, int]:
        """(stage index, epoch within the stage) of run epoch ``g``."""
        i = int(np.searchsorted(self.first, g, side="right")) - 1
        return i, g - self.first[i]

    def unlabelled_epoch(self, g: int) -> int:
        """How many unlabelled epochs came before run epoch ``g`` (the balancer's epoch)."""
        return sum(min(max(g - self.first[i], 0), s.epochs) for i, s in enumerate(self.stages) if s.unlabelled)

    def next_is_unlabelled(self, g: int) -> bool:
        """Run epoch ``g + 1`` exists and belongs to an unlabelled stage."""
        return g + 1 < self.total and self.stages[self.stage_at(g + 1)[0]].unlabelled

    def lr_factor(self, stage: Stage, e: int, i: int, steps: int) -> float:
        """The schedule's factor at step ``i`` of epoch ``e`` of ``stage`` (``steps`` a epoch)."""
        from ipb_ray.nn.optim import lr_factor, warmup_steps

        total = max(steps * stage.epochs, 1)
        return lr_factor(e * steps + i, total, warmup_steps(total, self.warmup_fraction), self.schedule)

    def validation_due(self, stage: Stage, stage_epoch: int) -> bool:
        """``eval.every``: validate every that many epochs of a stage, and at its last."""
        every = self.every
        return every <= 1 or (stage_epoch + 1) % every == 0 or stage_epoch == stage.epochs - 1


@dataclass
class Selection:
    """Best-on-V bookkeeping of a run: the score and weights of the chosen network, and the
    choices of earlier stages that a restarting stage (fine-tuning) set aside."""

    metric: float = -1.0
    state: dict[str, Any] | None = None
    earlier: dict[str, dict[str, Any]] = field(default_factory=dict)

    def offer(self, score: float, net: Any) -> bool:
        if score >= self.metric:
            self.metric, self.state = score, snapshot(net)
            return True
        return False


def pre_stage_prefix(stage: str) -> str:
    """Key prefix of an earlier stage's own test figures, e.g. ``pre_finetune_test_*``: the
    choice of the stage before fine-tuning, tested as well."""
    return f"pre_{stage}_"


PRE_FINETUNE = pre_stage_prefix("finetune")
