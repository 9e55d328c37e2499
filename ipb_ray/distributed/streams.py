"""Patch streams: catalog rows -> fixed-shape patch tensors, on Ray Data.

The pure core (:func:`ipb_ray.patches.core.patch_batch`, the columns of a patch batch
and their seeding) lives in :mod:`ipb_ray.patches.core`. The Ray wiring here is thin:
:func:`patch_dataset` reads the catalog with ``ray.data.read_parquet`` and maps
:func:`~ipb_ray.patches.core.patch_batch` over it (epoch, counts and windows
fixed, or read at run time from a named :class:`StreamState` actor). The training loop
streams from :mod:`ipb_ray.distributed.epoch_stream` instead (the catalog decoded once,
each epoch a plan), which cuts every patch with :func:`ipb_ray.patches.core.emit_patch`; the
state actors still carry IPB's unlabelled plan and teacher from rank 0 to the others.

Columns of a patch batch: see :mod:`ipb_ray.patches.core`.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

from ipb_ray.data import catalog
from ipb_ray.patches.core import CATALOG_COLUMNS, StreamSpec, patch_batch
from ipb_ray.patches.plan import fixed_windows

__all__ = [
    "STATE_NAMESPACE", "StreamState", "collate_class", "current_state", "lease_states", "patch_dataset",
    "release_states", "shuffle_seed", "state_handle", "stream_state", "torch_batches",
]

log = logging.getLogger(__name__)

STATE_NAMESPACE = "ipb_ray"


# --------------------------------------------------------------------------- Ray wiring

class StreamState:
    """Per-epoch state of a stream, held by a named Ray actor: the epoch, optional
    per-colony copy counts and fixed windows, and a version that changes with every
    :meth:`set` (patch tasks cache the state by version and fetch the large parts once).
    Rank 0 sets it before an epoch; the patch stage reads it. IPB's teacher weights are
    published here too (:meth:`publish`), as an object reference."""

    def __init__(self) -> None:
        self._version = 0
        self._epoch = 0
        self._counts: dict[str, int] | None = None
        self._coords: dict[str, tuple[int, int, float]] | None = None
        self._teacher: tuple[int, list[Any]] = (-1, [])

    def set(self, epoch: int, counts: Mapping[str, int] | None = None,
            coords: Mapping[str, Sequence[float]] | None = None) -> int:
        self._version += 1
        self._epoch = int(epoch)
        self._counts = dict(counts) if counts is not None else None
        self._coords = fixed_windows(coords)
        return self._version

    def reset(self) -> int:
        """Back to a fresh state for the next run that leases this actor. The version keeps
        counting up, so no patch task mistakes the new state for one it has cached."""
        self._epoch, self._counts, self._coords, self._teacher = 0, None, None, (-1, [])
        self._version += 1
        return self._version

    def version(self) -> int:
        return self._version

    def get(self) -> tuple[int, int, dict[str, int] | None, dict[str, tuple[int, int, float]] | None]:
        return self._version, self._epoch, self._counts, self._coords

    def publish(self, version: int, weights: list[Any]) -> None:
        """Store the current teacher: ``weights`` is ``[ObjectRef]`` (a list, so Ray passes
        the reference rather than the weights themselves)."""
        self._teacher = (int(version), list(weights))

    def teacher(self) -> tuple[int, list[Any]]:
        return self._teacher


def stream_state(name: str, detached: bool = True):
    """Get or create the named :class:`StreamState` actor (namespace ``ipb_ray``);
    ``detached=False`` ties its life to this process."""
    import ray

    actor_cls = ray.remote(num_cpus=0)(StreamState)
    return actor_cls.options(name=name, namespace=STATE_NAMESPACE, get_if_exists=True,
                             lifetime="detached" if detached else None).remote()


_POOL_LOCK = threading.Lock()
# (name, handle) of this process's state actors between runs, per Ray session (a handle
# from before a ray.shutdown() is dead)
_IDLE_STATES: dict[str, list[tuple[str, Any]]] = {}


def lease_states(n: int) -> list[tuple[str, Any]]:
    """``n`` fresh :class:`StreamState` actors for one run, as ``(name, handle)``.

    Actors released by earlier runs of this process are reset and reused, so a
    cross-validation or a search starts no state actor after its first run (each new actor
    is a Python process: seconds on a small machine). Call :func:`release_states` when the
    run ends. The actors are owned by this process and end with it."""
    import ray

    with _POOL_LOCK:
        idle = _IDLE_STATES.setdefault(_ray_session(), [])
        reused = [idle.pop() for _ in range(min(n, len(idle)))]
    if reused:
        ray.get([handle.reset.remote() for _, handle in reused])
    names = [f"ipb-stream-{os.getpid()}-{uuid.uuid4().hex[:12]}" for _ in range(n - len(reused))]
    return reused + [(name, stream_state(name, detached=False)) for name in names]


def release_states(leased: Sequence[tuple[str, Any]]) -> None:
    """Hand the actors of a finished (or failed) run back for the next one."""
    with _POOL_LOCK:
        _IDLE_STATES.setdefault(_ray_session(), []).extend(leased)


def _ray_session() -> str:
    import ray

    return ray.get_runtime_context().get_job_id()


_STATE_HANDLES: dict[str, Any] = {}
_STATE_CACHE: dict[str, tuple[int, int, Any, Any]] = {}


def state_handle(state_name: str):
    """The named :class:`StreamState` actor, looked up once per process."""
    import ray

    handle = _STATE_HANDLES.get(state_name)
    if handle is None:
        handle = _STATE_HANDLES[state_name] = ray.get_actor(state_name, namespace=STATE_NAMESPACE)
    return handle


def current_state(state_name: str) -> tuple[int, Any, Any]:
    """``(epoch, counts, coords)`` of a named state; the full state crosses the wire only
    when its version changed since this process last looked."""
    import ray

    handle = state_handle(state_name)
    cached = _STATE_CACHE.get(state_name)
    if cached is None or ray.get(handle.version.remote()) != cached[0]:
        cached = _STATE_CACHE[state_name] = ray.get(handle.get.remote())
    return cached[1], cached[2], cached[3]


def _patch_stage(batch: dict[str, np.ndarray], spec: StreamSpec, epoch: int, counts: Mapping[str, int] | None,
                 state_name: str | None, coords: Mapping[str, Sequence[float]] | None = None
                 ) -> dict[str, np.ndarray]:
    """``map_batches`` UDF: a fixed epoch/counts/coords, or read from the named state actor.

    A plain function on Ray tasks rather than an actor class: Ray keeps task workers (and
    their imports) alive between executions, while an actor pool starts fresh processes
    every epoch (about 4 s per epoch on a 2-core machine; see BENCHMARKS.md)."""
    import torch

    torch.set_num_threads(1)  # one CPU per data task; no oversubscription
    if state_name is not None:
        epoch, state_counts, state_coords = current_state(state_name)
        counts = state_counts if state_counts is not None else counts
        coords = state_coords if state_coords is not None else coords
    return patch_batch(batch, spec, epoch, counts, coords)


def patch_dataset(catalog_dir: str, spec: StreamSpec, *, ids: Sequence[str] | None = None,
                  counts: Mapping[str, int] | None = None, epoch: int = 0, state_name: str | None = None,
                  batch_size: int = 32, workers: int | None = None, cpus: float = 1.0,
                  coords: Mapping[str, Sequence[float]] | None = None):
    """A lazy ``ray.data.Dataset`` of patch rows from the catalog at ``catalog_dir``.

    ``ids`` restricts the stream to these colonies (one copy each); ``counts`` gives copies
    per colony instead, ``coords`` fixed windows. With ``state_name`` the epoch, counts and
    coords are read from that
    :class:`StreamState` actor at run time (for Ray Train loops); otherwise ``epoch`` is
    fixed. ``workers``: how many patch tasks run at once (default: as many as the
    cluster's free CPUs allow); ``cpus``: CPUs per patch task and per read task. On a small
    machine shared with Ray Train workers give fractions, or reads and the stage can
    starve each other of CPUs and the pipeline stalls.
    """
    import ray

    catalog.read_manifest(catalog_dir)  # refuse an unfinished catalog with a clear message
    if ids is not None and counts is not None:
        raise ValueError("give ids or counts, not both")
    if ids is not None:
        counts = {cid: 1 for cid in ids}
    # The V2 Parquet reader lists files in a task that always asks for a whole CPU; on a
    # small node whose CPUs Ray Train workers already hold, that task never schedules and
    # the pipeline stalls (seen on 2 CPUs). The classic reader lists files in the driver.
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False
    # Blocks in read order, not in the order parallel tasks finish: the seeded shuffle
    # buffer then sees the same sequence on every run, so a seed gives the same batches
    # (and the same teacher for MPL and IPB) instead of run-to-run noise.
    ctx.execution_options.preserve_order = True
    ds = ray.data.read_parquet(f"{catalog_dir}/parts", columns=CATALOG_COLUMNS, num_cpus=cpus)
    kwargs: dict[str, Any] = dict(batch_size=batch_size, batch_format="numpy", num_cpus=cpus,
                                  fn_kwargs=dict(spec=spec, epoch=epoch, counts=counts, state_name=state_name,
                                                 coords=coords))
    if workers:
        kwargs["compute"] = ray.data.TaskPoolStrategy(size=workers)
    return ds.map_batches(_patch_stage, **kwargs)


def collate_class():
    """A ``NumpyBatchCollateFn`` (Ray's non-deprecated collate form), built on first use so
    this module imports without Ray."""
    global _COLLATE
    if _COLLATE is None:
        import torch
        from ray.data.collate_fn import NumpyBatchCollateFn

        class PatchCollate(NumpyBatchCollateFn):
            """numpy patch columns -> float32 tensors, int64 labels, the colony ids as a
            list; ``pin``: page-locked tensors (for non-blocking copies to a GPU), made
            here, on Ray's batch-preparing thread, not on the training thread."""

            def __init__(self, columns: Sequence[str], pin: bool = False):
                self.dtypes = {name: torch.float32 for name in columns}
                self.dtypes["label"] = torch.int64
                self.pin = bool(pin)

            def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
                # np.require copies only read-only (Arrow-backed) buffers, which torch cannot wrap
                out: dict[str, Any] = {k: torch.from_numpy(np.require(batch[k], requirements="W")).to(t)
                                       for k, t in self.dtypes.items()}
                if self.pin:
                    out = {k: v.pin_memory() for k, v in out.items()}
                out["colony_id"] = list(batch["colony_id"])
                return out

        _COLLATE = PatchCollate
    return _COLLATE


_COLLATE = None


def shuffle_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The local shuffle seed of a training stream in ``epoch`` on ``rank``."""
    return int(np.random.SeedSequence([seed, epoch, rank, 11]).generate_state(1)[0])


def torch_batches(ds, spec: StreamSpec, batch_size: int, *, drop_last: bool = True, prefetch_batches: int = 2,
                  device: str = "cpu", shuffle_buffer: int = 0, shuffle_seed: int | None = None):
    """``iter_torch_batches`` over a patch dataset (or a Train shard): a dict of float32
    tensors per patch column, int64 ``label`` and the list of ``colony_id`` s.

    ``shuffle_buffer`` > 0: rows pass through a local shuffle buffer of that many patches
    (at least two batches), seeded with ``shuffle_seed`` (see :func:`shuffle_seed`), so a
    batch mixes colonies and classes from across the stream."""
    kwargs: dict[str, Any] = {}
    if shuffle_buffer > 0:
        kwargs = dict(local_shuffle_buffer_size=max(int(shuffle_buffer), 2 * batch_size),
                      local_shuffle_seed=shuffle_seed)
    return ds.iter_torch_batches(batch_size=batch_size, collate_fn=collate_class()(spec.patch_columns()),
                                 drop_last=drop_last, prefetch_batches=prefetch_batches, device=device, **kwargs)
