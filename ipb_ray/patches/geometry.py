"""Mask-constrained, multi-scale patches of a colony crop (paper, "Patches and scales").

A colony is stored as its bounding-box crop plus a bool mask (:mod:`ipb_ray.data.catalog`).
A *patch* is a square window of side ``S`` (:attr:`PatchGeometry.size`) cut from the
crop; multi-scale training also uses the window's exact centre of side ``s`` (the
paper's 224 global patch and its 112 local centre). Rules:

- The window lies fully inside the crop: nothing is padded with invented content.
- A crop whose height or width is below ``S`` is first resized up, uniformly, so its
  smaller side is ``S`` (the paper's "resizing augmentation"). The factor travels with
  the coordinates (:class:`PatchCoord`), so the same patch can be cut again later
  (:func:`revisit`): IPB pseudo-labels a patch and the student trains on the same one.
- Random patches (:func:`sample_coord`) are drawn uniformly among window positions
  whose centre pixel is colony and whose colony fraction is at least
  ``min_foreground`` (the authors' code re-draws until 25 % of the patch is colony).
  A few uniform candidates are tried first (rejection: exact and cheap when the colony
  fills its crop); if they all fail, every position's colony count comes from one
  integral image, O(H W) vectorised with no loop over positions.
- The test patch (:func:`centre_coord`) is centred on the mask's centre of mass, or on
  the nearest colony pixel when the centre of mass falls outside the colony.

Conventions: images ``(H, W)`` uint8, masks ``(H, W)`` bool, coordinates in pixels of the
*prepared* (possibly resized) crop, ``(x, y)`` the window's top-left corner. The centre
pixel of a window of side ``S`` is ``(x + S // 2, y + S // 2)``; the centre of side ``s``
starts at offset ``(S - s) // 2``. Pure numpy/OpenCV (torch only where a caller hands in
tensors); no Ray import.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ipb_ray.config import DataConfig

__all__ = [
    "PatchCoord",
    "PatchGeometry",
    "centre_coord",
    "centre_crop",
    "cut",
    "foreground_fraction",
    "prepare_crop",
    "revisit",
    "sample_coord",
    "sample_patches",
    "to_scales",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchGeometry:
    """Patch sizes, px. ``size``: side ``S`` of the window cut from the crop (the largest
    scale); ``scales``: sides of the views fed to the network, each the window's exact
    centre (``(128,)`` single-scale, ``(224, 112)`` multi-scale); ``min_foreground``:
    smallest colony fraction of a random window; ``whole``: the window is the whole crop
    stretched to ``size x size`` (objects smaller than a patch, e.g. single cells), so
    there is one position and ``min_foreground`` does not apply."""

    size: int
    scales: tuple[int, ...]
    min_foreground: float = 0.25
    whole: bool = False  # the whole crop resized to size x size is the window (single cells)

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"PatchGeometry.size must be a positive integer, got {self.size!r}")
        scales = tuple(int(s) for s in self.scales)
        if not scales:
            raise ValueError("PatchGeometry.scales is empty; give at least one side, e.g. (128,)")
        bad = [s for s in scales if not 1 <= s <= self.size]
        if bad:
            raise ValueError(f"PatchGeometry.scales {scales} has sides outside [1, size={self.size}]: {bad}; "
                             "every scale is a centre of the size x size window")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise ValueError(f"PatchGeometry.min_foreground must lie in [0, 1], got {self.min_foreground!r}")
        object.__setattr__(self, "scales", scales)

    @staticmethod
    def from_config(data: "DataConfig") -> "PatchGeometry":
        """Single-scale ``data.patch_size`` or multi-scale ``(global_patch, local_patch)``."""
        whole = data.window == "whole"
        if data.multi_scale:
            return PatchGeometry(size=data.global_patch, scales=(data.global_patch, data.local_patch),
                                 min_foreground=data.min_foreground, whole=whole)
        return PatchGeometry(size=data.patch_size, scales=(data.patch_size,),
                             min_foreground=data.min_foreground, whole=whole)


@dataclass(frozen=True)
class PatchCoord:
    """Where a patch is. ``x``, ``y``: top-left of the ``S`` window in the prepared crop, px;
    ``scale``: the resize factor :func:`prepare_crop` applied to the stored crop first
    (1.0 = none). Plain numbers, so a coordinate fits in a table column."""

    x: int
    y: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", int(self.x))
        object.__setattr__(self, "y", int(self.y))
        object.__setattr__(self, "scale", float(self.scale))


# --------------------------------------------------------------------------- crops


def _as_bool(mask: np.ndarray) -> np.ndarray:
    return mask if mask.dtype == bool else mask > 0


def _resized_shape(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def prepare_crop(image_u8: np.ndarray, mask_bool: np.ndarray, size: int, *,
                 scale: float | None = None, whole: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Resize a crop up so both sides are at least ``size`` px.

    ``image_u8``: (H, W) uint8; ``mask_bool``: (H, W) bool (or 0/255). Returns
    ``(image, mask, scale)``: the image resized bilinearly, the mask with nearest
    neighbour (stays bool), and the factor (1.0 and the inputs unchanged when the crop is
    big enough). The factor is ``size / min(H, W)``, so the smaller side becomes exactly
    ``size``. Pass a stored ``scale`` to reproduce an earlier preparation exactly.

    ``whole=True`` stretches the crop to exactly ``size x size`` (area interpolation when
    shrinking), whatever ``scale`` says; the returned factor is then ``size / min(H, W)``,
    for the record only.
    """
    if image_u8.ndim != 2 or image_u8.shape != mask_bool.shape:
        raise ValueError(f"crop {image_u8.shape} and mask {mask_bool.shape} must be the same (H, W)")
    mask = _as_bool(mask_bool)
    h, w = image_u8.shape
    if whole:
        if (h, w) == (size, size):
            return image_u8, mask, 1.0
        shrink = h * w > size * size
        image = cv2.resize(image_u8, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        mask = cv2.resize(np.ascontiguousarray(mask).view(np.uint8), (size, size),
                          interpolation=cv2.INTER_NEAREST).view(bool)
        return image, mask, size / min(h, w)
    if scale is None:
        scale = 1.0 if min(h, w) >= size else size / min(h, w)
    scale = float(scale)
    if scale == 1.0:
        return image_u8, mask, 1.0
    nh, nw = _resized_shape(h, w, scale)
    image = cv2.resize(image_u8, (nw, nh), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(np.ascontiguousarray(mask).view(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST).view(bool)
    return image, mask, scale


# --------------------------------------------------------------------- positions


def _window_counts(mask: np.ndarray, size: int) -> np.ndarray:
    """Colony pixel count of every ``size`` window: (H - S + 1, W - S + 1) int32."""
    ii = cv2.integral(np.ascontiguousarray(mask).view(np.uint8), sdepth=cv2.CV_32S)
    s = size
    return ii[s:, s:] - ii[:-s, s:] - ii[s:, :-s] + ii[:-s, :-s]


def _min_count(min_foreground: float, area: int) -> int:
    """Smallest integer k with ``k / area >= min_foreground`` in float arithmetic, so the
    integer test agrees exactly with :func:`foreground_fraction`."""
    k = max(0, math.ceil(min_foreground * area))
    while k <= area and k / area < min_foreground:
        k += 1
    while k > 0 and (k - 1) / area >= min_foreground:
        k -= 1
    return k


def _check_fits(shape: tuple[int, ...], size: int) -> None:
    if len(shape) != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {shape}")
    if shape[0] < size or shape[1] < size:
        raise ValueError(f"crop {shape} is smaller than the {size} px window; "
                         "call prepare_crop(image, mask, geometry.size) first")


#: Random candidates tried before the full O(H W) enumeration of valid positions.
_REJECTION_TRIES = 24


class _Sampler:
    """Draws valid window positions of one prepared mask, uniformly.

    First by rejection: uniform candidates over all positions, the first valid one kept
    (exactly uniform over the valid set, and cheap when the colony fills the crop). When
    ``_REJECTION_TRIES`` candidates all fail, every position's colony count is computed
    once from an integral image and later draws pick from that list.
    """

    def __init__(self, mask: np.ndarray, geometry: PatchGeometry):
        _check_fits(mask.shape, geometry.size)
        self.mask = _as_bool(mask)
        self.size = geometry.size
        self.need = _min_count(geometry.min_foreground, geometry.size ** 2)
        h, w = mask.shape
        self.ny, self.nx = h - self.size + 1, w - self.size + 1
        self._valid: np.ndarray | None = None
        self._fallback: np.ndarray | None = None

    def _enumerate(self) -> None:
        s, c = self.size, self.size // 2
        self._counts = _window_counts(self.mask, s)
        self._centre_in = self.mask[c:c + self.ny, c:c + self.nx]
        self._valid = np.flatnonzero(self._centre_in & (self._counts >= self.need))

    def _fallback_pool(self) -> np.ndarray:
        """Highest colony count among centres in the colony, else highest overall."""
        if self._fallback is None:
            counts = self._counts.ravel()
            centre_in = np.flatnonzero(self._centre_in)
            pool = centre_in if centre_in.size else np.arange(counts.size)
            best = counts[pool].max()
            self._fallback = pool[counts[pool] == best]
        return self._fallback

    def _try_rejection(self, rng: np.random.Generator) -> tuple[int, int] | None:
        s, c = self.size, self.size // 2
        ys = rng.integers(0, self.ny, _REJECTION_TRIES)
        xs = rng.integers(0, self.nx, _REJECTION_TRIES)
        centre_in = self.mask[ys + c, xs + c]
        for y, x in zip(ys[centre_in].tolist(), xs[centre_in].tolist()):
            if np.count_nonzero(self.mask[y:y + s, x:x + s]) >= self.need:
                return y, x
        return None

    def draw(self, rng: np.random.Generator, scale: float) -> tuple[PatchCoord, bool]:
        if self._valid is None:
            hit = self._try_rejection(rng)
            if hit is not None:
                return PatchCoord(x=hit[1], y=hit[0], scale=scale), True
            self._enumerate()
        met = self._valid.size > 0
        pool = self._valid if met else self._fallback_pool()
        i = int(pool[rng.integers(pool.size)])
        y, x = divmod(i, self.nx)
        if not met:
            log.debug("no window meets the colony constraints; fallback at x=%d y=%d", x, y)
        return PatchCoord(x=x, y=y, scale=scale), met


def sample_coord(mask_bool: np.ndarray, geometry: PatchGeometry, rng: np.random.Generator, *,
                 scale: float = 1.0) -> tuple[PatchCoord, bool]:
    """A random window position in a prepared mask, uniform among valid positions.

    Valid: the window lies inside the crop, its centre pixel is colony and its colony
    fraction is ``>= geometry.min_foreground``. Returns ``(coord, met)``; ``met`` is False
    when no position is valid and the fallback was used: the highest colony fraction
    among windows centred in the colony, else overall (ties drawn uniformly). ``scale``
    is stamped into the coordinate: pass the factor :func:`prepare_crop` returned.
    """
    return _Sampler(mask_bool, geometry).draw(rng, scale)


def centre_coord(mask_bool: np.ndarray, geometry: PatchGeometry, *, scale: float = 1.0) -> PatchCoord:
    """The deterministic test patch of a prepared mask.

    The window is centred on the mask's centre of mass; when that pixel is not colony
    (a ring, a crescent), on the nearest colony pixel that can be a window centre. The
    window is clamped to lie inside the crop. An empty mask gives the crop's centre.
    """
    _check_fits(mask_bool.shape, geometry.size)
    mask_bool = _as_bool(mask_bool)
    s = geometry.size
    c = s // 2
    h, w = mask_bool.shape
    ys, xs = np.nonzero(mask_bool)
    if ys.size == 0:
        cy, cx = h // 2, w // 2
    else:
        my, mx = float(ys.mean()), float(xs.mean())
        cy, cx = int(round(my)), int(round(mx))
        if not mask_bool[cy, cx]:
            # Prefer colony pixels that stay the window centre after clamping.
            usable = (ys >= c) & (ys <= h - s + c) & (xs >= c) & (xs <= w - s + c)
            if usable.any():
                ys, xs = ys[usable], xs[usable]
            i = int(np.argmin((ys - my) ** 2 + (xs - mx) ** 2))
            cy, cx = int(ys[i]), int(xs[i])
    y = min(max(cy - c, 0), h - s)
    x = min(max(cx - c, 0), w - s)
    return PatchCoord(x=x, y=y, scale=scale)


def foreground_fraction(mask_bool: np.ndarray, coord: PatchCoord, geometry: PatchGeometry) -> float:
    """Colony fraction of the ``S`` window at ``coord`` in a prepared mask, in [0, 1]."""
    s = geometry.size
    window = mask_bool[coord.y:coord.y + s, coord.x:coord.x + s]
    return int(np.count_nonzero(window)) / (s * s)


# ------------------------------------------------------------------------ pixels


def cut(image_u8: np.ndarray, coord: PatchCoord, geometry: PatchGeometry) -> np.ndarray:
    """The ``(S, S)`` uint8 window at ``coord`` of a prepared crop (a copy)."""
    s = geometry.size
    h, w = image_u8.shape[:2]
    if not (0 <= coord.x <= w - s and 0 <= coord.y <= h - s):
        raise ValueError(f"window x={coord.x} y={coord.y} side {s} does not fit the crop {image_u8.shape}; "
                         "was the crop prepared with the coordinate's scale?")
    return np.ascontiguousarray(image_u8[coord.y:coord.y + s, coord.x:coord.x + s])


def centre_crop(x: Any, side: int) -> Any:
    """The exact centre ``side x side`` of the last two axes of a numpy array or torch
    tensor (``(S, S)``, ``(1, S, S)`` or ``(B, 1, S, S)``); a view."""
    h, w = x.shape[-2], x.shape[-1]
    if side > h or side > w:
        raise ValueError(f"centre {side} px does not fit a {h}x{w} window")
    y0, x0 = (h - side) // 2, (w - side) // 2
    return x[..., y0:y0 + side, x0:x0 + side]


def to_scales(window: Any, geometry: PatchGeometry) -> list[Any]:
    """The network inputs of one window, one per ``geometry.scales``.

    ``window``: (S, S) uint8 numpy from :func:`cut` -> a list of ``(1, s, s)`` float32
    numpy arrays in [0, 1]. A float numpy array or torch tensor (``(1, S, S)`` or
    ``(B, 1, S, S)``, already in [0, 1], e.g. after augmentation) gives arrays/tensors of
    the same kind with the same leading axes. Each scale is the window's exact centre.
    """
    if isinstance(window, np.ndarray):
        if window.dtype == np.uint8:
            full = window.astype(np.float32) / np.float32(255.0)
        else:
            full = window.astype(np.float32, copy=False)
        if full.ndim == 2:
            full = full[None]
        return [full if s == full.shape[-1] and s == full.shape[-2]
                else np.ascontiguousarray(centre_crop(full, s)) for s in geometry.scales]
    # torch tensor (imported lazily: this module is useful without torch)
    full = window
    if full.dtype.is_floating_point is False:
        full = full.float().div_(255.0)
    if full.ndim == 2:
        full = full.unsqueeze(0)
    return [full if s == full.shape[-1] and s == full.shape[-2]
            else centre_crop(full, s).contiguous() for s in geometry.scales]


def sample_patches(image_u8: np.ndarray, mask_bool: np.ndarray, geometry: PatchGeometry,
                   rng: np.random.Generator, k: int = 1) -> list[tuple[PatchCoord, list[np.ndarray]]]:
    """``k`` random patches of one stored crop: prepare, draw, cut, split into scales.

    Returns ``[(coord, [(1, s, s) float32 in [0, 1] per scale]), ...]``. Draws that had to
    use the fallback are logged at debug level.
    """
    image, mask, scale = prepare_crop(image_u8, mask_bool, geometry.size, whole=geometry.whole)
    sampler = _Sampler(mask, geometry)
    out = []
    for _ in range(k):
        coord, _met = sampler.draw(rng, scale)
        out.append((coord, to_scales(cut(image, coord, geometry), geometry)))
    return out


def revisit(image_u8: np.ndarray, mask_bool: np.ndarray, coord: PatchCoord,
            geometry: PatchGeometry) -> list[np.ndarray]:
    """The same pixels as when ``coord`` was drawn: prepare the stored crop with
    ``coord.scale``, cut, split into scales (``(1, s, s)`` float32 in [0, 1] each)."""
    image, _mask, _ = prepare_crop(image_u8, mask_bool, geometry.size, scale=coord.scale, whole=geometry.whole)
    return to_scales(cut(image, coord, geometry), geometry)
