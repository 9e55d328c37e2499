"""What the engine needs from whoever runs it, as small typed protocols.

The engine (:mod:`ipb_ray.engine.loop`) trains a fold the same way whatever provides
these: Ray Train (:mod:`ipb_ray.distributed.training`: DDP ranks, Ray Data streams, an
actor for rank 0's plan, Train's checkpoints and reports) or this process alone
(:mod:`ipb_ray.engine.inprocess`: one rank, patches cut on a thread, checkpoints on a
local path).

- :class:`Collective`: this rank among ``world`` and the few collectives the loop uses.
- :class:`Patches`: the torch batches of a plan (:mod:`ipb_ray.patches.plan`) cut with a
  stream's spec; ``ids`` are the colonies a plan may name.
- :class:`Board`: rank 0 posts the unlabelled epoch's draw, every rank reads it.
- :class:`Labeller`: the labelling pass of a balancer (one window of each colony of U,
  labelled by given weights), as a job to run on any thread.
- :class:`Reporter`: where a run's checkpoints and per-epoch reports go, and where a
  resumed run finds its latest state.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from ipb_ray.patches.core import StreamSpec
from ipb_ray.patches.plan import fixed_windows

__all__ = ["Board", "Collective", "Labeller", "Patches", "Reporter", "SingleProcess", "Slate"]


class Collective(Protocol):
    rank: int
    world: int

    def barrier(self) -> None: ...

    def all_reduce(self, tensor: Any) -> Any: ...

    def gather(self, obj: Any) -> list[Any]: ...

    def from_rank_zero(self, obj: Any) -> Any: ...


class Patches(Protocol):
    ids: frozenset[str]

    def batches(self, spec: StreamSpec, plan: Mapping[str, Any], epoch: int, batch_size: int,
                drop_last: bool = True) -> Iterable[dict[str, Any]]: ...


class Board(Protocol):
    def post(self, epoch: int, counts: Mapping[str, int], coords: Mapping[str, Any] | None) -> None: ...

    def read(self) -> tuple[dict[str, int], dict[str, Any] | None]: ...


class Labeller(Protocol):
    def job(self, epoch: int, ids: Sequence[str], weights: dict[str, Any],
            model_kwargs: dict[str, Any]) -> Callable[[], Any]: ...


class Reporter(Protocol):
    def load(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None: ...


class SingleProcess:
    """The :class:`Collective` of a run with one rank: every collective is the identity."""

    rank, world = 0, 1

    def barrier(self) -> None:
        pass

    def all_reduce(self, tensor: Any) -> Any:
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def from_rank_zero(self, obj: Any) -> Any:
        return obj


class Slate:
    """The :class:`Board` of a run with one rank: the draw, held."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.coords: dict[str, Any] | None = None

    def post(self, epoch: int, counts: Mapping[str, int], coords: Mapping[str, Any] | None) -> None:
        self.counts = {k: int(v) for k, v in counts.items()}
        self.coords = fixed_windows(coords)  # as the Ray board keeps them: the same windows

    def read(self) -> tuple[dict[str, int], dict[str, Any] | None]:
        return self.counts, self.coords
