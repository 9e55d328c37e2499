"""The colony catalog: one Parquet row per colony, written in restartable parts.

Layout of a catalog directory::

    catalog/
      parts/<shard>.parquet     colony rows of one shard (a frame, or a batch of crops)
      rejects/<shard>.parquet   what that shard skipped, with the reason
      catalog.json              manifest, written last: present = the catalog is complete
      folds.parquet, folds.json cross-validation folds (ipb_ray.folds)

A shard's part is written atomically (temporary file, then rename) and its rejects file
first, so an existing part means the shard is finished: a rerun skips it. The manifest
is removed when a build starts and written only when every shard is done, so a crashed
run never leaves a catalog that looks complete. Readers: :func:`read_catalog` (pyarrow)
or ``ray.data.read_parquet(catalog/parts)``.

Pure pyarrow/numpy/OpenCV; no Ray import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

CATALOG_VERSION = 1
MANIFEST = "catalog.json"
ROW_GROUP_SIZE = 256

#: One row per colony. ``image``/``mask`` are PNG bytes of the bounding-box crop
#: (8-bit grey; mask 0/255). ``label`` is null for multi-label and unlabelled colonies.
SCHEMA = pa.schema([
    pa.field("colony_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("frame_index", pa.int32()),
    pa.field("x0", pa.int32(), nullable=False),
    pa.field("y0", pa.int32(), nullable=False),
    pa.field("x1", pa.int32(), nullable=False),
    pa.field("y1", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("area_px", pa.int32(), nullable=False),
    pa.field("pixel_size_um", pa.float32()),
    pa.field("label", pa.string()),
    pa.field("labels", pa.list_(pa.string()), nullable=False),
    pa.field("multi_label", pa.bool_(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("mask", pa.binary(), nullable=False),
    pa.field("importer", pa.string(), nullable=False),
    pa.field("provenance", pa.string(), nullable=False),
])

REJECT_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("item", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("importer", pa.string(), nullable=False),
])


class IncompleteCatalogError(FileNotFoundError):
    """The catalog directory has no manifest: a build never finished there."""


# --------------------------------------------------------------------------- rows

def colony_id(source: str, bbox: Sequence[int], item: str = "") -> str:
    """Stable id: the same source, box and item give the same id on every run."""
    key = f"{source}|{','.join(str(int(v)) for v in bbox)}|{item}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a 2-D uint8 array (bool masks become 0/255)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise ValueError(f"cannot PNG-encode an array of shape {array.shape} and dtype {array.dtype}")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """(H, W) uint8 from PNG bytes written by :func:`encode_png`."""
    out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if out is None:
        raise ValueError("corrupt PNG bytes in the catalog")
    return out


def colony_row(*, source: str, bbox: Sequence[int], crop: np.ndarray, mask: np.ndarray,
               labels: Iterable[str] = (), multi_label: bool | None = None,
               frame_index: int | None = None, pixel_size_um: float | None = None,
               importer: str, provenance: Mapping[str, Any] | None = None,
               item: str = "") -> dict[str, Any]:
    """One catalog row. ``crop``: (h, w) uint8 grey; ``mask``: (h, w) bool, same shape.

    ``labels`` with one entry gives a single-label colony; several entries (or
    ``multi_label=True``) a multi-label one whose ``label`` is null; none, unlabelled.
    """
    x0, y0, x1, y1 = (int(v) for v in bbox)
    if crop.shape != mask.shape or crop.shape != (y1 - y0, x1 - x0):
        raise ValueError(f"{source}: crop {crop.shape}, mask {mask.shape} and bbox {tuple(bbox)} disagree")
    names = sorted(set(labels))
    multi = len(names) > 1 if multi_label is None else bool(multi_label)
    return {
        "colony_id": colony_id(source, bbox, item),
        "source": source,
        "frame_index": frame_index,
        "x0": x0, "y0": y0, "x1": x1, "y1": y1,
        "height": y1 - y0, "width": x1 - x0,
        "area_px": int(np.count_nonzero(mask)),
        "pixel_size_um": pixel_size_um,
        "label": names[0] if len(names) == 1 and not multi else None,
        "labels": names,
        "multi_label": multi,
        "image": encode_png(crop.astype(np.uint8, copy=False)),
        "mask": encode_png(mask.astype(bool, copy=False)),
        "importer": importer,
        "provenance": json.dumps(dict(provenance or {}), sort_keys=True),
    }


def reject_row(source: str, item: str, reason: str, importer: str) -> dict[str, str]:
    return {"source": source, "item": item, "reason": reason, "importer": importer}


# --------------------------------------------------------------------------- writing

def _atomic_write_table(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_done(root: str | Path, shard: str) -> bool:
    return (Path(root) / "parts" / f"{shard}.parquet").exists()


def write_shard(root: str | Path, shard: str, rows: Sequence[Mapping[str, Any]],
                rejects: Sequence[Mapping[str, str]]) -> None:
    """Write one shard's rows and rejects; the part file (written last) marks it done."""
    root = Path(root)
    _atomic_write_table(pa.Table.from_pylist(list(rejects), schema=REJECT_SCHEMA),
                        root / "rejects" / f"{shard}.parquet")
    _atomic_write_table(pa.Table.from_pylist(list(rows), schema=SCHEMA),
                        root / "parts" / f"{shard}.parquet")


def begin_build(root: str | Path, shards: Iterable[str]) -> list[str]:
    """Prepare ``root`` for a (re)build: invalidate the manifest, drop stale parts.

    Returns the shards still to do. A part whose shard is not in ``shards`` came from
    other inputs or parameters (the shard key hashes them) and is removed.
    """
    root = Path(root)
    wanted = list(dict.fromkeys(shards))
    (root / MANIFEST).unlink(missing_ok=True)
    for sub in ("parts", "rejects"):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        for f in folder.glob("*.parquet"):
            if f.stem not in set(wanted):
                log.info("removing stale %s/%s (inputs or parameters changed)", sub, f.name)
                f.unlink()
        for f in folder.glob(".*.tmp"):  # left by a crash mid-write
            f.unlink()
    return [s for s in wanted if not shard_done(root, s)]


def finish_build(root: str | Path, shards: Sequence[str], info: Mapping[str, Any]) -> dict[str, Any]:
    """Check every shard is written, then write the manifest (last). Returns it."""
    root = Path(root)
    missing = [s for s in shards if not shard_done(root, s)]
    if missing:
        raise RuntimeError(f"{root}: {len(missing)} shards unfinished (e.g. {missing[0]}); "
                           "rerun the same command to finish them")
    table = pq.read_table(root / "parts", columns=["colony_id", "label", "labels", "multi_label"],
                          schema=SCHEMA)
    rejects = pq.read_table(root / "rejects", schema=REJECT_SCHEMA)
    ids = table.column("colony_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{root}: duplicate colony ids; two inputs describe the same colony")
    counts = class_counts(table)
    digest = hashlib.sha1()
    for cid, label, labels in sorted(zip(ids, table.column("label").to_pylist(),
                                         table.column("labels").to_pylist())):
        digest.update(f"{cid}:{label}:{'+'.join(labels)};".encode())
    manifest = {
        "version": CATALOG_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "colonies": len(ids),
        "class_names": sorted({n for labels in table.column("labels").to_pylist() for n in labels}),
        "counts": counts,
        "rejects": rejects.num_rows,
        "shards": len(shards),
        "fingerprint": digest.hexdigest()[:16],
        **dict(info),
    }
    _atomic_write_text(json.dumps(manifest, indent=2, sort_keys=True), root / MANIFEST)
    return manifest


def class_counts(table: pa.Table) -> dict[str, int]:
    """Colonies per single label, plus ``multi_label`` and ``unlabelled`` counts."""
    counts: dict[str, int] = {}
    for label, multi in zip(table.column("label").to_pylist(), table.column("multi_label").to_pylist()):
        key = "multi_label" if multi else (label if label is not None else "unlabelled")
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- reading

def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise IncompleteCatalogError(
            f"{root} is not a finished colony catalog (no {MANIFEST}); run `ipb preprocess` "
            "(again) to build or finish it")
    return json.loads(path.read_text())


def read_catalog(root: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The whole catalog as one pyarrow Table (checks it is complete first)."""
    read_manifest(root)
    return pq.read_table(Path(root) / "parts", columns=list(columns) if columns else None, schema=SCHEMA)


def read_rejects(root: str | Path) -> pa.Table:
    return pq.read_table(Path(root) / "rejects", schema=REJECT_SCHEMA)
