"""Benchmark: patches/s reaching a training loop, Ray Data stream against a torch DataLoader.

    python benchmarks/patch_stream.py --catalog CATALOG [--scale 1 10] [--epochs 5] [--repeat 3]
                                      [--batch-size 32] [--with-model | --no-model]

Both producers turn the same catalog rows into the same patches with the same pure
function, :func:`ipb_ray.distributed.streams.patch_batch` (train mode, multi-scale 224/112 geometry of
``DataConfig()``, paper augmentation), in sequential catalog order:

- ``ray``: :func:`ipb_ray.distributed.streams.patch_dataset` with one patch task at a time (``workers=1``, 1 CPU)
  read by :func:`ipb_ray.distributed.streams.torch_batches` in the driver, on a local Ray cluster that
  :func:`ipb_ray.distributed.ray_setup.init_ray` starts (2 CPUs here). A fresh dataset per epoch, as
  a training loop with a fixed ``epoch`` argument builds it.
- ``dl1`` / ``dl0``: ``torch.utils.data.DataLoader`` over a map-style dataset whose items
  are whole batches (a batch sampler hands it 32 catalog indices; it reads those rows
  and calls ``patch_batch`` once), with ``num_workers=1`` (one producer process, as the
  one Ray patch task) or ``0`` (producer and consumer share the process). Rows are read lazily:
  the dataset keeps only (file, row group, row) per colony and reads a row group's
  ``colony_id/image/mask/label`` columns with pyarrow when a batch first needs it (a
  few row groups cached per worker); ``--dl-source memory`` holds the PNG bytes instead.

The consumer (the driver / DataLoader's main process) runs ``torch.set_num_threads(1)``;
OpenMP/BLAS and OpenCV are held to one thread in every process through the environment
(``OMP_NUM_THREADS=1``, ``OPENCV_FOR_THREADS_NUM=1``, inherited by Ray workers and
DataLoader workers), so the two cores split into one producer and one consumer. With
``--with-model`` each batch also runs a forward, backward and SGD step of a tiny
two-branch CNN (defined here) on ``x224`` and ``x112``; without it the loop only
receives the batch.

Each (scale, pipeline, model) run is a fresh child process: ``--warmup`` untimed epochs,
then ``--epochs`` timed ones. An epoch's time runs from building its iterator (Ray: the
plan and the first read and patch tasks; DataLoader: forking its worker) to the last batch, so
the rate counts the per-epoch start-up a training loop pays; the time to the first batch
and the rate after it are reported as well. The runs are interleaved round by round
(``--repeat``) so a busy neighbour hurts every pipeline alike; the table shows medians.

Memory, sampled every ``--sample-s`` from ``/proc`` while a run lasts: the consumer's
RSS (and its kernel high-water mark ``ru_maxrss``), the RSS and PSS summed over the
consumer and all its descendants (Ray's raylet, GCS, dashboard and ``ray::`` workers, or
the DataLoader worker; PSS shares each shared page among the processes mapping it, so
the object store is not counted once per process) and, for Ray, the object store's
bytes in use (asked from the raylet, a private Ray API; left out where it fails).

``--scale 10`` writes (once) a copy of the catalog under ``--work-dir`` whose parts are
repeated ten times, each copy with fresh colony ids (``sha1(id|copy k)[:16]``, hex like
the originals, so every copy draws different windows); same pixels, ten times the rows.

Investigation switches (they change the Ray side only; the defaults are the project's
code as it is; ``--tag`` names the variant in the table): ``--prefetch-batches``,
``--map-batch-size`` (rows per ``map_batches`` call, default the loader's batch size),
``--stage-cpus``, ``--preserve-order``, ``--lean-collate`` (replaces the collate of
``torch_batches`` by one that skips the defensive copy), ``--reuse-dataset`` (one dataset
for every epoch, epoch read from the :class:`ipb_ray.distributed.streams.StreamState` actor),
``--read-rows N`` (``read_parquet`` patched to ``override_num_blocks = ceil(colonies / N)``:
read tasks of about N colonies rather than one per part file).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "OPENCV_FOR_THREADS_NUM"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterable, Iterator  # noqa: E402

from _common import cpu_model  # noqa: E402

PIPELINES = ("ray", "dl1", "dl0")
MIB = 1024 * 1024


# --------------------------------------------------------------------------- settings

@dataclass
class RunSpec:
    """One child run: a pipeline at one catalog scale, with or without the model step."""

    catalog: str
    pipeline: str
    model: bool
    scale: int
    epochs: int
    warmup: int
    batch_size: int
    sample_s: float
    object_store_mb: int
    prefetch_batches: int
    map_batch_size: int | None = None
    stage_cpus: float = 1.0
    preserve_order: bool = False
    lean_collate: bool = False
    reuse_dataset: bool = False
    split: bool = False
    read_rows: int | None = None
    dl_source: str = "lazy"
    ray_stats: bool = False
    tag: str = ""


@dataclass
class EpochTime:
    patches: int
    seconds: float
    first_batch_s: float
    first_batch_patches: int
    consumer_cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.patches / self.seconds

    @property
    def steady_rate(self) -> float:
        """Patches/s after the first batch arrived (the start-up left out)."""
        after = self.seconds - self.first_batch_s
        return (self.patches - self.first_batch_patches) / after if after > 0 else float("nan")


@dataclass
class MemoryPeaks:
    consumer_rss_mb: float = 0.0
    tree_rss_mb: float = 0.0
    tree_pss_mb: float = 0.0
    workers_pss_mb: float = 0.0
    object_store_mb: float = 0.0
    processes: int = 0
    baseline: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- memory

def _read_kb(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # the command name may hold spaces or brackets: fields start after the last ')'
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0")[0].decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


class MemorySampler(threading.Thread):
    """Samples the memory of this process tree (and the object store) until stopped."""

    def __init__(self, interval_s: float):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peaks = MemoryPeaks()
        self.store_probe: Callable[[], float] | None = None
        self._stop_event = threading.Event()

    def sample(self) -> dict[str, float]:
        me = os.getpid()
        tree_rss = tree_pss = workers_pss = 0.0
        pids = _descendants(me)
        for pid in pids:
            kb = _read_kb(f"/proc/{pid}/smaps_rollup", ("Rss", "Pss"))
            tree_rss += kb.get("Rss", 0) / 1024
            tree_pss += kb.get("Pss", 0) / 1024
            if pid != me and _cmdline(pid).startswith("ray::"):
                workers_pss += kb.get("Pss", 0) / 1024
        now = {"consumer_rss_mb": _read_kb("/proc/self/status", ("VmRSS",)).get("VmRSS", 0) / 1024,
               "tree_rss_mb": tree_rss, "tree_pss_mb": tree_pss, "workers_pss_mb": workers_pss,
               "processes": float(len(pids))}
        if self.store_probe is not None:
            try:
                now["object_store_mb"] = self.store_probe()
            except Exception:  # a private Ray API: a failed probe just leaves the figure out
                self.store_probe = None
        for key, value in now.items():
            setattr(self.peaks, key, max(getattr(self.peaks, key), value))
        return now

    def mark_baseline(self) -> None:
        self.peaks.baseline = self.sample()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.sample()

    def stop(self) -> MemoryPeaks:
        self._stop_event.set()
        self.join()
        self.sample()
        self.peaks.consumer_rss_mb = max(self.peaks.consumer_rss_mb,
                                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return self.peaks


def _object_store_probe() -> Callable[[], float]:
    """MiB in use in the local cluster's object store, read from the raylet."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)

    def used_mb() -> float:
        reply = get_memory_info_reply(state, timeout_seconds=5.0)
        return reply.store_stats.object_store_bytes_used / MIB

    used_mb()
    return used_mb


# --------------------------------------------------------------------------- catalog

def scaled_catalog(catalog: Path, scale: int, work_dir: Path) -> Path:
    """``catalog`` itself for scale 1, else a copy whose parts repeat ``scale`` times, each
    repetition with fresh hex colony ids (made once, reused after)."""
    if scale == 1:
        return catalog
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ipb_ray.data import catalog as cat
    out = work_dir / f"{catalog.name}_x{scale}"
    if (out / cat.MANIFEST).exists():
        return out
    manifest = cat.read_manifest(catalog)
    if out.exists():
        shutil.rmtree(out)
    (out / "parts").mkdir(parents=True)
    for part in sorted((catalog / "parts").glob("*.parquet")):
        table = pq.read_table(part, schema=cat.SCHEMA)
        for k in range(scale):
            ids = [hashlib.sha1(f"{cid}|copy {k}".encode()).hexdigest()[:16]
                   for cid in table.column("colony_id").to_pylist()]
            copy = table.set_column(table.schema.get_field_index("colony_id"), cat.SCHEMA.field("colony_id"),
                                    pa.array(ids, pa.string()))
            pq.write_table(copy, out / "parts" / f"{part.stem}-x{k}.parquet",
                           row_group_size=cat.ROW_GROUP_SIZE, compression="zstd")
    manifest.update(colonies=manifest["colonies"] * scale, counts={k: v * scale for k, v in manifest["counts"].items()},
                    scaled_from=str(catalog), scale=scale)
    (out / cat.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


# --------------------------------------------------------------------------- the consumer

def tiny_net(classes: int):
    """Two small conv branches (global 224 view, local 112 view), pooled and joined."""
    import torch
    from torch import nn

    def branch(first_stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 8, 5, stride=first_stride, padding=2), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())

    class TinyNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.global_branch, self.local_branch = branch(4), branch(2)
            self.head = nn.Linear(32, classes)

        def forward(self, x224, x112):
            return self.head(torch.cat([self.global_branch(x224), self.local_branch(x112)], dim=1))

    return TinyNet()


def make_consumer(model: bool, classes: int) -> Callable[[dict], int]:
    """``consume(batch) -> patches``; with ``model`` one SGD step of :func:`tiny_net`."""
    if not model:
        return lambda batch: int(batch["x224"].shape[0])
    import torch

    net = tiny_net(classes)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-1, reduction="sum")

    def step(batch: dict) -> int:
        logits = net(batch["x224"], batch["x112"])
        loss = loss_fn(logits, batch["label"]) / max(1, int((batch["label"] >= 0).sum()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return int(batch["x224"].shape[0])

    return step


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def time_epoch(make_batches: Callable[[], Iterable[dict]], consume: Callable[[dict], int]) -> EpochTime:
    cpu0 = _cpu_s()
    start = time.perf_counter()
    first = None
    patches = first_n = 0
    for batch in make_batches():
        n = consume(batch)
        if first is None:
            first, first_n = time.perf_counter() - start, n
        patches += n
    return EpochTime(patches=patches, seconds=time.perf_counter() - start,
                     first_batch_s=first if first is not None else float("nan"), first_batch_patches=first_n,
                     consumer_cpu_s=_cpu_s() - cpu0)


def _as_tensors(out: dict[str, Any], patch_columns: list[str]) -> dict[str, Any]:
    """patch_batch's numpy columns -> the tensors torch_batches hands out (same keys)."""
    import torch

    batch: dict[str, Any] = {name: torch.from_numpy(out[name]) for name in patch_columns}
    batch["label"] = torch.from_numpy(out["label"])
    batch["colony_id"] = list(out["colony_id"])
    return batch


# --------------------------------------------------------------------------- DataLoader

class CatalogBatches:
    """Map-style dataset for a DataLoader: item ``(epoch, [row indices])`` -> one patch batch.

    ``source="lazy"`` keeps only each row's (file, row group, row) and reads the row
    group's four columns with pyarrow when needed (the last few kept per process, no
    file handles kept);
    ``"memory"`` reads the whole four columns (PNG bytes included) up front.
    """

    COLUMNS = ["colony_id", "image", "mask", "label"]
    CACHED_GROUPS = 4

    def __init__(self, catalog_dir: Path, spec, source: str = "lazy"):
        import numpy as np
        import pyarrow.parquet as pq

        self.spec, self.source = spec, source
        self.files = sorted(str(p) for p in (catalog_dir / "parts").glob("*.parquet"))
        where = []
        for fi, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            for rg in range(meta.num_row_groups):
                where.extend((fi, rg, r) for r in range(meta.row_group(rg).num_rows))
        self.where = np.array(where, dtype=np.int32).reshape(-1, 3)
        self._groups: dict[tuple[int, int], dict[str, list]] = {}
        self._columns: dict[str, list] | None = None
        if source == "memory":
            from ipb_ray.data import catalog
            table = catalog.read_catalog(catalog_dir, columns=self.COLUMNS)
            self._columns = {k: table.column(k).to_pylist() for k in self.COLUMNS}

    def __len__(self) -> int:
        return len(self.where)

    def _group(self, fi: int, rg: int) -> dict[str, list]:
        key = (fi, rg)
        if key not in self._groups:
            import pyarrow.parquet as pq

            # open, read, close: kept handles would hold buffers for every file of the catalog
            with pq.ParquetFile(self.files[fi]) as part:
                table = part.read_row_group(rg, columns=self.COLUMNS)
            if len(self._groups) >= self.CACHED_GROUPS:
                self._groups.pop(next(iter(self._groups)))
            self._groups[key] = {k: table.column(k).to_pylist() for k in self.COLUMNS}
        return self._groups[key]

    def rows(self, indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in self.COLUMNS}
        for i in indices:
            if self._columns is not None:
                for k in self.COLUMNS:
                    out[k].append(self._columns[k][i])
            else:
                fi, rg, r = (int(v) for v in self.where[i])
                group = self._group(fi, rg)
                for k in self.COLUMNS:
                    out[k].append(group[k][r])
        return out

    def __getitem__(self, item: tuple[int, list[int]]) -> dict[str, Any]:
        from ipb_ray.distributed.streams import patch_batch

        epoch, indices = item
        return _as_tensors(patch_batch(self.rows(indices), self.spec, epoch), self.spec.patch_columns())


class EpochBatchSampler:
    """Sequential batches of indices, tagged with the epoch (set before each epoch)."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size, self.epoch = n, batch_size, 0

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        for b in range(len(self)):
            yield self.epoch, list(range(b * self.batch_size, (b + 1) * self.batch_size))


def run_dataloader(run: RunSpec, catalog_dir: Path, spec, consume, sampler: MemorySampler) -> list[EpochTime]:
    import torch

    dataset = CatalogBatches(catalog_dir, spec, run.dl_source)
    batches = EpochBatchSampler(len(dataset), run.batch_size)
    workers = int(run.pipeline[2:])
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=batches, num_workers=workers,
                                         collate_fn=lambda b: b, prefetch_factor=2 if workers else None)
    sampler.mark_baseline()
    times = []
    for epoch in range(run.warmup + run.epochs):
        batches.epoch = epoch
        times.append(time_epoch(lambda: loader, consume))
    return times


# --------------------------------------------------------------------------- Ray Data

def _lean_collate(spec):
    """A collate for torch_batches that wraps the numpy columns without copying them
    (torch warns that Arrow's buffers are read-only; nothing here writes into a batch)."""
    import warnings

    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    columns = spec.patch_columns()

    class LeanCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict) -> dict:
            out = {k: torch.from_numpy(batch[k]) for k in columns}
            out["label"] = torch.from_numpy(batch["label"].astype("int64", copy=False))
            out["colony_id"] = list(batch["colony_id"])
            return out

    return LeanCollate()


def _read_in_blocks_of(rows: int, catalog_dir: Path) -> None:
    """Make ``ray.data.read_parquet`` (as patch_dataset calls it) cut the catalog into read
    tasks of about ``rows`` colonies instead of one task per part file."""
    import functools
    import math

    import ray.data

    from ipb_ray.data import catalog
    blocks = max(1, math.ceil(catalog.read_manifest(catalog_dir)["colonies"] / rows))
    ray.data.read_parquet = functools.partial(ray.data.read_parquet, override_num_blocks=blocks)


def run_ray(run: RunSpec, catalog_dir: Path, spec, consume, sampler: MemorySampler) -> tuple[list[EpochTime], str]:
    import ray

    from ipb_ray.distributed import streams
    from ipb_ray.config import ResourcesConfig
    from ipb_ray.distributed.ray_setup import init_ray

    init_ray(ResourcesConfig(object_store_mb=run.object_store_mb))
    if run.read_rows:
        _read_in_blocks_of(run.read_rows, catalog_dir)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = run.preserve_order
    try:
        sampler.store_probe = _object_store_probe()
    except Exception as exc:  # noqa: BLE001 - the figure is optional
        print(f"object store probe unavailable: {exc}", file=sys.stderr)
    sampler.mark_baseline()
    state_name = None
    if run.reuse_dataset:
        state_name = f"bench-{os.getpid()}"
        state = streams.stream_state(state_name)
        ds_shared = streams.patch_dataset(str(catalog_dir), spec, state_name=state_name,
                                          batch_size=run.map_batch_size or run.batch_size, workers=1,
                                          cpus=run.stage_cpus)

    def batches_of(ds):
        if run.split:  # as Ray Train's get_dataset_shard: the executor runs in a coordinator actor
            ds = ds.streaming_split(1, equal=True)[0]
        if run.lean_collate:
            return ds.iter_torch_batches(batch_size=run.batch_size, collate_fn=_lean_collate(spec), drop_last=True,
                                         prefetch_batches=run.prefetch_batches)
        return streams.torch_batches(ds, spec, run.batch_size, prefetch_batches=run.prefetch_batches)

    times, stats = [], ""
    for epoch in range(run.warmup + run.epochs):
        holder: dict[str, Any] = {}

        def make():
            if run.reuse_dataset:
                ray.get(state.set.remote(epoch))
                holder["ds"] = ds_shared
            else:
                holder["ds"] = streams.patch_dataset(str(catalog_dir), spec, epoch=epoch,
                                                     batch_size=run.map_batch_size or run.batch_size,
                                                     workers=1, cpus=run.stage_cpus)
            return batches_of(holder["ds"])

        times.append(time_epoch(make, consume))
        if run.ray_stats and epoch == run.warmup + run.epochs - 1:
            stats = holder["ds"].stats()
    if state_name:
        ray.kill(state)
    return times, stats


# --------------------------------------------------------------------------- child

def child(run: RunSpec) -> dict[str, Any]:
    import cv2
    import torch

    from ipb_ray.data import catalog
    from ipb_ray.config import DataConfig
    from ipb_ray.patches.geometry import PatchGeometry
    from ipb_ray.distributed.streams import StreamSpec

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    catalog_dir = Path(run.catalog)
    manifest = catalog.read_manifest(catalog_dir)
    spec = StreamSpec(geometry=PatchGeometry.from_config(DataConfig()),
                      class_names=tuple(manifest["class_names"]), seed=0, mode="train")
    consume = make_consumer(run.model, len(spec.class_names))
    sampler = MemorySampler(run.sample_s)
    sampler.start()
    load_before = os.getloadavg()[0]
    stats = ""
    if run.pipeline == "ray":
        times, stats = run_ray(run, catalog_dir, spec, consume, sampler)
    else:
        times = run_dataloader(run, catalog_dir, spec, consume, sampler)
    peaks = sampler.stop()
    timed = times[run.warmup:]
    return {
        "run": asdict(run), "colonies": manifest["colonies"],
        "warmup": [asdict(t) | {"rate": t.rate} for t in times[:run.warmup]],
        "epochs": [asdict(t) | {"rate": t.rate, "steady_rate": t.steady_rate} for t in timed],
        "rate": sum(t.patches for t in timed) / sum(t.seconds for t in timed),
        "steady_rate": statistics.median(t.steady_rate for t in timed),
        "first_batch_s": statistics.median(t.first_batch_s for t in timed),
        "consumer_cpu_ms_per_patch": 1000 * sum(t.consumer_cpu_s for t in timed) / sum(t.patches for t in timed),
        "memory": asdict(peaks), "load": [load_before, os.getloadavg()[0]], "ray_stats": stats,
    }


# --------------------------------------------------------------------------- driver

def _versions() -> str:
    out = subprocess.run([sys.executable, "-c", (
        "import ray, torch, pyarrow, numpy, cv2; "
        "print(f'ray {ray.__version__}, torch {torch.__version__}, pyarrow {pyarrow.__version__}, "
        "numpy {numpy.__version__}, OpenCV {cv2.__version__}')")], capture_output=True, text=True)
    return out.stdout.strip()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(results: list[dict[str, Any]]) -> str:
    """Throughput (median over runs) and memory (max over runs; "(start)": the tree's PSS
    before the first epoch, median) per scale/pipeline/model."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["run"]["scale"], r["run"]["model"], r["run"]["pipeline"], r["run"]["tag"])
        groups.setdefault(key, []).append(r)
    names = {"ray": "Ray Data, 1 task", "dl1": "DataLoader, 1 worker", "dl0": "DataLoader, 0 workers"}
    head = (f"{'scale':>5} {'model':>5} {'pipeline':<40} {'runs':>4} {'patches/s':>9} {'range':>11} "
            f"{'steady/s':>8} {'1st batch s':>11} {'vs dl1':>6} {'cons RSS':>8} {'tree RSS':>8} "
            f"{'tree PSS':>8} {'(start)':>7} {'store':>6}")
    lines = [head, "-" * len(head)]
    for key in sorted(groups, key=lambda k: (k[0], k[1], PIPELINES.index(k[2]), k[3])):
        scale, model, pipeline, tag = key
        runs = groups[key]
        rates = [r["rate"] for r in runs]
        ref = groups.get((scale, model, "dl1", ""))
        ratio = _median(rates) / _median([r["rate"] for r in ref]) if ref else float("nan")
        mem = {k: max(r["memory"][k] for r in runs) for k in ("consumer_rss_mb", "tree_rss_mb", "tree_pss_mb",
                                                              "object_store_mb")}
        name = names[pipeline] + (f" [{tag}]" if tag else "")
        store = f"{mem['object_store_mb']:6.0f}" if pipeline == "ray" else f"{'-':>6}"
        start = _median([r["memory"]["baseline"].get("tree_pss_mb", float("nan")) for r in runs])
        lines.append(
            f"{scale:>4}x {'yes' if model else 'no':>5} {name:<40} {len(runs):>4} {_median(rates):9.1f} "
            f"{min(rates):5.0f}-{max(rates):<5.0f} {_median([r['steady_rate'] for r in runs]):8.1f} "
            f"{_median([r['first_batch_s'] for r in runs]):11.2f} {ratio:6.2f} {mem['consumer_rss_mb']:8.0f} "
            f"{mem['tree_rss_mb']:8.0f} {mem['tree_pss_mb']:8.0f} {start:7.0f} {store}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", type=Path, help="a finished colony catalog (ipb preprocess)")
    p.add_argument("--scale", type=int, nargs="+", default=[1], help="catalog sizes to run, e.g. 1 10")
    p.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    p.add_argument("--with-model", dest="model", action="store_true", default=None,
                   help="only with the model step (default: both)")
    p.add_argument("--no-model", dest="model", action="store_false", help="only without the model step")
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    p.add_argument("--repeat", type=int, default=3, help="rounds of runs (medians over them)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sample-s", type=float, default=0.5, help="memory sampling interval, s")
    p.add_argument("--object-store-mb", type=int, default=1000)
    p.add_argument("--prefetch-batches", type=int, default=2, help="torch_batches' prefetch (its default 2)")
    p.add_argument("--map-batch-size", type=int, default=None, help="rows per map_batches call (default --batch-size)")
    p.add_argument("--stage-cpus", type=float, default=1.0, help="CPUs per patch task and read task")
    p.add_argument("--preserve-order", action="store_true")
    p.add_argument("--lean-collate", action="store_true", help="collate without the defensive copy")
    p.add_argument("--split", action="store_true",
                   help="read through streaming_split(1), as a Ray Train worker's dataset shard does")
    p.add_argument("--reuse-dataset", action="store_true", help="one dataset, epoch from the StreamState actor")
    p.add_argument("--read-rows", type=int, default=None,
                   help="Ray read tasks of about this many colonies (default: one per part file)")
    p.add_argument("--dl-source", choices=("lazy", "memory"), default="lazy")
    p.add_argument("--ray-stats", action="store_true", help="keep Ray Data's stats of each run's last epoch")
    p.add_argument("--tag", default="", help="label for this variant in the table")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/ipb_patch_stream"), help="where scaled catalogs go")
    p.add_argument("--out", type=Path, default=None, help="append each run's JSON here")
    p.add_argument("--timeout-s", type=int, default=900, help="limit per child run")
    p.add_argument("--report", type=Path, nargs="+", help="only print the table of these --out files")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.report and args.catalog is None:
        p.error("--catalog is required (unless --report)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(RunSpec(**json.loads(args.child)))), flush=True)
        return
    if args.report:
        print(table([json.loads(line) for path in args.report for line in path.read_text().splitlines() if line]))
        return
    models = [False, True] if args.model is None else [args.model]
    catalogs = {s: scaled_catalog(args.catalog.resolve(), s, args.work_dir) for s in args.scale}
    print(f"cpu: {cpu_model()} (nproc {os.cpu_count()}); {_versions()}; python {platform.python_version()}")
    print(f"threads: consumer torch 1, OMP/OpenCV 1 everywhere; batch {args.batch_size}, "
          f"epochs {args.warmup} warm-up + {args.epochs} timed, repeat {args.repeat}", flush=True)
    results = []
    for rnd in range(args.repeat):
        for scale in args.scale:
            for pipeline in args.pipelines:
                for model in models:
                    run = RunSpec(catalog=str(catalogs[scale]), pipeline=pipeline, model=model, scale=scale,
                                  epochs=args.epochs, warmup=args.warmup, batch_size=args.batch_size,
                                  sample_s=args.sample_s, object_store_mb=args.object_store_mb,
                                  prefetch_batches=args.prefetch_batches, map_batch_size=args.map_batch_size,
                                  stage_cpus=args.stage_cpus, preserve_order=args.preserve_order,
                                  lean_collate=args.lean_collate, reuse_dataset=args.reuse_dataset, split=args.split,
                                  read_rows=args.read_rows,
                                  dl_source=args.dl_source, ray_stats=args.ray_stats, tag=args.tag)
                    started = time.perf_counter()
                    proc = subprocess.run([sys.executable, __file__, "--catalog", str(args.catalog),
                                           "--child", json.dumps(asdict(run))],
                                          capture_output=True, text=True, timeout=args.timeout_s)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode or not lines:
                        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
                        raise SystemExit(f"child run {pipeline} scale {scale} model {model} failed")
                    result = json.loads(lines[-1][len("RESULT "):])
                    results.append(result)
                    if args.out:
                        with args.out.open("a") as fh:
                            fh.write(json.dumps(result) + "\n")
                    m = result["memory"]
                    epoch_rates = " ".join(f"{e['rate']:.0f}" for e in result["epochs"])
                    print(f"round {rnd + 1} {scale}x {pipeline:<3} model={'yes' if model else 'no ':<3} "
                          f"{result['rate']:7.1f} patches/s (steady {result['steady_rate']:6.1f}, first batch "
                          f"{result['first_batch_s']:.2f} s; epochs "
                          f"{epoch_rates}) "
                          f"consumer {m['consumer_rss_mb']:.0f} MB, tree RSS {m['tree_rss_mb']:.0f} / "
                          f"PSS {m['tree_pss_mb']:.0f} MB, store {m['object_store_mb']:.0f} MB; "
                          f"consumer CPU {result['consumer_cpu_ms_per_patch']:.2f} ms/patch; "
                          f"load {result['load'][0]:.1f}->{result['load'][1]:.1f}; "
                          f"{time.perf_counter() - started:.0f} s", flush=True)
                    if result["ray_stats"]:
                        print(result["ray_stats"], flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
