"""Benchmark: patches/s reaching a training loop, Ray Data stream against a torch DataLoader.

    python benchmarks/patch_stream.py --catalog CATALOG [--scale 1 10] [--streams labelled unlabelled]
        [--pipelines ray dl1 ray-catalog dl0] [--epochs 5] [--repeat 3] [--with-model | --no-model]

Every pipeline streams the same epochs: the same draw of (colony, copy) pairs in the same
whole-epoch seeded order (:mod:`ipb_ray.patches.plan`), each pair cut by the same pure
function (:func:`ipb_ray.patches.core.emit_patch`; multi-scale 224/112 geometry of
``DataConfig()``, the paper's augmentation). Two streams:

- ``labelled``: a class-balanced draw of as many patches as the catalog has labelled
  colonies, one augmented view (``train`` mode), as every method reads L;
- ``unlabelled``: IPB's student stream, the pseudo-balanced multinomial draw of
  :func:`ipb_ray.patches.balance.pseudo_balance` over every colony (each colony's known
  class as its pseudo-label, a seeded random one where it has none), redrawn each epoch,
  weak and strong views (``uda`` mode).

Pipelines:

- ``ray``: the training stream (:mod:`ipb_ray.distributed.epoch_stream`): the catalog read
  and decoded once by Ray Data into the object store (timed as "set-up"), then each
  epoch :func:`~ipb_ray.distributed.epoch_stream.plan_batches` with one patch task at a
  time (1 CPU) on a local Ray cluster that :func:`ipb_ray.distributed.ray_setup.init_ray`
  starts (2 CPUs here);
- ``ray-catalog``: the stream training used before (``streams.patch_dataset`` +
  ``torch_batches``: Parquet read and PNG decoding every epoch, the seeded shuffle buffer
  of 512 patches in the consumer, the old ``method.shuffle_buffer`` default);
- ``dl1`` / ``dl0``: ``torch.utils.data.DataLoader`` over a map-style dataset whose items
  are whole batches of the plan (each pair read, decoded and cut), with
  ``num_workers=1`` (one producer process, as the one Ray patch task) or ``0``. The
  dataset holds every colony's PNG bytes in memory (read up front, not timed), the
  DataLoader's best case; ``--dl-source lazy`` reads Parquet row groups when a batch
  needs them instead (slow in a shuffled epoch: nearly every patch re-reads a group).

The consumer (the driver / DataLoader's main process) runs ``torch.set_num_threads(1)``;
OpenMP/BLAS and OpenCV are held to one thread in every process through the environment,
so the two cores split into one producer and one consumer. With ``--with-model`` each
batch also runs a forward, backward and SGD step of a tiny two-branch CNN (defined here):
cross-entropy on the labelled view, or on the strong views against the weak views'
argmax; without it the loop only receives the batch.

Each (scale, stream, model, pipeline) run is a fresh child process: ``--warmup`` untimed
epochs, then ``--epochs`` timed ones. An epoch's time runs from building its iterator
(Ray: the plan dataset and the first patch task; DataLoader: forking its worker) to the
last batch, so the rate counts the per-epoch start-up a training loop pays; the time to
the first batch and the rate after it are reported too, and "run/s" divides every
patch of the run (warm-up included) by the whole run's time including the one-time
set-up. Runs are interleaved round by round (``--repeat``); the table shows medians.

Memory, sampled every ``--sample-s`` from ``/proc`` while a run lasts: the consumer's
RSS (and ``ru_maxrss``), the PSS summed over the consumer and all its descendants (Ray's
raylet, GCS, dashboard and ``ray::`` workers, or the DataLoader worker; PSS shares each
shared page among the processes mapping it, so the object store is not counted once per
process) and, for Ray, the object store's bytes in use (asked from the raylet, a private
Ray API; left out where it fails).

``--scale 10`` writes (once) a copy of the catalog under ``--work-dir`` whose parts are
repeated ten times, each copy with fresh colony ids (``sha1(id|copy k)[:16]``, hex like
the originals, so every copy draws different windows); same pixels, ten times the rows.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "OPENCV_FOR_THREADS_NUM"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
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
from _plans import epoch_plan, ids_and_labels, stream_spec  # noqa: E402

PIPELINES = ("ray", "ray-catalog", "dl1", "dl0")
STREAMS = ("labelled", "unlabelled")
OLD_SHUFFLE_BUFFER = 512  # the retired method.shuffle_buffer's default
MIB = 1024 * 1024


# --------------------------------------------------------------------------- settings

@dataclass
class RunSpec:
    """One child run: a pipeline at one catalog scale, with or without the model step."""

    catalog: str
    pipeline: str
    stream: str
    model: bool
    scale: int
    epochs: int
    warmup: int
    batch_size: int
    sample_s: float
    object_store_mb: int
    prefetch_batches: int
    stage_cpus: float = 1.0
    dl_source: str = "memory"
    tag: str = ""


@dataclass
class EpochTime:
    patches: int
    seconds: float
    first_batch_s: float
    first_batch_patches: int
    consumer_cpu_s: float = 0.0
    setup_s: float = 0.0  # one-time work before the first epoch (the Ray crop cache)

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
    """``consume(batch) -> patches``; with ``model`` one SGD step of :func:`tiny_net`:
    cross-entropy on the labelled view, or (unlabelled stream) on the strong views against
    the weak views' argmax."""
    if not model:
        return lambda batch: int(batch["label"].shape[0])
    import torch

    net = tiny_net(classes)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-1, reduction="sum")

    def step(batch: dict) -> int:
        if "x224" in batch:
            logits, target = net(batch["x224"], batch["x112"]), batch["label"]
        else:
            with torch.no_grad():
                target = net(batch["weak224"], batch["weak112"]).argmax(1)
            logits = net(batch["strong224"], batch["strong112"])
        loss = loss_fn(logits, target) / max(1, int((target >= 0).sum()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return int(target.shape[0])

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
    """Patch columns (numpy) -> the tensors the Ray streams hand out (same keys)."""
    import torch

    batch: dict[str, Any] = {name: torch.from_numpy(out[name]) for name in patch_columns}
    batch["label"] = torch.from_numpy(out["label"])
    batch["colony_id"] = list(out["colony_id"])
    return batch


# --------------------------------------------------------------------------- DataLoader

class CatalogPatches:
    """Map-style dataset for a DataLoader: item ``(epoch, plan rows)`` -> one patch batch.

    Each planned (colony, copy) is read, decoded, prepared and cut with the project's
    pure functions (``catalog.decode_png``, ``prepare_crop``, ``core.emit_patch``).
    ``source="memory"`` (the default) holds every colony's PNG bytes, read up front;
    ``"lazy"`` keeps only each row's (file, row group, row) and reads the row group's
    columns with pyarrow when needed (the last few kept per process): in a shuffled epoch
    nearly every patch then re-reads a row group, so it is not a fair baseline here.
    """

    COLUMNS = ["colony_id", "image", "mask", "label"]
    CACHED_GROUPS = 4

    def __init__(self, catalog_dir: Path, spec, source: str = "lazy"):
        import numpy as np
        import pyarrow.parquet as pq

        self.spec, self.source = spec, source
        self.files = sorted(str(p) for p in (catalog_dir / "parts").glob("*.parquet"))
        where, ids, labels = [], [], []
        for fi, path in enumerate(self.files):
            part = pq.ParquetFile(path)
            meta = part.metadata
            for rg in range(meta.num_row_groups):
                where.extend((fi, rg, r) for r in range(meta.row_group(rg).num_rows))
                small = part.read_row_group(rg, columns=["colony_id", "label"])
                ids.extend(small.column("colony_id").to_pylist())
                labels.extend(small.column("label").to_pylist())
        self.where = np.array(where, dtype=np.int32).reshape(-1, 3)
        self.ids, self.labels = ids, labels
        self.index = {c: i for i, c in enumerate(ids)}
        self._groups: dict[tuple[int, int], dict[str, list]] = {}
        self._bytes: dict[str, tuple[bytes, bytes]] | None = None
        if source == "memory":
            from ipb_ray.data import catalog
            table = catalog.read_catalog(catalog_dir, columns=self.COLUMNS)
            self._bytes = dict(zip(table.column("colony_id").to_pylist(),
                                   zip(table.column("image").to_pylist(), table.column("mask").to_pylist())))

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

    def row(self, i: int) -> tuple[bytes, bytes]:
        if self._bytes is not None:
            return self._bytes[self.ids[i]]
        fi, rg, r = (int(v) for v in self.where[i])
        group = self._group(fi, rg)
        return group["image"][r], group["mask"][r]

    def __getitem__(self, item: tuple[int, dict[str, Any]]) -> dict[str, Any]:
        from ipb_ray.data import catalog
        from ipb_ray.patches.core import emit_patch, finish_rows
        from ipb_ray.patches.geometry import prepare_crop

        epoch, plan = item
        names = {n: i for i, n in enumerate(self.spec.class_names)}
        rows: dict[str, list] = {k: [] for k in self.spec.columns()}
        for cid, copy in zip(plan["colony_id"].tolist(), plan["copy"].tolist()):
            r = self.index[cid]
            img_png, mask_png = self.row(r)
            image, mask, scale = prepare_crop(catalog.decode_png(img_png), catalog.decode_png(mask_png) > 0,
                                              self.spec.geometry.size, whole=self.spec.geometry.whole)
            emit_patch(rows, image, mask, scale, cid, names.get(self.labels[r], -1), copy, None,
                       self.spec, epoch)
        return _as_tensors(finish_rows(rows, self.spec), self.spec.patch_columns())


class PlanSampler:
    """The epoch's plan cut into batches (set ``plan`` and ``epoch`` before each epoch)."""

    def __init__(self, batch_size: int):
        self.batch_size, self.epoch, self.plan = batch_size, 0, None

    def __len__(self) -> int:
        return len(self.plan["colony_id"]) // self.batch_size

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for b in range(len(self)):
            s = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self.epoch, {k: v[s] for k, v in self.plan.items()}


def run_dataloader(run: RunSpec, catalog_dir: Path, spec, consume, sampler: MemorySampler) -> list[EpochTime]:
    import torch

    dataset = CatalogPatches(catalog_dir, spec, run.dl_source)
    batches = PlanSampler(run.batch_size)
    workers = int(run.pipeline[2:])
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=batches, num_workers=workers,
                                         collate_fn=lambda b: b, prefetch_factor=2 if workers else None)
    sampler.mark_baseline()
    times = []
    for epoch in range(run.warmup + run.epochs):
        batches.epoch = epoch
        batches.plan = epoch_plan(run.stream, dataset.ids, dataset.labels, spec.class_names, epoch)
        times.append(time_epoch(lambda: loader, consume))
    return times


# --------------------------------------------------------------------------- Ray Data

def run_ray(run: RunSpec, catalog_dir: Path, spec, consume, sampler: MemorySampler) -> tuple[list[EpochTime], str]:
    """``ray``: the project's training stream (crop cache + plan stream); ``ray-catalog``:
    the catalog stream training used before it (Parquet read and PNG decoding every epoch,
    then the seeded shuffle buffer of the old ``method.shuffle_buffer`` default)."""
    import ray

    from ipb_ray.config import ResourcesConfig
    from ipb_ray.distributed import epoch_stream, streams
    from ipb_ray.distributed.ray_setup import init_ray

    init_ray(ResourcesConfig(object_store_mb=run.object_store_mb))
    try:
        sampler.store_probe = _object_store_probe()
    except Exception as exc:  # noqa: BLE001 - the figure is optional
        print(f"object store probe unavailable: {exc}", file=sys.stderr)
    sampler.mark_baseline()
    t0 = time.perf_counter()
    cache = epoch_stream.crop_cache(str(catalog_dir), workers=1)
    setup_s = time.perf_counter() - t0 if run.pipeline == "ray" else 0.0
    ids, labels = ids_and_labels(catalog_dir)
    times, holder = [], {}
    for epoch in range(run.warmup + run.epochs):
        plan = epoch_plan(run.stream, ids, labels, spec.class_names, epoch)

        def make():
            if run.pipeline == "ray":
                return epoch_stream.plan_batches(cache, spec, plan, epoch=epoch, batch_size=run.batch_size,
                                                 workers=1, cpus=run.stage_cpus,
                                                 prefetch_batches=run.prefetch_batches)
            counts: dict[str, int] = {}
            for cid in plan["colony_id"].tolist():
                counts[cid] = counts.get(cid, 0) + 1
            holder["ds"] = streams.patch_dataset(str(catalog_dir), spec, epoch=epoch, counts=counts,
                                                 batch_size=run.batch_size, workers=1, cpus=run.stage_cpus)
            return streams.torch_batches(holder["ds"], spec, run.batch_size, prefetch_batches=run.prefetch_batches,
                                         shuffle_buffer=OLD_SHUFFLE_BUFFER,
                                         shuffle_seed=streams.shuffle_seed(0, epoch))

        times.append(time_epoch(make, consume))
    times[0].setup_s = setup_s
    return times, ""


# --------------------------------------------------------------------------- child

def child(run: RunSpec) -> dict[str, Any]:
    import cv2
    import torch

    from ipb_ray.data import catalog
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    catalog_dir = Path(run.catalog)
    manifest = catalog.read_manifest(catalog_dir)
    spec = stream_spec(run.stream, tuple(manifest["class_names"]))
    consume = make_consumer(run.model, len(spec.class_names))
    sampler = MemorySampler(run.sample_s)
    sampler.start()
    load_before = os.getloadavg()[0]
    stats = ""
    if run.pipeline.startswith("ray"):
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
        "setup_s": times[0].setup_s,
        # the whole run's rate: the one-time set-up and the warm-up epochs counted too
        "run_rate": sum(t.patches for t in times) / (times[0].setup_s + sum(t.seconds for t in times)),
        "memory": asdict(peaks), "load": [load_before, os.getloadavg()[0]],
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
    before the first epoch, median) per scale/stream/model/pipeline."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["run"]["scale"], r["run"]["stream"], r["run"]["model"], r["run"]["pipeline"], r["run"]["tag"])
        groups.setdefault(key, []).append(r)
    names = {"ray": "Ray Data, crop cache", "ray-catalog": "Ray Data, catalog (before)",
             "dl1": "DataLoader, 1 worker", "dl0": "DataLoader, 0 workers"}
    head = (f"{'scale':>5} {'stream':<10} {'model':>5} {'pipeline':<27} {'runs':>4} {'patches/s':>9} {'range':>11} "
            f"{'steady/s':>8} {'1st batch s':>11} {'vs dl1':>6} {'setup s':>7} {'run/s':>6} {'cons ms':>7} "
            f"{'cons RSS':>8} {'tree PSS':>8} {'(start)':>7} {'store':>6}")
    lines = [head, "-" * len(head)]
    for key in sorted(groups, key=lambda k: (k[0], STREAMS.index(k[1]), k[2], PIPELINES.index(k[3]), k[4])):
        scale, stream, model, pipeline, tag = key
        runs = groups[key]
        rates = [r["rate"] for r in runs]
        ref = groups.get((scale, stream, model, "dl1", ""))
        ratio = _median(rates) / _median([r["rate"] for r in ref]) if ref else float("nan")
        mem = {k: max(r["memory"][k] for r in runs) for k in ("consumer_rss_mb", "tree_pss_mb", "object_store_mb")}
        name = names[pipeline] + (f" [{tag}]" if tag else "")
        store = f"{mem['object_store_mb']:6.0f}" if pipeline.startswith("ray") else f"{'-':>6}"
        start = _median([r["memory"]["baseline"].get("tree_pss_mb", float("nan")) for r in runs])
        lines.append(
            f"{scale:>4}x {stream:<10} {'yes' if model else 'no':>5} {name:<27} {len(runs):>4} {_median(rates):9.1f} "
            f"{min(rates):5.0f}-{max(rates):<5.0f} {_median([r['steady_rate'] for r in runs]):8.1f} "
            f"{_median([r['first_batch_s'] for r in runs]):11.2f} {ratio:6.2f} "
            f"{_median([r['setup_s'] for r in runs]):7.2f} {_median([r['run_rate'] for r in runs]):6.0f} "
            f"{_median([r['consumer_cpu_ms_per_patch'] for r in runs]):7.2f} {mem['consumer_rss_mb']:8.0f} "
            f"{mem['tree_pss_mb']:8.0f} {start:7.0f} {store}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", type=Path, help="a finished colony catalog (ipb preprocess)")
    p.add_argument("--scale", type=int, nargs="+", default=[1], help="catalog sizes to run, e.g. 1 10")
    p.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=["ray", "dl1"])
    p.add_argument("--streams", nargs="+", choices=STREAMS, default=list(STREAMS))
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
    p.add_argument("--stage-cpus", type=float, default=1.0, help="CPUs per patch task and read task")
    p.add_argument("--dl-source", choices=("lazy", "memory"), default="memory",
                   help="DataLoader rows: PNG bytes held in memory (default) or row groups read when needed")
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
            for stream, model, pipeline in itertools.product(args.streams, models, args.pipelines):
                if True:
                    run = RunSpec(catalog=str(catalogs[scale]), pipeline=pipeline, stream=stream, model=model,
                                  scale=scale, epochs=args.epochs, warmup=args.warmup, batch_size=args.batch_size,
                                  sample_s=args.sample_s, object_store_mb=args.object_store_mb,
                                  prefetch_batches=args.prefetch_batches, stage_cpus=args.stage_cpus,
                                  dl_source=args.dl_source, tag=args.tag)
                    started = time.perf_counter()
                    proc = subprocess.run([sys.executable, __file__, "--catalog", str(args.catalog),
                                           "--child", json.dumps(asdict(run))],
                                          capture_output=True, text=True, timeout=args.timeout_s)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode or not lines:
                        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
                        raise SystemExit(f"child run {pipeline} {stream} scale {scale} model {model} failed")
                    result = json.loads(lines[-1][len("RESULT "):])
                    results.append(result)
                    if args.out:
                        with args.out.open("a") as fh:
                            fh.write(json.dumps(result) + "\n")
                    m = result["memory"]
                    epoch_rates = " ".join(f"{e['rate']:.0f}" for e in result["epochs"])
                    print(f"round {rnd + 1} {scale}x {stream} {pipeline} model={'yes' if model else 'no '} "
                          f"{result['rate']:7.1f} patches/s (steady {result['steady_rate']:6.1f}, first batch "
                          f"{result['first_batch_s']:.2f} s; epochs "
                          f"{epoch_rates}) "
                          f"consumer {m['consumer_rss_mb']:.0f} MB, tree RSS {m['tree_rss_mb']:.0f} / "
                          f"PSS {m['tree_pss_mb']:.0f} MB, store {m['object_store_mb']:.0f} MB; "
                          f"consumer CPU {result['consumer_cpu_ms_per_patch']:.2f} ms/patch; "
                          f"set-up {result['setup_s']:.1f} s, whole run {result['run_rate']:.0f} patches/s; "
                          f"load {result['load'][0]:.1f}->{result['load'][1]:.1f}; "
                          f"{time.perf_counter() - started:.0f} s", flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
