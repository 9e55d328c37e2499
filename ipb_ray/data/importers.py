"""Importers: turn a user's data into catalog shards (plain functions, no Ray).

Every importer has two halves:

* a *planner* that runs on the driver, lists the inputs, validates the annotation
  table and returns :class:`ShardTask` s plus rejects for inputs it can already tell
  are bad (missing frame file, unknown class, box outside the frame);
* a *shard runner* (:func:`run_shard`) that runs on a Ray worker: it reads the
  images of one shard, segments them, joins the annotations and returns rows.

Four kinds of input give the same catalog:

``frames``      raw frames + an annotation table (CSV or Parquet; columns below)
``synth``       the synthetic world written by ``ipb synth`` (frames + its annotations.csv)
``imagefolder`` already-cropped colonies in ``<root>/<class>/*.png``, plus
                ``multi_label/`` (optionally ``multi_label/<A+B>/``) and ``unlabeled/``
``voc``         Pascal VOC: ``JPEGImages/`` + ``Annotations/*.xml`` boxes; each box is a
                single-label colony, an image holding several classes a multi-label one

Annotation table columns: ``frame`` (path: absolute, or relative to the table's folder or
to the frames folder ``data.frames``, the first that has the file),
a box ``x0,y0,x1,y1`` (px, exclusive ends) or a point ``x,y``, and ``label`` or
``labels`` (``;``-separated; several labels make a multi-label colony). Optional
``frame_index`` (or ``time``). Rows naming the same frame and box merge their labels.
Any other column (``well``, ``sequence``, ``track``...) is kept with the colony it names,
in ``provenance["annotation"]``, for ``split.group_by=column:<name>``; a column with one
value on every row of a frame is the frame's and goes to all of its colonies, also the
ones no row names (the first row wins where rows of one colony disagree).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import math
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ipb_ray.data import catalog
from ipb_ray.config import DataConfig, SegmentationConfig

__all__ = [
    "ANNOTATION_FIELDS", "CROPS_PER_SHARD", "IMAGE_SUFFIXES", "IMPORTERS", "MIN_MATCH_IOU", "Plan",
    "ShardTask", "crop_mask", "detect_importer", "frames_dir", "plan", "plan_frames", "plan_imagefolder",
    "plan_synth", "plan_voc", "point_box", "read_annotation_table", "run_shard",
]

log = logging.getLogger(__name__)

#: Files listed as frames; an ND2 file (``stacks.ND2_SUFFIX``) is always a stack of frames.
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".nd2")
IMPORTERS = ("auto", "frames", "synth", "imagefolder", "voc")
#: An annotation box joins the segmented colony it overlaps with at least this box IoU
#: (else the colony whose mask holds the box centre).
MIN_MATCH_IOU = 0.5
CROPS_PER_SHARD = 128
MULTI_DIR, UNLABELLED_DIRS = "multi_label", ("unlabeled", "unlabelled")
#: Annotation table columns the frames importer reads itself; any other is kept as is.
ANNOTATION_FIELDS = ("frame", "x0", "y0", "x1", "y1", "x", "y", "label", "labels", "frame_index", "time")


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: its key hashes every input, so a changed input is redone."""

    key: str
    importer: str
    items: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "ShardTask":
        d = json.loads(text)
        return ShardTask(d["key"], d["importer"], tuple(d["items"]))


@dataclass
class Plan:
    tasks: list[ShardTask]
    rejects: list[dict[str, str]]
    importer: str
    inputs: str
    #: What the user should know about the inputs (a stack's own pixel size, say).
    notes: list[str] = field(default_factory=list)


def _file_stamp(path: Path) -> str:
    try:
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def _key(importer: str, payload: Any, seg: SegmentationConfig) -> str:
    text = json.dumps([importer, payload, dataclasses.asdict(seg)], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (ND2 files among them), and OME-Zarr folders (not looked
    into: their chunks are no frames)."""
    from ipb_ray.data.stacks import ZARR_SUFFIX

    zarrs = sorted(p for p in root.rglob(f"*{ZARR_SUFFIX}") if p.is_dir())
    inside = tuple(zarrs)
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and not any(z in p.parents for z in inside)]
    return sorted(files + [z for z in zarrs if not any(o in z.parents for o in inside)])


def detect_importer(frames: str | None, annotations: str | None) -> str:
    """Guess the importer from the input layout (see the module docstring)."""
    if frames is None and annotations is None:
        raise ValueError("no input: set data.frames (a folder of frames or crops) and/or "
                         "data.annotations (an annotation table)")
    root = Path(frames) if frames else Path(annotations).parent  # type: ignore[arg-type]
    if (root / "world.json").exists():
        return "synth"
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        return "voc"
    if annotations:
        return "frames"
    if root.is_dir() and root.suffix.lower() != ".zarr" \
            and not any(p.suffix.lower() in (*IMAGE_SUFFIXES, ".zarr") for p in root.iterdir()) \
            and any(p.is_dir() for p in root.iterdir()):
        return "imagefolder"
    return "frames"


# --------------------------------------------------------------------------- frames + table

def read_annotation_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV or Parquet annotation table, checked for the needed columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation table {path} not found; set data.annotations to a CSV "
                                "or Parquet file with columns frame, x0,y0,x1,y1 (or x,y), label")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
        columns = set(rows[0]) if rows else set()
    else:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's byte-order mark
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    missing = []
    if "frame" not in columns:
        missing.append("frame")
    if not ({"x0", "y0", "x1", "y1"} <= columns or {"x", "y"} <= columns):
        missing.append("x0,y0,x1,y1 (or x,y)")
    if not ({"label", "labels"} & columns):
        missing.append("label (or labels)")
    if missing:
        raise ValueError(f"annotation table {path} lacks column(s) {', '.join(missing)}; "
                         f"it has {', '.join(sorted(columns)) or 'none'}")
    return rows


def _num(row: dict[str, Any], key: str) -> float | None:
    """A numeric cell, None when empty; ValueError naming the column for text, NaN or inf."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{key}={value!r} is not a finite number")
    return number


def _same_place(ann: dict[str, Any]) -> tuple[Any, ...]:
    return ("box", *ann["box"]) if "box" in ann else ("point", *ann["point"])


def _row_labels(row: dict[str, Any]) -> list[str]:
    raw = row.get("labels")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raw = row.get("label")
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        return [str(x).strip() for x in raw if str(x).strip()]
    return [s.strip() for s in str(raw).replace("+", ";").split(";") if s.strip()]


def plan_frames(frames: str | None, annotations: str | None, data: DataConfig,
                importer: str = "frames", keep_columns: bool = True) -> Plan:
    """Shard per frame: every frame in ``frames`` plus every frame the table names.

    ``keep_columns``: keep the table's extra columns with the colonies (module docstring)."""
    rejects: list[dict[str, str]] = []
    known = set(data.class_names)
    per_frame: dict[Path, list[dict[str, Any]]] = {}
    frame_index: dict[Path, int | None] = {}
    ann_time: dict[int, int] = {}  # id(row) -> its frame_index: picks the plane of a stack
    base = Path(annotations).parent if annotations else Path(frames or ".")
    # Relative table paths resolve against the table's folder, then the frames folder.
    roots = [(base, "the table's folder")]
    frames_root = frames_dir(frames)
    if frames_root is not None and frames_root.resolve() != base.resolve():
        roots.append((frames_root, "data.frames"))
    if frames:
        root = Path(frames)
        if root.is_dir() and root.suffix.lower() == ".zarr":  # one OME-Zarr image
            listed = [root]
        elif root.is_dir():
            listed = _list_images(root)
        else:
            listed = sorted(Path(p) for p in glob.glob(frames))
        if not listed and not annotations:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}, or .zarr folders) found under {frames}")
        for p in listed:
            per_frame.setdefault(p.resolve(), [])
    if annotations:
        placed: dict[tuple[Any, ...], dict[str, Any]] = {}  # (frame, box or point) -> its first row
        for i, row in enumerate(read_annotation_table(annotations), start=2):
            where = f"{annotations} row {i}"
            name = row.get("frame")
            if name is None or not str(name).strip():
                rejects.append(catalog.reject_row(str(annotations), where, "no frame name", importer))
                continue
            frame, looked = _find_frame(str(name), roots)
            labels = _row_labels(row)
            unknown = [n for n in labels if known and n not in known]
            if unknown:
                rejects.append(catalog.reject_row(str(frame), where, f"unknown class {unknown[0]!r}; "
                                                  f"known: {', '.join(sorted(known))}", importer))
                continue
            if not _is_frame(frame):
                rejects.append(catalog.reject_row(str(frame), where, f"frame file not found: {looked}",
                                                  importer))
                continue
            try:
                box = [_num(row, k) for k in ("x0", "y0", "x1", "y1")]
                point = [_num(row, k) for k in ("x", "y")]
                t = _num(row, "frame_index") if "frame_index" in row else _num(row, "time")
            except ValueError as exc:
                rejects.append(catalog.reject_row(str(frame), where, f"bad coordinate: {exc}", importer))
                continue
            ann: dict[str, Any] = {"row": where, "labels": labels}
            kept = {k: str(v).strip() for k, v in row.items()
                    if k not in ANNOTATION_FIELDS and k is not None and v is not None and str(v).strip()}
            if kept and keep_columns:  # only then, so tables without extra columns keep their shard keys
                ann["columns"] = kept
            if all(v is not None for v in box):
                if box[2] <= box[0] or box[3] <= box[1]:  # type: ignore[operator]
                    rejects.append(catalog.reject_row(str(frame), where, f"empty box {box}", importer))
                    continue
                ann["box"] = [int(round(v)) for v in box]  # type: ignore[arg-type]
            elif all(v is not None for v in point):
                ann["point"] = [int(round(v)) for v in point]  # type: ignore[arg-type]
            else:
                rejects.append(catalog.reject_row(str(frame), where, "no box or point", importer))
                continue
            # a stack holds one frame per time point and position: the same box there is another colony
            place = (frame, t, kept.get("position", kept.get("well")), *_same_place(ann))
            first = placed.get(place)
            if first is not None:
                _duplicate(first, ann, frame, rejects, importer)
                continue
            placed[place] = ann
            per_frame.setdefault(frame, []).append(ann)
            if t is not None:
                frame_index[frame] = int(t)
                ann_time[id(ann)] = int(t)
        for frame in per_frame:  # drop the rows a conflicting duplicate took back
            per_frame[frame] = [a for a in per_frame[frame] if not a.get("conflict")]
    tasks = []
    notes: list[str] = []
    for frame, anns in sorted(per_frame.items()):
        display = _display(frame, base)
        items = _stack_items(frame, display, anns, ann_time, data, importer, rejects, notes)
        if items is None:  # one frame in one file
            items = [{"path": str(frame), "source": display, "annotations": anns,
                      "frame_index": frame_index.get(frame), "stamp": _file_stamp(frame)}]
        for item in items:
            if data.point_box:  # in the shard key only when set, so other catalogs keep theirs
                item["point_box"] = int(data.point_box)
            tasks.append(ShardTask(_key(importer, item, data.segmentation), importer, (item,)))
    return Plan(tasks, rejects, importer, str(frames or annotations), notes)


def _stack_items(frame: Path, display: str, anns: list[dict[str, Any]], ann_time: dict[int, int],
                 data: DataConfig, importer: str, rejects: list[dict[str, str]], notes: list[str]
                 ) -> list[dict[str, Any]] | None:
    """A stack file (:mod:`ipb_ray.data.stacks`) as one item per plane, or None for a file
    holding one frame. Each plane's item carries its time index, its position (the frame's
    ``position`` and ``well`` columns: the OME image name, or the file's name when it holds
    one position) and the pixel size of the metadata. An annotation row names its plane by
    ``frame_index`` (or ``time``) and, in a file of several positions, ``position`` (or
    ``well``); a row that names no plane of the stack is rejected."""
    from ipb_ray.data.stacks import StackError, list_planes

    try:
        stack = list_planes(frame, data.channel, data.z_plane)
    except StackError as exc:
        rejects.append(catalog.reject_row(str(frame), "file", str(exc), importer))
        for ann in anns:
            rejects.append(catalog.reject_row(str(frame), ann["row"], "its stack cannot be read (see the row "
                                              "'file' of this frame)", importer))
        return []
    if stack is None:
        return None
    npos = stack.positions
    size = stack.pixel_size_um
    if size is not None and not math.isclose(size, data.pixel_size_um, rel_tol=1e-3):
        note = (f"{display}: its metadata gives {size:g} µm per pixel; that is used for its colonies instead of "
                f"data.pixel_size_um={data.pixel_size_um:g}")
        if note not in notes:
            notes.append(note)
    by_plane: dict[tuple[int, str], list[dict[str, Any]]] = {}
    planes = {(p.t, p.position): p for p in stack.planes}
    times = sorted({p.t for p in stack.planes})
    for ann in anns:
        t = ann_time.get(id(ann))
        cols = ann.get("columns", {})
        pos = cols.get("position", cols.get("well")) if npos > 1 else stack.planes[0].position
        if t is None and len(times) > 1:
            why = f"names a stack of {len(times)} time points; add a frame_index column (0..{times[-1]})"
        elif (t if t is not None else times[0], pos) not in planes:
            known = sorted({p.position for p in stack.planes})
            why = (f"names plane t={t} position {pos!r}, which the stack does not hold (t 0..{times[-1]}"
                   + (f", positions {', '.join(known)} in a position column)" if npos > 1 else ")"))
        else:
            by_plane.setdefault((t if t is not None else times[0], pos), []).append(ann)
            continue
        rejects.append(catalog.reject_row(str(frame), ann["row"], why, importer))
    stamp = _file_stamp(frame) if frame.is_file() else _tree_stamp(frame)
    items = []
    for p in stack.planes:
        well = p.position if npos > 1 else frame.name.split(".")[0]
        item: dict[str, Any] = {"path": str(frame), "source": display + p.label(npos),
                                "annotations": by_plane.get((p.t, p.position), []), "frame_index": p.t,
                                "stamp": stamp, "plane": p.to_dict(),
                                "columns": {"position": p.position, "well": well}}
        if size is not None:
            item["pixel_size_um"] = size
        items.append(item)
    return items


def _tree_stamp(folder: Path) -> str:
    """A folder's stamp (an OME-Zarr): its metadata files' stamps and its file count."""
    meta = [_file_stamp(folder / n) for n in ("zarr.json", ".zattrs", ".zgroup")]
    return f"{'|'.join(meta)}:{sum(1 for _ in folder.rglob('*'))}"


def _duplicate(first: dict[str, Any], ann: dict[str, Any], frame: Path, rejects: list[dict[str, str]],
               importer: str) -> None:
    """A second row on the same box or point: the same labels are a harmless repeat (the
    second row is rejected as such); other labels make the colony's label unknown, so both
    rows are rejected, with the way to write a multi-label colony (one row, ``A;B``)."""
    where = ann["row"]
    if sorted(first["labels"]) == sorted(ann["labels"]) and not first.get("conflict"):
        rejects.append(catalog.reject_row(str(frame), where, f"duplicate of {first['row']} (same box, same "
                                          "label); kept once", importer))
        return
    def reason(other: dict[str, Any], here: dict[str, Any]) -> str:
        return (f"same box as {other['row']} with another label ({';'.join(here['labels'])} here, "
                f"{';'.join(other['labels'])} there): both rows left out; for a colony with several "
                "labels write one row with labels 'A;B'")

    if not first.get("conflict"):
        first["conflict"] = True
        rejects.append(catalog.reject_row(str(frame), first["row"], reason(ann, first), importer))
    rejects.append(catalog.reject_row(str(frame), where, reason(first, ann), importer))


def frames_dir(frames: str | None) -> Path | None:
    """The folder of ``data.frames``: itself, or the part of a glob before its first wildcard."""
    if not frames:
        return None
    path = Path(frames)
    if path.is_dir():
        return path
    if not glob.has_magic(frames):
        return path.parent  # a single frame file
    parts = []
    for part in path.parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _find_frame(name: str, roots: Sequence[tuple[Path, str]]) -> tuple[Path, str]:
    """The resolved frame path (the first root that has it) and, for a reject, where it looked."""
    frame = Path(name)
    if frame.is_absolute():
        return frame.resolve(), f"{frame} does not exist"
    candidates = [(root / frame).resolve() for root, _ in roots]
    for path in candidates:
        if _is_frame(path):
            return path, ""
    places = " and ".join(f"{root.resolve()} ({what})" for root, what in roots)
    return candidates[0], (f"looked for {name!r} in {places}; fix the frame column or point "
                           "data.frames at the folder that holds the frames")


def _is_frame(path: Path) -> bool:
    """A file, or an OME-Zarr folder."""
    return path.is_file() or (path.suffix.lower() == ".zarr" and path.is_dir())


def _display(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base.resolve()))
    except ValueError:
        return str(path)


def plan_synth(world: str, data: DataConfig) -> Plan:
    """The synthetic world is frames + annotations.csv (boxes and label sets)."""
    root = Path(world)
    if not (root / "world.json").exists():
        raise FileNotFoundError(f"{root} is not a synthetic world (no world.json); "
                                "write one with `ipb synth --out DIR`")
    # Its extra columns (instance, mask, area_px...) are the generator's ground truth, not names to group by
    return plan_frames(str(root / "frames"), str(root / "annotations.csv"), data, importer="synth",
                       keep_columns=False)


def _match(colonies: Sequence[Any], ann: dict[str, Any]) -> int | None:
    """Index of the segmented colony an annotation refers to, or None."""
    from ipb_ray.data.segmentation import box_iou_matrix

    if not colonies:
        return None
    if "point" in ann:
        x, y = ann["point"]
        candidates = [(x, y)]
    else:
        x0, y0, x1, y1 = ann["box"]
        boxes = np.array([c.bbox for c in colonies], dtype=np.float64)
        ious = box_iou_matrix(np.array([ann["box"]], dtype=np.float64), boxes)[0]
        best = int(np.argmax(ious))
        if ious[best] >= MIN_MATCH_IOU:
            return best
        candidates = [((x0 + x1) // 2, (y0 + y1) // 2)]
    for px, py in candidates:
        for i, c in enumerate(colonies):
            cx0, cy0, cx1, cy1 = c.bbox
            if cx0 <= px < cx1 and cy0 <= py < cy1 and c.mask[py - cy0, px - cx0]:
                return i
    return None


def _run_frame(item: dict[str, Any], data: DataConfig, importer: str
               ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    from ipb_ray.data.segmentation import load_frame, segment_frame

    src = item["source"]
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    try:
        image = load_frame(item["path"], item.get("plane"))
    except (ValueError, OSError) as exc:
        return [], [catalog.reject_row(src, "frame", f"unreadable frame: {exc}", importer)]
    if "pixel_size_um" in item:  # a stack's own metadata
        data = dataclasses.replace(data, pixel_size_um=float(item["pixel_size_um"]))
    if image.size == 0 or int(image.max()) == int(image.min()):
        return [], [catalog.reject_row(src, "frame", "empty frame (constant image)", importer)]
    side = int(item.get("point_box") or 0)
    if side:
        return _point_boxes(item, image, side, data, importer)
    _, colonies = segment_frame(image, data.segmentation)
    if not colonies:
        rejects.append(catalog.reject_row(src, "frame", "no colonies found", importer))
    h, w = image.shape
    labels: list[set[str]] = [set() for _ in colonies]
    anns = item["annotations"]
    shared = {k: v for k, v in (anns[0].get("columns", {}) if anns else {}).items()
              if all(a.get("columns", {}).get(k) == v for a in anns)}  # the frame's own columns
    shared = {**item.get("columns", {}), **shared}  # a stack plane's position and well
    columns: list[dict[str, str]] = [dict(shared) for _ in colonies]
    for ann in anns:
        coords = ann.get("box") or ann.get("point")
        if "box" in ann:
            x0, y0, x1, y1 = ann["box"]
            inside = 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        else:
            x, y = ann["point"]
            inside = 0 <= x < w and 0 <= y < h
        if not inside:
            rejects.append(catalog.reject_row(src, ann["row"], f"annotation {coords} lies outside the "
                                              f"{w}x{h} frame", importer))
            continue
        idx = _match(colonies, ann)
        if idx is None:
            rejects.append(catalog.reject_row(src, ann["row"], f"annotation {coords} matches no "
                                              "segmented colony", importer))
            continue
        labels[idx].update(ann["labels"])
        for k, v in ann.get("columns", {}).items():
            columns[idx].setdefault(k, v)
    for colony, names, extra in zip(colonies, labels, columns):
        x0, y0, x1, y1 = colony.bbox
        provenance: dict[str, Any] = {"frame_shape": [h, w], "segmentation": dataclasses.asdict(data.segmentation)}
        if extra:
            provenance[catalog.ANNOTATION_COLUMNS] = extra
        rows.append(catalog.colony_row(
            source=src, bbox=colony.bbox, crop=image[y0:y1, x0:x1], mask=colony.mask, labels=names,
            frame_index=item.get("frame_index"), pixel_size_um=data.pixel_size_um, importer=importer,
            provenance=provenance))
    return rows, rejects


def point_box(x: int, y: int, side: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The ``side`` x ``side`` box centred on point ``(x, y)`` (exclusive ends), or None
    when it does not fit inside a ``width`` x ``height`` frame."""
    x0, y0 = int(x) - side // 2, int(y) - side // 2
    if x0 < 0 or y0 < 0 or x0 + side > width or y0 + side > height:
        return None
    return x0, y0, x0 + side, y0 + side


def _point_boxes(item: dict[str, Any], image: np.ndarray, side: int, data: DataConfig, importer: str
                 ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """``data.point_box``: every point annotation of a frame becomes its own crop, a fixed
    box centred on the point (cells that touch cannot be segmented one by one); the whole
    box is the object's mask. Rows with a box keep it as their crop. Points of one frame
    at the same place merge their labels, as boxes do."""
    src = item["source"]
    h, w = image.shape
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    merged: dict[tuple[int, int, int, int], dict[str, Any]] = {}
    if not item["annotations"]:
        return [], [catalog.reject_row(src, "frame", f"no annotations: with data.point_box={side} only annotated "
                                       "points (or boxes) become crops", importer)]
    for ann in item["annotations"]:
        if "point" in ann:
            x, y = ann["point"]
            if not (0 <= x < w and 0 <= y < h):
                rejects.append(catalog.reject_row(src, ann["row"], f"point {[x, y]} lies outside the {w}x{h} frame",
                                                  importer))
                continue
            box = point_box(x, y, side, w, h)
            if box is None:
                rejects.append(catalog.reject_row(
                    src, ann["row"], f"point {[x, y]} is closer than {side // 2} px (half of data.point_box="
                    f"{side}) to the edge of the {w}x{h} frame; its box would leave the frame", importer))
                continue
        else:
            box = tuple(ann["box"])
            if not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
                rejects.append(catalog.reject_row(src, ann["row"], f"annotation {list(box)} lies outside the "
                                                  f"{w}x{h} frame", importer))
                continue
        entry = merged.setdefault(box, {"labels": set(), "columns": {}})
        entry["labels"].update(ann["labels"])
        for k, v in ann.get("columns", {}).items():
            entry["columns"].setdefault(k, v)
    for (x0, y0, x1, y1), entry in merged.items():
        provenance: dict[str, Any] = {"frame_shape": [h, w], "point_box": side}
        if entry["columns"]:
            provenance[catalog.ANNOTATION_COLUMNS] = entry["columns"]
        crop = image[y0:y1, x0:x1]
        rows.append(catalog.colony_row(
            source=src, bbox=(x0, y0, x1, y1), crop=crop, mask=np.ones(crop.shape, bool), labels=entry["labels"],
            frame_index=item.get("frame_index"), pixel_size_um=data.pixel_size_um, importer=importer,
            provenance=provenance))
    return rows, rejects


# --------------------------------------------------------------------------- crops (imagefolder, voc)

def crop_mask(crop: np.ndarray, seg: SegmentationConfig) -> np.ndarray:
    """Colony mask of an already-cropped colony: the largest segmented region.

    The size filter scales to the crop (a crop is mostly colony); if nothing is found
    the whole crop counts as colony rather than the colony being dropped.
    """
    from ipb_ray.data.segmentation import segment_frame

    small = dataclasses.replace(seg, min_object_px=min(seg.min_object_px, max(1, crop.size // 20)))
    _, colonies = segment_frame(crop, small)
    mask = np.zeros(crop.shape, dtype=bool)
    if not colonies:
        mask[:] = True
        return mask
    best = max(colonies, key=lambda c: c.area_px)
    x0, y0, x1, y1 = best.bbox
    mask[y0:y1, x0:x1] = best.mask
    return mask


def plan_imagefolder(root: str, data: DataConfig) -> Plan:
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder {base} not found")
    known = set(data.class_names)
    rejects: list[dict[str, str]] = []
    items: list[dict[str, Any]] = []
    for sub in sorted(p for p in base.iterdir() if p.is_dir()):
        files = _list_images(sub)
        for f in files:
            rel = f.relative_to(base)
            if sub.name == MULTI_DIR:
                combo = rel.parts[1] if len(rel.parts) > 2 else ""
                labels, multi = [s for s in combo.replace(";", "+").split("+") if s], True
                if not labels:
                    rejects.append(catalog.reject_row(str(rel), str(rel), f"a {MULTI_DIR}/ image needs a folder "
                                                      f"naming its classes, e.g. {MULTI_DIR}/A+B/{f.name}",
                                                      "imagefolder"))
                    continue
            elif sub.name.lower() in UNLABELLED_DIRS:
                labels, multi = [], False
            else:
                labels, multi = [sub.name], False
            bad = [n for n in labels if known and n not in known]
            if bad:
                rejects.append(catalog.reject_row(str(rel), str(rel), f"unknown class {bad[0]!r}; known: "
                                                  f"{', '.join(sorted(known))}", "imagefolder"))
                continue
            items.append({"path": str(f.resolve()), "source": str(rel), "labels": labels,
                          "multi_label": multi, "stamp": _file_stamp(f)})
    if not items and not rejects:
        raise FileNotFoundError(f"no images in class folders under {base}; expected "
                                f"{base}/<class>/*.png (plus {MULTI_DIR}/ and unlabeled/)")
    tasks = [ShardTask(_key("imagefolder", chunk, data.segmentation), "imagefolder", tuple(chunk))
             for chunk in (items[i:i + CROPS_PER_SHARD] for i in range(0, len(items), CROPS_PER_SHARD))]
    return Plan(tasks, rejects, "imagefolder", str(base))


def _run_crops(items: Iterable[dict[str, Any]], data: DataConfig, importer: str
               ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    from ipb_ray.data.segmentation import load_frame

    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    cache: dict[str, np.ndarray] = {}
    for item in items:
        src = item["source"]
        try:
            if item["path"] not in cache:
                cache = {item["path"]: load_frame(item["path"])}  # VOC boxes share an image
            image = cache[item["path"]]
        except (ValueError, OSError) as exc:
            rejects.append(catalog.reject_row(src, item.get("item", "image"), f"unreadable image: {exc}",
                                              importer))
            continue
        h, w = image.shape
        x0, y0, x1, y1 = item.get("box") or (0, 0, w, h)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 - x0 < 2 or y1 - y0 < 2:
            rejects.append(catalog.reject_row(src, item.get("item", "image"),
                                              f"box {item.get('box')} lies outside the {w}x{h} image",
                                              importer))
            continue
        crop = image[y0:y1, x0:x1]
        if int(crop.max()) == int(crop.min()):
            rejects.append(catalog.reject_row(src, item.get("item", "image"), "empty (constant) image",
                                              importer))
            continue
        rows.append(catalog.colony_row(
            source=src, bbox=(x0, y0, x1, y1), crop=crop, mask=crop_mask(crop, data.segmentation),
            labels=item["labels"], multi_label=item["multi_label"], pixel_size_um=data.pixel_size_um,
            importer=importer, item=item.get("item", ""),
            provenance={"mask": "segmented per crop"}))
    return rows, rejects


def plan_voc(root: str, data: DataConfig) -> Plan:
    """Pascal VOC: box crops are single-label colonies; images with several classes multi-label."""
    base = Path(root)
    ann_dir, img_dir = base / "Annotations", base / "JPEGImages"
    if not ann_dir.is_dir() or not img_dir.is_dir():
        raise FileNotFoundError(f"{base} is not a Pascal VOC folder: expected Annotations/ and JPEGImages/")
    known = set(data.class_names)
    rejects: list[dict[str, str]] = []
    tasks: list[ShardTask] = []
    for xml_path in sorted(ann_dir.glob("*.xml")):
        rel_xml = str(xml_path.relative_to(base))
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as exc:
            rejects.append(catalog.reject_row(rel_xml, "xml", f"unreadable annotation: {exc}", "voc"))
            continue
        filename = (tree.findtext("filename") or f"{xml_path.stem}.jpg").strip()
        image = img_dir / filename
        if not image.is_file():
            image = img_dir / f"{xml_path.stem}.jpg"
        if not image.is_file():
            rejects.append(catalog.reject_row(rel_xml, filename, "image file not found", "voc"))
            continue
        src = str(image.relative_to(base))
        items: list[dict[str, Any]] = []
        for n, obj in enumerate(tree.iter("object")):
            name = (obj.findtext("name") or "").strip()
            where = f"{rel_xml} object {n}"
            if not name or (known and name not in known):
                rejects.append(catalog.reject_row(src, where, f"unknown class {name!r}" +
                                                  (f"; known: {', '.join(sorted(known))}" if known else ""),
                                                  "voc"))
                continue
            try:
                box = [int(round(float(obj.findtext(f"bndbox/{k}") or "nan")))
                       for k in ("xmin", "ymin", "xmax", "ymax")]
            except ValueError:
                rejects.append(catalog.reject_row(src, where, "box without numeric xmin/ymin/xmax/ymax",
                                                  "voc"))
                continue
            items.append({"path": str(image.resolve()), "source": src, "labels": [name],
                          "multi_label": False, "box": box, "item": f"object {n}"})
        classes = sorted({it["labels"][0] for it in items})
        if len(classes) > 1:
            items.append({"path": str(image.resolve()), "source": src, "labels": classes,
                          "multi_label": True, "item": "whole image"})
        if items:
            payload = [items, _file_stamp(image), _file_stamp(xml_path)]
            tasks.append(ShardTask(_key("voc", payload, data.segmentation), "voc", tuple(items)))
    return Plan(tasks, rejects, "voc", str(base))


# --------------------------------------------------------------------------- dispatch

def plan(data: DataConfig, importer: str = "auto") -> Plan:
    """The shards (and early rejects) for ``data.frames``/``data.annotations``."""
    if importer not in IMPORTERS:
        raise ValueError(f"unknown importer {importer!r}; choose one of {', '.join(IMPORTERS)}")
    if importer == "auto":
        importer = detect_importer(data.frames, data.annotations)
    root = data.frames or str(Path(data.annotations or ".").parent)
    if importer == "synth":
        return plan_synth(root, data)
    if importer == "voc":
        return plan_voc(root, data)
    if importer == "imagefolder":
        return plan_imagefolder(root, data)
    return plan_frames(data.frames, data.annotations, data)


def run_shard(task: ShardTask, data: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Rows and rejects of one shard (runs on a Ray worker; pure otherwise)."""
    if task.importer in ("frames", "synth"):
        return _run_frame(task.items[0], data, task.importer)
    return _run_crops(task.items, data, task.importer)
