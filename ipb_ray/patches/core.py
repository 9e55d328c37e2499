"""The patch core: catalog rows -> fixed-shape patch rows, the same on every path.

:func:`patch_batch` turns a batch of catalog rows into patches: for each colony (repeated
``counts[id]`` times) it draws a window inside the colony mask, augments it and cuts the
network's scales, emitting fixed-shape columns (colonies vary in size, so
variable-shape tensors never reach a data pipeline). Every random choice is seeded by
``(seed, epoch, stream, colony id, copy)`` (:func:`colony_rng`), so a patch is the same
whichever worker draws it, an epoch's draw is reproducible, and each epoch draws fresh
positions. :func:`emit_patch` cuts one copy; the crop-cache streams
(:mod:`ipb_ray.distributed.epoch_stream`), the catalog streams
(:mod:`ipb_ray.distributed.streams`), ``ipb predict`` and ``ipb export`` all cut with it.

Columns of a patch batch: ``colony_id`` (str), ``label`` (int64 class index, -1 = none),
``copy`` (int32), ``x``, ``y`` (int32 window top-left in the prepared crop), ``scale``
(float32 crop resize factor), ``met`` (bool: the foreground constraint held), and one
float32 ``(B, 1, s, s)`` column per scale: ``x{s}`` (modes train/plain/test/label) or
``weak{s}`` and ``strong{s}`` (mode uda). numpy and OpenCV; no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ipb_ray.data import catalog
from ipb_ray.patches import augment
from ipb_ray.patches.geometry import PatchCoord, PatchGeometry, centre_coord, cut, prepare_crop, sample_coord, \
    to_scales

__all__ = ["CATALOG_COLUMNS", "MODES", "SHUFFLED_MODES", "StreamSpec", "batch_order", "colony_rng", "emit_patch", "finish_rows", "hash_id", "patch_batch", "revisit_coords"]

MODES = ("train", "plain", "uda", "test", "label")
_STREAM_TAG = {"train": 1, "plain": 2, "uda": 3, "test": 4, "label": 5}
CATALOG_COLUMNS = ["colony_id", "image", "mask", "label"]


@dataclass(frozen=True)
class StreamSpec:
    """What a stream emits. ``mode``: ``train`` (random window + the paper's augmentation),
    ``plain`` (random window, no augmentation), ``uda`` (random window, weak and strong
    views), ``test`` (the mask's centre-of-mass window, plus ``tta - 1`` seeded random
    windows for test-time averaging), ``label`` (random window, no augmentation: IPB's
    pseudo-labelling pass, seeded apart from every other stream)."""

    geometry: PatchGeometry
    class_names: tuple[str, ...]
    seed: int = 0
    mode: str = "train"
    tta: int = 1
    augment: Any = None  # an ipb_ray.config.AugmentConfig; None = the paper's policy as published

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"stream mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.tta < 1:
            raise ValueError(f"tta must be >= 1, got {self.tta}")

    def patch_columns(self) -> list[str]:
        prefixes = ("weak", "strong") if self.mode == "uda" else ("x",)
        return [f"{p}{s}" for p in prefixes for s in self.geometry.scales]

    def columns(self) -> list[str]:
        return ["colony_id", "label", "copy", "x", "y", "scale", "met", *self.patch_columns()]


def colony_rng(seed: int, epoch: int, mode: str, colony_id: str, copy: int) -> np.random.Generator:
    """The generator of one patch draw; independent of worker, batch and row order."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, _STREAM_TAG[mode], hash_id(colony_id), copy]))


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
        return True
    except ValueError:
        return False


def _empty_batch(spec: StreamSpec) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {
        "colony_id": np.array([], dtype=object), "label": np.zeros(0, np.int64),
        "copy": np.zeros(0, np.int32), "x": np.zeros(0, np.int32), "y": np.zeros(0, np.int32),
        "scale": np.zeros(0, np.float32), "met": np.zeros(0, bool)}
    for name in spec.patch_columns():
        s = int("".join(ch for ch in name if ch.isdigit()))
        out[name] = np.zeros((0, 1, s, s), np.float32)
    return out


def patch_batch(batch: Mapping[str, Sequence[Any]], spec: StreamSpec, epoch: int = 0,
                counts: Mapping[str, int] | None = None,
                coords: Mapping[str, Sequence[float]] | None = None) -> dict[str, np.ndarray]:
    """Catalog rows -> patch rows (pure; see the module docstring for the columns).

    ``batch``: columns ``colony_id``, ``image`` and ``mask`` (PNG bytes), ``label`` (str or
    None). ``counts``: copies per colony id (absent id = 0 copies); None = one copy each
    (``tta`` copies in test mode). Each copy is an independent draw. ``coords``: a fixed
    window ``(x, y, scale)`` per colony id (IPB: the student trains on the very patch the
    teacher labelled); its copies differ only in their augmentation. Colonies absent from
    ``coords`` draw their windows as usual.
    """
    index = {n: i for i, n in enumerate(spec.class_names)}
    rows: dict[str, list[Any]] = {k: [] for k in spec.columns()}
    for cid, img_png, mask_png, label in zip(batch["colony_id"], batch["image"], batch["mask"],
                                             batch["label"]):
        n = spec.tta if counts is None and spec.mode == "test" else 1 if counts is None \
            else int(counts.get(cid, 0))
        if n <= 0:
            continue
        fixed = coords.get(cid) if coords is not None else None
        image, mask, scale = prepare_crop(catalog.decode_png(img_png), catalog.decode_png(mask_png) > 0,
                                          spec.geometry.size, scale=None if fixed is None else fixed[2],
                                          whole=spec.geometry.whole)
        lab = index.get(label, -1) if label is not None else -1
        for copy in range(n):
            emit_patch(rows, image, mask, scale, cid, lab, copy, fixed, spec, epoch)
    out = finish_rows(rows, spec)
    if spec.mode in SHUFFLED_MODES and len(out["colony_id"]):
        # a colony's copies come out one after another; scatter them (the stream's shuffle
        # buffer then mixes batches), seeded by the epoch and the rows this batch holds
        order = batch_order(out["colony_id"], out["copy"], spec.seed, epoch)
        out = {k: v[order] for k, v in out.items()}
    return out


def emit_patch(rows: dict[str, list[Any]], image: np.ndarray, mask: np.ndarray, scale: float, colony_id: str,
               label: int, copy: int, fixed: Sequence[float] | None, spec: StreamSpec, epoch: int) -> None:
    """Append copy ``copy`` of one colony's patch to ``rows`` (lists per column of
    :meth:`StreamSpec.columns`). ``image``/``mask``: the prepared crop; ``fixed``: a fixed
    window ``(x, y, scale)`` or None. The draw depends on (seed, epoch, mode, colony, copy)
    only, so every path that cuts this copy cuts the same patch."""
    rng = colony_rng(spec.seed, epoch, spec.mode, colony_id, copy)
    if fixed is not None:
        coord, met = PatchCoord(int(fixed[0]), int(fixed[1]), float(fixed[2])), True
    elif spec.mode == "test" and copy == 0:
        coord, met = centre_coord(mask, spec.geometry, scale=scale), True
    else:
        coord, met = sample_coord(mask, spec.geometry, rng, scale=scale)
    _append_views(rows, cut(image, coord, spec.geometry), spec, rng)
    rows["colony_id"].append(colony_id)
    rows["label"].append(label)
    rows["copy"].append(copy)
    rows["x"].append(coord.x)
    rows["y"].append(coord.y)
    rows["scale"].append(coord.scale)
    rows["met"].append(met)


def finish_rows(rows: dict[str, list[Any]], spec: StreamSpec) -> dict[str, np.ndarray]:
    """The lists of :func:`emit_patch` as a patch batch's numpy columns."""
    if not rows["colony_id"]:
        return _empty_batch(spec)
    out = {"colony_id": np.array(rows["colony_id"], dtype=object),
           "label": np.array(rows["label"], np.int64), "copy": np.array(rows["copy"], np.int32),
           "x": np.array(rows["x"], np.int32), "y": np.array(rows["y"], np.int32),
           "scale": np.array(rows["scale"], np.float32), "met": np.array(rows["met"], bool)}
    for name in spec.patch_columns():
        out[name] = np.stack(rows[name]).astype(np.float32, copy=False)
    return out


#: Training streams whose rows are shuffled (evaluation streams keep the catalog order).
SHUFFLED_MODES = ("train", "plain", "uda")


def batch_order(colony_ids: Sequence[str], copies: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation of a patch batch's rows: the same rows, seed and epoch give the
    same order on any worker; another epoch gives another order."""
    key = sum(hash_id(str(c)) * 1_000_003 + int(k) for c, k in zip(colony_ids, copies)) % (2 ** 63)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 7, key]))
    return rng.permutation(len(colony_ids))


def hash_id(colony_id: str) -> int:
    """A stable integer of a colony id (hex ids as their value, others from their bytes)."""
    return int(colony_id, 16) if _is_hex(colony_id) else \
        int.from_bytes(colony_id.encode()[:16].ljust(16, b"\0"), "little")


def _append_views(rows: dict[str, list[Any]], window: np.ndarray, spec: StreamSpec,
                  rng: np.random.Generator) -> None:
    if spec.mode in ("plain", "test", "label"):
        views = {"x": to_scales(window, spec.geometry)}
    elif spec.mode == "train":
        aug = augment.train_view(window, rng, spec.augment) if spec.augment is not None \
            else augment.paper_augment(window, rng)[0]
        views = {"x": [t.numpy() for t in to_scales(aug, spec.geometry)]}
    else:
        weak, strong = augment.configured_pair(window, rng, spec.augment) if spec.augment is not None \
            else augment.weak_strong(window, rng)
        views = {"weak": [t.numpy() for t in to_scales(weak, spec.geometry)],
                 "strong": [t.numpy() for t in to_scales(strong, spec.geometry)]}
    for prefix, arrays in views.items():
        for s, arr in zip(spec.geometry.scales, arrays):
            rows[f"{prefix}{s}"].append(arr)


def revisit_coords(image_png: bytes, mask_png: bytes, coord: PatchCoord, spec: StreamSpec) -> list[np.ndarray]:
    """The un-augmented scales of a stored patch coordinate (IPB revisits pseudo-labelled patches)."""
    image, _mask, _ = prepare_crop(catalog.decode_png(image_png), catalog.decode_png(mask_png) > 0,
                                   spec.geometry.size, scale=coord.scale, whole=spec.geometry.whole)
    return to_scales(cut(image, coord, spec.geometry), spec.geometry)
