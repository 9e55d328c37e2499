"""A catalog's crops decoded in memory, and an epoch's plan cut into patch rows from them
(pure: numpy and pyarrow). The Ray streams (:mod:`ipb_ray.distributed.epoch_stream`) hold
the decoded crops in the object store and cut plans in Ray Data tasks; the in-process
engine (:mod:`ipb_ray.engine.inprocess`) holds them in its own memory and cuts them on a
thread. Both cut a planned patch with :func:`cut_plan`, so a patch is the same whoever
cuts it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ipb_ray.data import catalog
from ipb_ray.patches import plan as plans
from ipb_ray.patches.core import CATALOG_COLUMNS, StreamSpec, emit_patch, finish_rows
from ipb_ray.patches.geometry import prepare_crop

__all__ = ["CropViews", "catalog_key", "cut_plan", "decode_rows", "read_crops", "read_decode", "row_groups",
           "unpack_plan"]


def catalog_key(catalog_dir: str) -> str:
    """A key of the catalog at ``catalog_dir`` as written now: its path and its manifest's
    time, so a rewritten catalog gets a new key (and caches of its crops are rebuilt)."""
    import hashlib

    path = os.path.abspath(catalog_dir)
    manifest = os.path.join(path, catalog.MANIFEST)
    stamp = os.stat(manifest).st_mtime_ns if os.path.exists(manifest) else 0
    return hashlib.sha1(f"{path}|{stamp}".encode()).hexdigest()[:16]


def decode_rows(batch: Mapping[str, Sequence[Any]]) -> dict[str, np.ndarray]:
    """Catalog rows (PNG bytes) -> cache rows (raw bytes; pure). A corrupt PNG names its colony."""
    images, masks, hs, ws = [], [], [], []
    for cid, img_png, mask_png in zip(batch["colony_id"], batch["image"], batch["mask"]):
        try:
            image, mask = catalog.decode_png(img_png), catalog.decode_png(mask_png) > 0
        except ValueError as exc:
            raise ValueError(f"colony {cid}: {exc}") from None
        if image.shape != mask.shape:
            raise ValueError(f"colony {cid}: crop {image.shape} and mask {mask.shape} differ")
        hs.append(image.shape[0])
        ws.append(image.shape[1])
        images.append(np.ascontiguousarray(image, np.uint8).tobytes())
        masks.append(np.packbits(mask).tobytes())
    return {"colony_id": np.asarray(batch["colony_id"], dtype=object),
            "label": np.asarray(batch["label"], dtype=object),
            "h": np.array(hs, np.int32), "w": np.array(ws, np.int32),
            "image": np.array(images, dtype=object), "mask": np.array(masks, dtype=object)}


class CropViews:
    """One process's zero-copy view of a :class:`CropCache` (numpy over the Arrow buffers)."""

    def __init__(self, tables: Sequence[Any]):
        self.ids: list[str] = []
        self.labels: dict[str, Any] = {}
        self._where: dict[str, tuple[int, int]] = {}
        self._blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for b, table in enumerate(t for t in tables if t.num_rows):  # an empty part's block has null columns
            ids = table.column("colony_id").to_pylist()
            self.ids.extend(ids)
            self.labels.update(zip(ids, table.column("label").to_pylist()))
            self._where.update((c, (b, r)) for r, c in enumerate(ids))
            self._blocks.append((table.column("h").to_numpy(), table.column("w").to_numpy(),
                                 *_binary(table.column("image")), *_binary(table.column("mask"))))

    def crop(self, colony_id: str) -> tuple[np.ndarray, np.ndarray]:
        """``(image uint8 (H, W), mask bool (H, W))`` of a colony (the image read-only)."""
        where = self._where.get(colony_id)
        if where is None:
            raise KeyError(f"colony {colony_id} is not in the crop cache")
        b, r = where
        h, w, img, img_off, msk, msk_off = self._blocks[b]
        hh, ww = int(h[r]), int(w[r])
        image = img[img_off[r]:img_off[r + 1]].reshape(hh, ww)
        mask = np.unpackbits(msk[msk_off[r]:msk_off[r + 1]], count=hh * ww).view(bool).reshape(hh, ww)
        return image, mask


def _binary(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """A (large) binary Arrow column as its data buffer and offsets, without copying."""
    import pyarrow as pa

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    width = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], width)[arr.offset:arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    return (np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)), offsets


def read_decode(batch: Mapping[str, Sequence[Any]]) -> dict[str, np.ndarray]:
    """``map_batches`` UDF of the ingest: each ``(path, group)`` row -> that Parquet row
    group's colonies, decoded (:func:`decode_rows`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path, group in zip(batch["path"], batch["group"]):
        with pq.ParquetFile(str(path)) as part:
            tables.append(part.read_row_group(int(group), columns=CATALOG_COLUMNS))
    return decode_rows(pa.concat_tables(tables).to_pydict())


def row_groups(catalog_dir: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The catalog's Parquet row groups as ``{"path", "group"}`` items, and its colony ids
    (read here, in this process: metadata and one small column)."""
    import pyarrow.parquet as pq

    items, ids = [], []
    for path in sorted(Path(catalog_dir, "parts").glob("*.parquet")):
        with pq.ParquetFile(str(path)) as part:
            items.extend({"path": str(path), "group": g} for g in range(part.metadata.num_row_groups))
            ids.extend(part.read(columns=["colony_id"]).column("colony_id").to_pylist())
    return items, ids


def read_crops(catalog_dir: str, threads: int | None = None) -> CropViews:
    """Every crop of the catalog at ``catalog_dir``, decoded into this process's memory
    (a row group per task, on up to ``threads`` threads: Parquet reads and PNG decodes let go
    of the GIL): the in-process engine's crop cache."""
    import concurrent.futures

    import pyarrow as pa

    catalog.read_manifest(catalog_dir)  # refuse an unfinished catalog with a clear message
    items, _ = row_groups(catalog_dir)
    if not items:
        raise ValueError(f"the catalog at {catalog_dir} has no colonies")

    def group(item: dict[str, Any]) -> Any:
        return pa.table(read_decode({"path": [item["path"]], "group": [item["group"]]}))

    threads = max(1, min(threads or os.cpu_count() or 1, len(items)))
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="ipb-decode") as pool:
        return CropViews(list(pool.map(group, items)))


def cut_plan(batch: Mapping[str, np.ndarray], spec: StreamSpec, epoch: int, crops: CropViews) -> dict[str, np.ndarray]:
    """Plan rows -> patch rows, in the plan's order (pure given ``crops``)."""
    index = {n: i for i, n in enumerate(spec.class_names)}
    rows: dict[str, list[Any]] = {k: [] for k in spec.columns()}
    for cid, copy, fixed, x, y, scale in zip(batch["colony_id"], batch["copy"], batch["fixed"], batch["x"],
                                             batch["y"], batch["scale"]):
        image, mask = crops.crop(cid)
        image, mask, sc = prepare_crop(image, mask, spec.geometry.size, scale=float(scale) if fixed else None,
                                       whole=spec.geometry.whole)
        label = crops.labels[cid]
        emit_patch(rows, image, mask, sc, cid, index.get(label, -1) if label is not None else -1,
                   int(copy), (int(x), int(y), float(scale)) if fixed else None, spec, epoch)
    return finish_rows(rows, spec)


def unpack_plan(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Rows of :func:`plan_source` (each a list per column) -> one plan's columns."""
    return {k: np.concatenate([np.asarray(v) for v in batch[k]]) if len(batch[k]) else np.zeros(0)
            for k in plans.PLAN_COLUMNS}
