"""The training streams: a catalog's crops decoded once into the object store, and each
epoch a plan-driven Ray Data stream of patches cut from them.

Why (BENCHMARKS.md, "Patch stream"): re-reading and re-decoding the catalog's Parquet
every epoch cost ~1 s of start-up per epoch and ~1 ms of PNG decoding per patch, and a
shuffle buffer in the training process cost CPU there. Here:

1. **Ingest, once per catalog** (:func:`crop_cache`): Ray Data reads the catalog's
   Parquet row groups and decodes every crop in parallel tasks (image as raw uint8, mask
   as packed bits); the result stays in the object store as Arrow blocks
   (:class:`CropCache`: a handful of object references and the colony ids). Patch tasks read the blocks zero-copy, so
   one copy serves every task and every fold of a process.
2. **Each epoch** (:func:`plan_batches`): the epoch's plan (:mod:`ipb_ray.patches.plan`:
   colonies, copies, fixed windows, whole-epoch seeded order, this rank's share) becomes
   a tiny in-memory dataset; ``map_batches`` cuts each planned patch with the very
   function the catalog path uses (:func:`ipb_ray.patches.core.emit_patch`), one
   output block per training batch, so the training process only unpacks batches: no
   Parquet planning, no read tasks, no shuffle buffer.

A patch depends on ``(seed, epoch, mode, colony, copy)`` only, as on the catalog path:
the same copy is the same patch whichever path or worker cuts it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ipb_ray.data import catalog
from ipb_ray.patches.core import StreamSpec
from ipb_ray.patches.crops import CropViews, catalog_key, cut_plan, read_decode, row_groups, unpack_plan
from ipb_ray.distributed.streams import collate_class

__all__ = [
    "CropCache", "batch_bytes", "build_crop_cache", "crop_cache", "forget_caches", "plan_batches", "plan_dataset",
    "plan_source", "views_of",
]

@dataclass(frozen=True)
class CropCache:
    """A catalog's decoded crops in the object store: ``refs`` are Arrow tables with
    columns ``colony_id``, ``label``, ``h``, ``w``, ``image`` (raw uint8 bytes, row-major)
    and ``mask`` (``np.packbits`` of the bool mask); ``ids`` are the catalog's colonies
    (what a plan may name). Picklable: hand it to tasks and Train workers."""

    catalog: str
    key: str  # unique per build (its first block's object id): worker views are kept by it
    refs: tuple[Any, ...]
    ids: frozenset[str]
    nbytes: int

    def __len__(self) -> int:
        return len(self.ids)


_VIEWS_LOCK = threading.Lock()
_VIEWS: dict[str, CropViews] = {}


def views_of(cache: CropCache) -> CropViews:
    """This process's :class:`CropViews` of ``cache``, built on first use (a few ms)."""
    import ray

    with _VIEWS_LOCK:
        found = _VIEWS.get(cache.key)
        if found is None:
            if len(_VIEWS) >= 4:  # caches of finished runs: drop the oldest
                _VIEWS.pop(next(iter(_VIEWS)))
            found = _VIEWS[cache.key] = CropViews(ray.get(list(cache.refs)))
        return found


# --------------------------------------------------------------------------- building the cache

_CACHE_LOCK = threading.Lock()
_BUILD_LOCK = threading.Lock()
_CACHES: dict[tuple[str, str, str], CropCache] = {}


def build_crop_cache(catalog_dir: str, *, cpus: float = 1.0, workers: int | None = None) -> CropCache:
    """Read and decode the catalog at ``catalog_dir`` with Ray Data into the object store:
    one task per Parquet row group (no Parquet planning or sampling tasks: the
    catalog's own metadata says where its rows are)."""
    import ray

    catalog.read_manifest(catalog_dir)  # refuse an unfinished catalog with a clear message
    items, ids = row_groups(catalog_dir)
    if not items:
        raise ValueError(f"the catalog at {catalog_dir} has no colonies")
    kwargs: dict[str, Any] = dict(batch_size=1, batch_format="numpy", num_cpus=cpus)
    if workers:
        kwargs["compute"] = ray.data.TaskPoolStrategy(size=workers)
    source = ray.data.from_items(items, override_num_blocks=len(items))
    decoded = source.map_batches(read_decode, **kwargs)
    decoded.context.enable_progress_bars = False
    materialised = decoded.materialize()
    refs = tuple(materialised.to_arrow_refs())
    return CropCache(catalog=os.path.abspath(catalog_dir), key=refs[0].hex(), refs=refs, ids=frozenset(ids),
                     nbytes=int(materialised.size_bytes()))


def crop_cache(catalog_dir: str, *, cpus: float = 1.0, workers: int | None = None) -> CropCache:
    """The process's cache of a catalog (built on first use, per Ray session): every fold
    and run of this process that reads the catalog shares it."""
    import ray

    key = (os.path.abspath(catalog_dir), catalog_key(catalog_dir), ray.get_runtime_context().get_job_id())
    with _BUILD_LOCK:  # folds trained in parallel threads wait for one build instead of each making one
        with _CACHE_LOCK:
            found = _CACHES.get(key)
        if found is None:
            found = build_crop_cache(catalog_dir, cpus=cpus, workers=workers)
            with _CACHE_LOCK:
                while len(_CACHES) >= 2:  # a rebuilt or another catalog: drop the oldest
                    _CACHES.pop(next(iter(_CACHES)))
                _CACHES[key] = found
    return found


def forget_caches() -> None:
    """Drop this process's caches (their objects are freed once no run holds them)."""
    with _CACHE_LOCK:
        _CACHES.clear()
    with _VIEWS_LOCK:
        _VIEWS.clear()


# --------------------------------------------------------------------------- each epoch

def _plan_stage(batch: dict[str, np.ndarray], spec: StreamSpec, epoch: int, cache: CropCache) -> dict[str, np.ndarray]:
    """``map_batches`` UDF of the epoch stream (Ray tasks, whose processes stay warm)."""
    import torch

    torch.set_num_threads(1)
    return cut_plan(unpack_plan(batch), spec, epoch, views_of(cache))


def batch_bytes(spec: StreamSpec, batch_size: int) -> int:
    """About the bytes of one patch batch (its float32 patch columns)."""
    per = sum(4 * s * s for s in spec.geometry.scales) * (2 if spec.mode == "uda" else 1)
    return int(batch_size) * (per + 256)


def plan_source(plan: Mapping[str, np.ndarray], batch_size: int, parts: int = 1):
    """A plan as an in-memory Ray dataset: one row per batch of ``batch_size`` plan rows
    (columns of lists; :func:`unpack_plan` turns a batch of them back into plan columns),
    in ``parts`` blocks, in order. Built in this process (``from_items``): no task, so it
    never waits for a free CPU on a full node."""
    import ray

    n = len(plan["colony_id"])
    if n == 0:
        raise ValueError("the plan is empty")
    items = [{k: np.asarray(v)[i:i + batch_size].tolist() for k, v in plan.items()}
             for i in range(0, n, int(batch_size))]
    return ray.data.from_items(items, override_num_blocks=max(1, min(int(parts), len(items))))


def plan_dataset(cache: CropCache, spec: StreamSpec, plan: Mapping[str, np.ndarray], *, epoch: int,
                 batch_size: int, workers: int = 1, cpus: float = 1.0):
    """The Ray Data stream of one epoch's ``plan``: ``workers`` patch tasks at once, each
    cutting a run of whole batches, one output block per batch, in the plan's order."""
    import ray

    source = plan_source(plan, batch_size, workers)
    ds = source.map_batches(_plan_stage, batch_size=1, batch_format="numpy", num_cpus=cpus,
                            compute=ray.data.TaskPoolStrategy(size=max(int(workers), 1)),
                            fn_kwargs=dict(spec=spec, epoch=int(epoch), cache=cache))
    ctx = ds.context
    ctx.execution_options.preserve_order = True  # the plan's order is the epoch's order
    ctx.target_max_block_size = max(batch_bytes(spec, batch_size), 1 << 20)  # a block per batch: stream them
    ctx.enable_progress_bars = False  # one execution per epoch: bars would only spam the logs
    return ds


def plan_batches(cache: CropCache, spec: StreamSpec, plan: Mapping[str, np.ndarray], *, epoch: int,
                 batch_size: int, workers: int = 1, cpus: float = 1.0, device: str = "cpu",
                 drop_last: bool = True, prefetch_batches: int = 2):
    """Torch batches of one epoch's ``plan`` (as :func:`ipb_ray.distributed.streams.torch_batches`),
    on the host; for a CUDA ``device`` they are pinned (page-locked) on Ray's batch thread,
    so the training step's ``.to(device, non_blocking=True)`` overlaps the copy."""
    if len(plan["colony_id"]) == 0 or (drop_last and len(plan["colony_id"]) < batch_size):
        return iter(())
    ds = plan_dataset(cache, spec, plan, epoch=epoch, batch_size=batch_size, workers=workers, cpus=cpus)
    pin = str(device).startswith("cuda") and _cuda()
    return ds.iter_torch_batches(batch_size=batch_size, collate_fn=collate_class()(spec.patch_columns(), pin),
                                 drop_last=drop_last, prefetch_batches=prefetch_batches, device=device)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
