"""The colony catalog: one Parquet row per colony, written in restartable parts.

Layout of a catalog directory::

    catalog/
      parts/<shard>.parquet     colony rows of one shard (a frame, or a batch of crops)
      rejects/<shard>.parquet   what that shard skipped, with the reason
      catalog.json              manifest, written last: present = the catalog is complete
      folds.parquet, folds.json cross-validation folds (ipb_ray.data.folds)

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
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "ANNOTATION_COLUMNS", "BUILD_RECORD", "CATALOG_VERSION", "CatalogExistsError", "IncompleteCatalogError",
    "MANIFEST", "REJECT_SCHEMA", "ROW_GROUP_SIZE", "SCHEMA", "STATS_SAMPLE", "TYPO_SHARE", "begin_build",
    "class_counts", "colony_groups", "colony_id", "colony_row", "decode_png", "encode_png", "finish_build",
    "label_warnings", "normalisation", "pixel_stats", "read_catalog", "read_manifest", "read_rejects",
    "reject_row", "shard_done", "write_shard",
]

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

#: Key of ``provenance`` under which the frames importer keeps the annotation table's own
#: columns (any beyond frame, box/point, label(s), frame_index/time) of a colony, e.g.
#: ``{"well": "B3", "track": "17"}``; ``split.group_by=column:well`` reads them.
ANNOTATION_COLUMNS = "annotation"

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


#: What a catalog was built from (importer, inputs, segmentation), written before its first
#: part, so a later command with other inputs can say what differs instead of deleting it.
BUILD_RECORD = "build.json"


class CatalogExistsError(FileExistsError):
    """``--out`` already holds a catalog of other inputs or parameters; nothing was changed."""


def _describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    if not old:
        return "it was built by an older version or another tool, so its inputs are unknown"
    keys = [k for k in ("importer", "inputs", "segmentation", "point_box") if k in old and old[k] != new.get(k)]
    if not keys:
        return "the same inputs, but the files in them or the import settings changed since"
    return "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys)


def begin_build(root: str | Path, shards: Iterable[str], record: Mapping[str, Any] | None = None,
                overwrite: bool = False) -> list[str]:
    """Prepare ``root`` for a (re)build and return the shards still to do.

    The same inputs and parameters again (a rerun after a crash or Ctrl-C) keep every
    finished part. Parts of *other* inputs or parameters (the shard key hashes them) are
    user data: without ``overwrite`` nothing is touched and :class:`CatalogExistsError`
    says what differs; with it they are removed. ``record`` (importer, inputs,
    segmentation) is stored as :data:`BUILD_RECORD` for that message.
    """
    root = Path(root)
    wanted = list(dict.fromkeys(shards))
    keep = set(wanted)
    stale = [f for sub in ("parts", "rejects") if (root / sub).is_dir()
             for f in (root / sub).glob("*.parquet") if f.stem not in keep]
    if stale and not overwrite:
        finished = (root / MANIFEST).exists()
        manifest = _read_json(root / MANIFEST)
        old = _read_json(root / BUILD_RECORD) or manifest
        size = f"a catalog of {manifest['colonies']} colonies" if "colonies" in manifest else \
            ("a finished catalog" if finished else "an unfinished catalog build")
        raise CatalogExistsError(
            f"{root} already holds {size} from other inputs or settings "
            f"({_describe_difference(old, record or {})}). Nothing was changed. To replace it, "
            "rerun with --overwrite; to keep it, choose another --out (data.catalog).")
    if record is not None:
        _atomic_write_text(json.dumps(dict(record), indent=1, sort_keys=True, default=str), root / BUILD_RECORD)
    (root / MANIFEST).unlink(missing_ok=True)
    for sub in ("parts", "rejects"):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        for f in folder.glob(".*.tmp"):  # left by a crash mid-write
            f.unlink()
    for f in stale:
        log.warning("--overwrite: removing %s/%s (other inputs or parameters)", f.parent.name, f.name)
        f.unlink()
    return [s for s in wanted if not shard_done(root, s)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


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
    mean, std = pixel_stats(root)
    manifest = {
        "version": CATALOG_VERSION,
        "pixel_mean": mean,
        "pixel_std": std,
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


#: A class this much smaller than a class whose name is one edit away ("Sprad": 3 beside
#: "Spread": 120) is probably a typo; two real classes one letter apart ("microcyte",
#: "macrocyte") are usually of a size.
TYPO_SHARE = 0.1


def _name_key(name: str) -> str:
    return re.sub(r"[\s_\-.]+", "", name.lower())


def _one_edit_apart(a: str, b: str) -> bool:
    """True when one insertion, deletion or substitution turns ``a`` into ``b``."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = next((k for k in range(len(a)) if a[k] != b[k]), len(a))
    return a[i + (len(a) == len(b)):] == b[i + 1:]


def label_warnings(counts: Mapping[str, int], folds: int) -> list[str]:
    """What a user should look at in a new catalog's labels (``counts``: :func:`class_counts`):
    two names for one class (the same but for case and separators, or one edit apart with
    one class under :data:`TYPO_SHARE` of the other), and classes with fewer
    single-labelled colonies than ``folds`` (some test folds then hold none of them)."""
    names = [n for n in counts if n not in ("multi_label", "unlabelled")]
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ka, kb = _name_key(a), _name_key(b)
            small, big = sorted((counts[a], counts[b]))
            if ka == kb or (_one_edit_apart(ka, kb) and small <= TYPO_SHARE * big):
                out.append(f"classes {a!r} ({counts[a]} colonies) and {b!r} ({counts[b]}) look like one class "
                           "spelt two ways; if so, rename the folder or label and rerun with --overwrite")
    for n in names:
        if counts[n] < folds:
            out.append(f"class {n!r} has {counts[n]} labelled colonies, fewer than split.folds={folds}: some test "
                       "folds hold none of it and its TPR there is undefined; label more or lower split.folds")
    return out


#: Crops whose pixels estimate a catalog's mean and std (a seeded sample; enough for two
#: numbers, cheap on a catalog of any size).
STATS_SAMPLE = 512


def pixel_stats(root: str | Path, sample: int = STATS_SAMPLE, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of the pixels of a catalog's crops, in [0, 1] units
    (uint8 / 255), over a seeded sample of at most ``sample`` crops, every pixel of a crop
    counted (patches hold background as well as colony). Label-free: no label is read."""
    table = pq.read_table(Path(root) / "parts", columns=["colony_id", "image"], schema=SCHEMA)
    n = table.num_rows
    if n == 0:
        return 0.0, 1.0
    ids = np.asarray(table.column("colony_id").to_pylist(), dtype=object)
    order = np.argsort(ids, kind="stable")  # the sample does not depend on the shard order
    pick = np.sort(np.random.default_rng(seed).permutation(n)[:sample])
    total = total_sq = count = 0.0
    images = table.column("image")
    for i in order[pick]:
        a = decode_png(images[int(i)].as_py()).astype(np.float64) / 255.0
        total += float(a.sum())
        total_sq += float(np.square(a).sum())
        count += a.size
    mean = total / count
    std = max(float(np.sqrt(max(total_sq / count - mean * mean, 0.0))), 1e-3)
    return round(mean, 6), round(std, 6)


def normalisation(root: str | Path) -> tuple[float, float]:
    """``(pixel_mean, pixel_std)`` of a catalog: from its manifest, or (a catalog built
    before they were recorded) computed now and added to the manifest."""
    manifest = read_manifest(root)
    if "pixel_mean" not in manifest or "pixel_std" not in manifest:
        mean, std = pixel_stats(root)
        manifest.update(pixel_mean=mean, pixel_std=std)
        try:
            _atomic_write_text(json.dumps(manifest, indent=2, sort_keys=True), Path(root) / MANIFEST)
        except OSError:  # a read-only catalog: use the numbers without recording them
            pass
    return float(manifest["pixel_mean"]), float(manifest["pixel_std"])


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


def colony_groups(table: pa.Table, group_by: str, catalog: str = "the catalog") -> list[str | None]:
    """Group name of every row of ``table`` (catalog rows), per ``split.group_by``.

    ``column:<name>``: the value of the catalog column ``<name>`` (e.g. ``source``: one
    group per frame), else of the annotation-table column ``<name>`` kept in
    ``provenance`` (see :data:`ANNOTATION_COLUMNS`); a colony without a value is a group
    of its own. ``regex:<pattern>``: the pattern's one capture group, searched in the
    colony's ``source`` path; every source must match. ``table`` needs ``source`` and
    ``provenance`` (and the named column, if it is a catalog column). Raises
    :class:`~ipb_ray.config.ConfigError` (key ``split.group_by``) naming ``catalog``, the
    column or the pattern, and the fix.
    """
    from ipb_ray.params import ConfigError

    kind, _, arg = group_by.partition(":")
    key = "split.group_by"
    if kind == "regex":
        pattern = re.compile(arg)
        if pattern.groups != 1:
            raise ConfigError(f"regex '{arg}' has {pattern.groups} capture groups; it needs exactly one",
                              key=key, source=catalog)
        sources = table.column("source").to_pylist()
        found = [pattern.search(src) for src in sources]
        names = [m.group(1) if m and m.group(1) else None for m in found]
        misses = [src for src, name in zip(sources, names) if name is None]
        if misses:
            raise ConfigError(f"regex '{arg}' finds no group name in the source path of {len(misses)} of "
                              f"{len(sources)} colonies, e.g. {misses[0]!r}; change the pattern so that its "
                              "(...) group matches a non-empty part of every source path", key=key,
                              source=catalog)
        return names
    if kind != "column" or not arg:
        raise ConfigError(f"{group_by!r} is not a grouping; write column:<name> or regex:<pattern>",
                          key=key, source=catalog)
    if arg in SCHEMA.names and arg in table.column_names:
        values = table.column(arg).to_pylist()
    else:
        extras = [json.loads(p).get(ANNOTATION_COLUMNS, {}) for p in table.column("provenance").to_pylist()]
        values = [e.get(arg) for e in extras]
        if all(v is None for v in values):
            kept = sorted({c for e in extras for c in e})
            shown = [n for n in SCHEMA.names if n not in ("image", "mask", "provenance", "labels")]
            raise ConfigError(
                f"no column {arg!r} in {catalog}: its catalog columns are {', '.join(shown)} and the "
                f"annotation columns it kept are {', '.join(kept) or 'none'}; name one of them, or add a "
                f"{arg!r} column to the annotation table (data.annotations) and rerun `ipb preprocess`",
                key=key, source=catalog)
    names = [None if v is None or str(v).strip() == "" else str(v) for v in values]
    missing = sum(v is None for v in names)
    if missing:
        log.warning("%s: %d of %d colonies have no %r; each is a group of its own (split.group_by=%s)",
                    catalog, missing, len(names), arg, group_by)
    return names


def read_rejects(root: str | Path) -> pa.Table:
    return pq.read_table(Path(root) / "rejects", schema=REJECT_SCHEMA)
