"""Colony segmentation of a raw frame (paper, "Data pre-processing", step 1).

Pipeline, with parameters from :class:`ipb_ray.config.SegmentationConfig`::

    Gaussian blur (blur_ksize) -> local entropy (disk entropy_radius, bits)
    -> Otsu threshold (foreground = entropy > t) -> opening (disk opening_radius)
    -> hole filling -> drop objects under min_object_px -> 8-connected components
    -> bounding boxes and per-colony masks

Two implementations of the same steps:

- :func:`reference_segment`: the plain scikit-image / SciPy version, with
  ``skimage.filters.rank.entropy`` as the oracle. Slow (seconds per 2908² frame).
- :func:`segment_frame`: the fast version used by the pipeline. Its entropy
  (:func:`local_entropy`) is exact, not an approximation: it uses
  ``sum_k c_k log c_k = sum_i [f(r_i) - f(r_i - 1)]`` where ``r_i`` is how many of the
  window pixels 1..i equal pixel i, so the per-pixel histogram never has to be built;
  the pairwise equalities are whole-image uint8 comparisons of shifted views, summed in
  cache-sized row strips. The other steps use OpenCV (opening, flood-fill hole filling,
  connected components with stats).

Conventions: images are ``(H, W)`` uint8; boxes are ``(x0, y0, x1, y1)`` in pixels with
exclusive ends; masks are bool. Pure functions over numpy: no Ray import here.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from ipb_ray.config import SegmentationConfig

__all__ = [
    "box_iou", "box_iou_matrix", "Colony", "COLONY_CONNECTIVITY", "ENTROPY_STRIP_ROWS", "ENTROPY_ZERO_SNAP",
    "FrameError", "load_frame", "local_entropy", "mask_iou", "match_colonies", "MAX_PAIRWISE_RADIUS",
    "OTSU_BINS", "otsu_threshold", "reference_segment", "segment_frame", "to_uint8",
]

log = logging.getLogger(__name__)

#: Connectivity of colonies (8-neighbours): colonies touching at a corner are one object.
COLONY_CONNECTIVITY = 8
#: Histogram bins of the Otsu threshold (scikit-image's default).
OTSU_BINS = 256
#: The pairwise entropy costs O(n²) for a disk of n pixels; past this radius the
#: sliding-histogram filter of scikit-image (O(radius) per pixel) is the faster exact one.
MAX_PAIRWISE_RADIUS = 4
#: Output rows per strip of the fast entropy: the working set (n planes of strip x W
#: bytes) then stays in the CPU caches. Measured: 128 rows is the knee on 2-3k px frames.
ENTROPY_STRIP_ROWS = 128

#: Entropies (bits) at or below this are float32 rounding noise of a uniform window: set to 0.
ENTROPY_ZERO_SNAP = 1e-4

_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


class FrameError(ValueError):
    """A frame that cannot be read or converted; the message names the file and the fix."""


@dataclass(frozen=True)
class Colony:
    """One segmented colony of a frame.

    index: position in the frame's colony list (sorted by ``(y0, x0)``).
    bbox: ``(x0, y0, x1, y1)`` in frame pixels, exclusive ends.
    mask: ``(y1 - y0, x1 - x0)`` bool, this colony's pixels only (not its neighbours').
    area_px: number of colony pixels (``mask.sum()``).
    """

    index: int
    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    area_px: int


# --------------------------------------------------------------------------- reading frames

def _where(name: str | None) -> str:
    return f"{name}: " if name else ""


def to_uint8(image: np.ndarray, name: str | None = None) -> np.ndarray:
    """Convert an in-memory image to ``(H, W)`` uint8 grayscale.

    Accepted: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 2)`` (grey + alpha), ``(H, W, 3)`` RGB,
    ``(H, W, 4)`` RGBA (alpha dropped); dtypes bool, unsigned/signed integers, floats.
    Colour is converted with the ITU-R BT.601 weights (0.299 R + 0.587 G + 0.114 B,
    as OpenCV's RGB2GRAY). uint8 is returned as is (a copy is not made); every other
    dtype is **min-max rescaled per frame**: ``round(255 * (x - min) / (max - min))``
    (bool: False -> 0, True -> 255); a constant frame becomes all zeros.

    ``name`` (e.g. the file path) is put in error messages.
    """
    arr = np.asarray(image)
    where = _where(name)
    if arr.dtype.kind not in "biuf":
        raise FrameError(f"{where}unsupported pixel type {arr.dtype}; expected integer, float or "
                         "bool pixels (convert the image to 8- or 16-bit grayscale)")
    if arr.size == 0:
        raise FrameError(f"{where}the image is empty (shape {arr.shape}); export a frame with pixels")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] in (2, 3, 4):
        if arr.shape[2] == 2:      # grey + alpha
            arr = arr[:, :, 0]
        elif arr.dtype == np.uint8:
            return cv2.cvtColor(np.ascontiguousarray(arr[:, :, :3]), cv2.COLOR_RGB2GRAY)
        else:
            rgb = arr[:, :, :3].astype(np.float64)
            arr = rgb @ np.array([0.299, 0.587, 0.114])
    if arr.ndim != 2:
        raise FrameError(
            f"{where}expected a 2-D grayscale frame (H, W) or a colour frame (H, W, 3|4), got shape "
            f"{arr.shape}; a stack of frames (pages, z-slices, time points) must be split into one "
            "file per frame")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    work = arr.astype(np.float64)
    if not np.all(np.isfinite(work)):
        raise FrameError(f"{where}the image holds NaN or infinite pixels; replace them before segmenting")
    lo, hi = float(work.min()), float(work.max())
    if hi == lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((work - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _grey_or_rgb(palette: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Look palette indices up: ``(H, W)`` grey levels for a grey palette, else ``(H, W, 3)``."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: min(len(palette), 256)] = palette[:256]
    if np.array_equal(lut[:, 0], lut[:, 1]) and np.array_equal(lut[:, 0], lut[:, 2]):
        return lut[:, 0][index]
    return lut[index]


def _stack_error(path: Path, pages: int) -> FrameError:
    return FrameError(f"{path}: holds {pages} pages (a 3-D stack) but was read as one frame; list it "
                      "through data.frames, which takes every plane of a stack as a frame")


def _read_with_tifffile(path: Path) -> np.ndarray:
    """Decode a TIFF with tifffile (keeps 16-bit colour, which Pillow truncates)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if len(tif.pages) > 1:
            raise _stack_error(path, len(tif.pages))
        page = tif.pages[0]
        arr = page.asarray()
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
            # TIFF colormaps are 16-bit (writers store v * 257 or v << 8: the high byte is v
            # either way); a grey palette reads as its grey levels.
            cmap = (np.asarray(page.colormap, np.uint16).T >> 8).astype(np.uint8)
            if arr.dtype != np.uint8:
                raise FrameError(f"{path}: palette images with {arr.dtype} indices are not supported; "
                                 "save the frame as 8-bit grayscale")
            return _grey_or_rgb(cmap, arr)
        return arr


def _read_with_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        pages = getattr(im, "n_frames", 1)
        if pages > 1:
            raise _stack_error(path, pages)
        if im.mode == "P":
            palette = np.asarray(im.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
            return _grey_or_rgb(palette, np.asarray(im))
        if im.mode in ("PA", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGBA" if im.mode == "PA" else "RGB")
        return np.asarray(im)


def load_frame(path: str | Path, plane: Any = None) -> np.ndarray:
    """Read a raw frame as ``(H, W)`` uint8 grayscale.

    ``plane``: one plane of a stack file (a :class:`ipb_ray.data.stacks.Plane` or its
    dict, as the importers list them), read alone; None reads a one-frame file.

    Formats: TIFF, PNG, JPEG (and BMP), 8- or 16-bit, grayscale, palette (a grey palette
    reads as its grey levels), RGB or RGBA (converted to grey, BT.601 weights). TIFFs are
    decoded with tifffile, falling back to Pillow where tifffile lacks the codec (LZW
    without ``imagecodecs``, as the hiPSC tiles); other formats with Pillow.
    Anything but uint8 is **min-max rescaled per frame**, as in :func:`to_uint8`.

    Returns ``(H, W)`` uint8. Raises :class:`FrameError` (a ``ValueError``) naming the
    file for a missing, empty or unreadable file, a multi-page stack, an unsupported
    pixel type or shape, and a zero-size image.
    """
    path = Path(path)
    if plane is not None:
        from ipb_ray.data.stacks import Plane, StackError, read_plane

        try:
            arr = read_plane(path, plane)
        except StackError as exc:
            raise FrameError(str(exc)) from exc
        p = Plane.from_dict(plane) if isinstance(plane, dict) else plane
        return to_uint8(arr, name=f"{path} plane t={p.t} position {p.position}")
    if not path.is_file():
        raise FrameError(f"{path}: no such file; check the frames directory or glob")
    if path.stat().st_size == 0:
        raise FrameError(f"{path}: the file is empty (0 bytes); re-export or remove it")
    readers = [_read_with_pillow]
    if path.suffix.lower() in (".tif", ".tiff"):
        readers.insert(0, _read_with_tifffile)
    errors: list[str] = []
    arr: np.ndarray | None = None
    for reader in readers:
        try:
            arr = reader(path)
            break
        except FrameError:
            raise
        except Exception as exc:  # decoders raise many types for files they cannot read
            errors.append(f"{reader.__name__.removeprefix('_read_with_')}: {exc}")
    if arr is None:
        raise FrameError(f"{path}: not a readable image ({'; '.join(errors)}); supported formats "
                         f"are {', '.join(_IMAGE_SUFFIXES)}")
    return to_uint8(arr, name=str(path))


# --------------------------------------------------------------------------- steps

@functools.lru_cache(maxsize=None)
def _disk(radius: int) -> np.ndarray:
    """The disk footprint of scikit-image's ``disk(radius)`` (x² + y² <= r²), uint8."""
    from skimage.morphology import disk

    return np.ascontiguousarray(disk(radius), dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def _entropy_plan(radius: int) -> tuple[tuple[tuple[int, int], ...],
                                        tuple[tuple[tuple[int, int], tuple[tuple[int, int, int], ...]], ...],
                                        np.ndarray]:
    """Offsets of the disk, the pairwise work grouped by displacement, and the h table.

    For the pair (i, j), j < i, of window offsets ``o_i, o_j`` the term is
    ``[I(p + o_i) == I(p + o_j)]``. With ``E_d(q) = [I(q) == I(q + d)]`` that is
    ``E_d(p + o_i)`` for ``d = o_j - o_i``, or ``E_{-d}(p + o_j)``: one comparison image
    per displacement up to sign serves every pair with that displacement.
    Returns (offsets, ((d, ((i, dy, dx), ...)), ...), h) where (dy, dx) is where the view
    of E_d is taken for pair term i, and ``h[r] = r log2 r - (r-1) log2 (r-1)`` (float32,
    256 entries so it serves as a cv2.LUT table).
    """
    fp = _disk(radius)
    ys, xs = np.nonzero(fp)
    offsets = tuple((int(y) - radius, int(x) - radius) for y, x in zip(ys, xs))
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for i, oi in enumerate(offsets):
        for oj in offsets[:i]:
            d = (oj[0] - oi[0], oj[1] - oi[1])
            neg = (-d[0], -d[1])
            if neg in groups:
                groups[neg].append((i, oj[0], oj[1]))
            else:
                groups.setdefault(d, []).append((i, oi[0], oi[1]))
    n = len(offsets)
    r = np.arange(n + 1, dtype=np.float64)
    f = np.zeros(n + 1)
    f[1:] = r[1:] * np.log2(r[1:])
    h = np.zeros(256, np.float32)
    h[1:n + 1] = np.diff(f)
    return offsets, tuple((d, tuple(v)) for d, v in groups.items()), h


def _window_counts(shape: tuple[int, int], offsets: Sequence[tuple[int, int]],
                   rows: slice, cols: slice) -> np.ndarray:
    """How many window pixels lie inside the frame, for the rectangle ``rows x cols``."""
    height, width = shape
    oy = np.array([o[0] for o in offsets])[:, None]
    ox = np.array([o[1] for o in offsets])[:, None]
    y = np.arange(height)[rows][None, :] + oy
    x = np.arange(width)[cols][None, :] + ox
    vy = ((y >= 0) & (y < height)).astype(np.float32)
    vx = ((x >= 0) & (x < width)).astype(np.float32)
    return vy.T @ vx


def local_entropy(image: np.ndarray, radius: int = 3) -> np.ndarray:
    """Shannon entropy (bits) of the grey levels in a disk around every pixel.

    Same definition as ``skimage.filters.rank.entropy(image, disk(radius))`` on uint8,
    including the borders, where only the window pixels inside the frame count; agrees
    with it to float32 rounding (~1e-6 bits).

    image: ``(H, W)`` uint8. Returns ``(H, W)`` float32 in ``[0, log2(window size)]``.
    Radii above :data:`MAX_PAIRWISE_RADIUS` fall back to scikit-image (exact, slower
    here, faster there).
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"local_entropy needs a (H, W) uint8 image, got {image.dtype} {image.shape}")
    if radius < 1:
        return np.zeros(image.shape, np.float32)
    if radius > MAX_PAIRWISE_RADIUS:
        from skimage.filters.rank import entropy

        return entropy(image, _disk(radius)).astype(np.float32)
    offsets, groups, h = _entropy_plan(radius)
    n = len(offsets)
    height, width = image.shape
    # Pad so that every view below (window offset up to r, displacement up to 2r) is in
    # bounds; pad pixels are excluded by zeroing the comparisons that touch them.
    pad = 3 * radius
    padded = np.zeros((height + 2 * pad, width + 2 * pad), np.uint8)
    padded[pad:pad + height, pad:pad + width] = image
    strip = min(ENTROPY_STRIP_ROWS, height)
    e_cols = width + 2 * radius
    eq_buf = np.empty((strip + 2 * radius, e_cols), np.bool_)
    run_counts = np.empty((n, strip, width), np.uint8)
    lut = h.reshape(1, 256)
    plogp = np.empty((height, width), np.float32)  # sum_k c_k log2 c_k per pixel
    x_org = pad - radius                           # column of E's first entry in `padded`
    for y0 in range(0, height, strip):
        y1 = min(height, y0 + strip)
        rows = y1 - y0
        counts = run_counts[:, :rows]
        counts.fill(1)
        y_org = y0 + pad - radius
        e_rows = rows + 2 * radius
        base = padded[y_org:y_org + e_rows, x_org:x_org + e_cols]
        near_edge = y0 < 2 * radius or y1 > height - 2 * radius
        for (dy, dx), terms in groups:
            eq = eq_buf[:e_rows]
            np.equal(base, padded[y_org + dy:y_org + dy + e_rows, x_org + dx:x_org + dx + e_cols], out=eq)
            eq8 = eq.view(np.uint8)
            lo = max(pad, pad - dx) - x_org
            hi = min(pad + width, pad + width - dx) - x_org
            eq8[:, :max(lo, 0)] = 0
            eq8[:, max(hi, 0):] = 0
            if near_edge:
                lo = max(pad, pad - dy) - y_org
                hi = min(pad + height, pad + height - dy) - y_org
                eq8[:max(lo, 0)] = 0
                eq8[max(hi, 0):] = 0
            for i, vy, vx in terms:
                view = eq8[radius + vy:radius + vy + rows, radius + vx:radius + vx + width]
                cv2.add(counts[i], view, dst=counts[i])
        acc = plogp[y0:y1]
        acc.fill(0)
        for i in range(n):
            cv2.add(acc, cv2.LUT(counts[i], lut), dst=acc)
    out = np.float32(np.log2(n)) - plogp * np.float32(1.0 / n)
    # Border bands: fewer than n window pixels lie inside the frame.
    r = radius
    bands = ((slice(0, r), slice(None)), (slice(max(height - r, 0), None), slice(None)),
             (slice(None), slice(0, r)), (slice(None), slice(max(width - r, 0), None)))
    for band_rows, band_cols in bands:
        valid = _window_counts((height, width), offsets, band_rows, band_cols)
        out[band_rows, band_cols] = np.log2(valid) - plogp[band_rows, band_cols] / valid
    # A uniform window has entropy exactly 0 but comes out as +-1e-6 from the float32
    # sums; snap it, or Otsu would split a flat frame on rounding noise. The smallest
    # true non-zero entropy (counts n-1 and 1) is > 0.1 bit for the n <= 49 pixels here.
    cv2.threshold(out, ENTROPY_ZERO_SNAP, 0, cv2.THRESH_TOZERO, dst=out)
    return out


def otsu_threshold(values: np.ndarray, nbins: int = OTSU_BINS) -> float:
    """Otsu's threshold of ``values`` (any shape, float), as ``skimage.filters.threshold_otsu``.

    A ``nbins``-bin histogram over ``[min, max]``; the threshold is the centre of the bin
    maximising the between-class variance, and foreground is ``values > threshold``.
    A constant input returns its value (so nothing is foreground). ``nbins`` <= 256.
    """
    if not 2 <= nbins <= 256:
        raise ValueError(f"otsu_threshold: nbins={nbins} is out of range; allowed [2, 256]")
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    lo, hi = float(flat.min()), float(flat.max())
    if hi == lo:
        return lo
    scale = nbins / (hi - lo)
    # Bin index floor((v - lo) * scale) as a uint8 image (np.histogram's binning).
    # saturate_cast rounds, hence the -0.5; the top value lands in the last bin.
    idx = cv2.convertScaleAbs(flat.reshape(1, -1), alpha=scale, beta=-lo * scale - 0.5)
    counts = cv2.calcHist([idx], [0], None, [nbins], [0, nbins]).reshape(-1).astype(np.float64)
    edges = np.linspace(lo, hi, nbins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = np.cumsum(counts * centres) / w1
        m2 = (np.cumsum((counts * centres)[::-1]) / w2[::-1])[::-1]
        between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centres[int(np.nanargmax(between))])


def _blur(image: np.ndarray, ksize: int) -> np.ndarray:
    if ksize <= 1:
        return image
    return cv2.GaussianBlur(image, (ksize, ksize), 0)


def _open(mask_u8: np.ndarray, radius: int) -> np.ndarray:
    """Binary opening with a disk; pixels outside the frame never erode or grow a region."""
    if radius < 1:
        return mask_u8
    # morphologyEx's default constant border is neutral for erosion and dilation alike.
    return cv2.morphologyEx(mask_u8, cv2.MORPH_OPEN, _disk(radius))


def _fill_holes(mask_u8: np.ndarray) -> np.ndarray:
    """Fill background regions not 4-connected to the frame border (as ndimage.binary_fill_holes)."""
    height, width = mask_u8.shape
    canvas = np.zeros((height + 2, width + 2), np.uint8)
    canvas[1:-1, 1:-1] = mask_u8
    # Flood the outside (4-connected, like binary_fill_holes); what stays 0 is a hole.
    cv2.floodFill(canvas, None, (0, 0), 2, flags=4)
    return (canvas[1:-1, 1:-1] != 2).view(np.uint8)


def _colonies_from_labels(labels: np.ndarray, boxes: np.ndarray, areas: np.ndarray,
                          ids: np.ndarray) -> list[Colony]:
    """Colonies for the component ids; boxes (x0, y0, x1, y1) per id, sorted by (y0, x0)."""
    order = sorted(range(len(ids)), key=lambda k: (int(boxes[k][1]), int(boxes[k][0]),
                                                   int(boxes[k][3]), int(boxes[k][2])))
    out = []
    for index, k in enumerate(order):
        x0, y0, x1, y1 = (int(v) for v in boxes[k])
        mask = labels[y0:y1, x0:x1] == ids[k]
        out.append(Colony(index=index, bbox=(x0, y0, x1, y1), mask=mask, area_px=int(areas[k])))
    return out


def _check_input(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"segmentation needs a (H, W) uint8 frame, got {desc}; "
                         "convert with ipb_ray.data.segmentation.to_uint8 or read with load_frame")
    if image.size == 0:
        raise ValueError("segmentation got an empty frame (zero pixels)")
    return np.ascontiguousarray(image)


def segment_frame(image: np.ndarray, cfg: SegmentationConfig | None = None
                  ) -> tuple[np.ndarray, list[Colony]]:
    """Segment the colonies of a frame (fast implementation).

    image: ``(H, W)`` uint8 (see :func:`load_frame` / :func:`to_uint8`).
    Returns ``(foreground, colonies)``: foreground ``(H, W)`` bool, the union of the kept
    colonies; colonies sorted by ``(y0, x0)``. Agrees with :func:`reference_segment`
    up to float rounding of the entropy (see tests and benchmarks/segmentation.py).
    """
    cfg = cfg or SegmentationConfig()
    image = _check_input(image)
    blurred = _blur(image, cfg.blur_ksize)
    ent = local_entropy(blurred, cfg.entropy_radius)
    threshold = otsu_threshold(ent)
    fg = (ent > np.float32(threshold)).view(np.uint8)
    fg = _open(fg, cfg.opening_radius)
    if cfg.fill_holes:
        fg = _fill_holes(fg)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=COLONY_CONNECTIVITY,
                                                           ltype=cv2.CV_32S)
    areas = stats[1:, cv2.CC_STAT_AREA]
    ids = np.flatnonzero(areas >= cfg.min_object_px) + 1
    keep = np.zeros(n, np.bool_)
    keep[ids] = True
    foreground = keep[labels]
    st = stats[ids]
    boxes = np.stack([st[:, cv2.CC_STAT_LEFT], st[:, cv2.CC_STAT_TOP],
                      st[:, cv2.CC_STAT_LEFT] + st[:, cv2.CC_STAT_WIDTH],
                      st[:, cv2.CC_STAT_TOP] + st[:, cv2.CC_STAT_HEIGHT]], axis=1)
    colonies = _colonies_from_labels(labels, boxes, st[:, cv2.CC_STAT_AREA], ids)
    log.debug("segment_frame: %dx%d frame, Otsu %.4f bits, %d colonies",
              image.shape[1], image.shape[0], threshold, len(colonies))
    return foreground, colonies


def reference_segment(image: np.ndarray, cfg: SegmentationConfig | None = None
                      ) -> tuple[np.ndarray, list[Colony]]:
    """The same pipeline written plainly with scikit-image and SciPy: the oracle.

    ``skimage.filters.rank.entropy`` -> ``threshold_otsu`` -> ``morphology.opening``
    (mode "ignore") -> ``ndimage.binary_fill_holes`` -> ``remove_small_objects`` ->
    ``measure.label``/``regionprops``. The blur is OpenCV's, as in the paper and in
    :func:`segment_frame`. Same inputs and outputs as :func:`segment_frame`; slow
    (about 1 s per megapixel on one core).
    """
    from scipy import ndimage
    from skimage import measure, morphology
    from skimage.filters import threshold_otsu
    from skimage.filters.rank import entropy

    cfg = cfg or SegmentationConfig()
    image = _check_input(image)
    blurred = _blur(image, cfg.blur_ksize)
    ent = entropy(blurred, morphology.disk(cfg.entropy_radius))
    fg = ent > threshold_otsu(ent)
    if cfg.opening_radius >= 1:
        fg = morphology.opening(fg, morphology.disk(cfg.opening_radius), mode="ignore")
    if cfg.fill_holes:
        fg = ndimage.binary_fill_holes(fg)
    labels = measure.label(fg, connectivity=2)
    props = [p for p in measure.regionprops(labels) if p.area >= cfg.min_object_px]
    ids = np.array([p.label for p in props], dtype=np.int64)
    foreground = np.isin(labels, ids)
    boxes = np.array([(p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2]) for p in props],
                     dtype=np.int64).reshape(-1, 4)
    areas = np.array([int(p.area) for p in props], dtype=np.int64)
    return foreground, _colonies_from_labels(labels, boxes, areas, ids)


# --------------------------------------------------------------------------- agreement

def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two same-shape bool masks; 1.0 when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask_iou needs masks of one shape, got {a.shape} and {b.shape}")
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


def box_iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``(N, 4)`` and ``(M, 4)`` given as (x0, y0, x1, y1), exclusive
    ends, in pixels. Returns ``(N, M)`` float64; a pair of empty boxes scores 0."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (x0, y0, x1, y1), exclusive ends."""
    return float(box_iou_matrix(np.asarray(a)[None], np.asarray(b)[None])[0, 0])


def _boxes(items: Sequence[Colony] | np.ndarray) -> np.ndarray:
    if isinstance(items, np.ndarray):
        return items.reshape(-1, 4)
    return np.array([c.bbox if isinstance(c, Colony) else tuple(c) for c in items],
                    dtype=np.float64).reshape(-1, 4)


def match_colonies(ref: Sequence[Colony] | np.ndarray, test: Sequence[Colony] | np.ndarray,
                   min_iou: float = 0.9) -> float:
    """Fraction of ``ref`` colonies matched one-to-one by a ``test`` colony with box IoU
    >= ``min_iou`` (greedy, best pairs first). Either side may be Colony objects or an
    ``(N, 4)`` box array. An empty ``ref`` counts as fully matched (1.0)."""
    ra, ta = _boxes(ref), _boxes(test)
    if len(ra) == 0:
        return 1.0
    if len(ta) == 0:
        return 0.0
    iou = box_iou_matrix(ra, ta)
    pairs = np.argwhere(iou >= min_iou)
    pairs = pairs[np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")]
    used_r: set[int] = set()
    used_t: set[int] = set()
    for i, j in pairs:
        if i not in used_r and j not in used_t:
            used_r.add(int(i))
            used_t.add(int(j))
    return len(used_r) / len(ra)
