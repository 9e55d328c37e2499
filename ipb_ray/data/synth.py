"""The synthetic colony world: the project's embedded default data set.

A seeded generator of phase-contrast-like frames that stand in for the paper's
2908 x 2908 px BioStation wells (shared/IPB.md, "The problem"). Every frame holds
colonies of the four morphological classes, plus multi-label colonies, in the
proportions of the paper's Table 1:

========= ===================================================================
Dense     small, tightly packed cells: a fine, uniform cobblestone texture
          (thin dark cell borders, bright cell centres)
Spread    larger, irregular cells: a coarser texture whose contrast varies
          across the colony
Diff      dark cell bodies with long thin neurites (persistent random walks)
Debris    round dark clumps, each with a bright phase-contrast halo
multi     one connected colony made of angular sectors of two (sometimes
          three) classes, e.g. partially spread or partially differentiated
========= ===================================================================

Design choices that keep the world honest for a texture classifier:

- A colony's mean brightness is drawn from one distribution shared by all classes
  (its texture is re-centred on that mean), so no class can be told from mean
  intensity; sizes and shapes differ by class but their ranges overlap.
- Dense and Spread are the two ends of one "maturity" continuum (cell size, border
  sharpness, unevenness) and draw overlapping maturity ranges, so some colonies are
  genuinely ambiguous, as real early/intermediate colonies are.
- The background is mid-grey with uneven illumination and faint fine noise: smooth
  enough that the paper's local-entropy segmentation (blur -> entropy -> Otsu ->
  opening -> fill -> size filter) separates it from the colonies, never flat.
  Small specks (floating cells, dust) are sprinkled on it; they are far below the
  2000 px size filter, as in real wells.
- Colonies lie fully inside the frame and never touch: a gap of
  :data:`COLONY_GAP_PX` separates their bounding circles, more than the
  segmentation's entropy window and opening can bridge. Every colony has at least
  :data:`MIN_COLONY_AREA_PX` pixels.

Determinism: every random choice of frame ``i`` comes from
``numpy.random.default_rng(SeedSequence([seed, i]))``, so frames can be generated
independently (in parallel) and the same seed gives byte-identical outputs.
Speed: textures are rendered only inside each colony's bounding box, and the
background is built at low resolution and upsampled; a 2908 x 2908 px frame takes
about 0.2 s on one core.

Conventions: images ``(H, W)`` uint8; instance masks ``(H, W)`` uint16, 0 is
background and ``k`` is colony ``k``; boxes ``(x0, y0, x1, y1)`` in pixels with
exclusive ends. Pure numpy/OpenCV: no Ray import here.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import cv2
import numpy as np

from ipb_ray.config import ConfigError

__all__ = [
    "ANNOTATIONS", "CLASS_NAMES", "COLONY_GAP_PX", "CSV_COLUMNS", "DEFAULT_CLASS_WEIGHTS", "EDGE_MARGIN_PX",
    "generate_frame", "is_world", "MAX_RADIUS_PX", "MIN_COLONY_AREA_PX", "MULTI",
    "MULTI_LABEL_COMBINATIONS", "sample_colony_classes", "SynthColony", "SynthConfig", "WORLD_FORMAT",
    "WORLD_MANIFEST", "WORLD_MARKER", "WORLD_VERSION", "WorldSummary", "write_world",
]

log = logging.getLogger(__name__)

#: The four morphological classes (sorted, as the catalog sorts them).
CLASS_NAMES = ("Debris", "Dense", "Diff", "Spread")
#: Key of the multi-label bin in class weights and counts.
MULTI = "multi"
#: Colony proportions of the paper's Table 1 (10506 Spread, 3934 Dense, 3587 Debris, 656 Diff,
#: 2659 multi-label of 21342), to three decimals so that they sum to exactly 1.
DEFAULT_CLASS_WEIGHTS = {"Spread": 0.492, "Dense": 0.184, "Debris": 0.168, "Diff": 0.031, MULTI: 0.125}
#: Label sets of multi-label colonies and their relative weights: mostly two classes,
#: "partially spread" and "partially differentiated" as in the paper, a few with three.
MULTI_LABEL_COMBINATIONS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("Dense", "Spread"), 0.38),
    (("Diff", "Spread"), 0.24),
    (("Dense", "Diff"), 0.20),
    (("Debris", "Spread"), 0.06),
    (("Debris", "Dense"), 0.04),
    (("Dense", "Diff", "Spread"), 0.08),
)

#: Format of world.json; bump when the layout of a world changes.
WORLD_FORMAT = "ipb-synth-world"
WORLD_VERSION = 1
WORLD_MANIFEST = "world.json"
#: Written first into a world directory, so a crashed run is still recognised as a world.
WORLD_MARKER = ".ipb-synth"
ANNOTATIONS = "annotations.csv"
CSV_COLUMNS = ("frame", "instance", "x0", "y0", "x1", "y1", "label", "labels", "multi_label",
               "area_px", "mask")

#: The segmentation step drops smaller objects (SegmentationConfig.min_object_px).
MIN_COLONY_AREA_PX = 2000
#: Colonies are drawn with at least this much area, so rasterising never loses one.
_AREA_SAFETY = 1.25
#: Background px between the bounding circles of two colonies: well beyond what the
#: entropy window (disk 3 after a 3x3 blur) and the opening can bridge.
COLONY_GAP_PX = 20
#: Background px between a colony and the frame border.
EDGE_MARGIN_PX = 12
#: Largest equivalent colony radius (px at colony_scale 1): crops up to ~800 px.
MAX_RADIUS_PX = 290.0
#: Placement attempts per colony, and how often a colony that does not fit is shrunk.
_PLACE_TRIES = 60
_SHRINK_STEPS = 4
_SHRINK_FACTOR = 0.8
#: Vertices of a colony outline.
_OUTLINE_VERTICES = 120
#: Background: frame-wide mean level range (grey), illumination and noise amplitudes.
_BG_LEVEL = (118.0, 148.0)
_BG_ILLUMINATION = 7.0         # std of the smooth illumination field, grey levels
_BG_VIGNETTE = 14.0            # darkening at the frame corners, grey levels
_BG_MOTTLE = 1.2               # std of the mid-frequency mottling, grey levels
_BG_NOISE_LEVELS = 5           # fine noise: uniform integers 0..4 (std ~1.4)
_BG_SPECKS_PER_MPX = 14.0
#: Colony mean brightness relative to the local background: one distribution for
#: every class (mean, std, clip range), plus a small per-class bias (grey levels).
_OFFSET = (-10.0, 11.0, (-42.0, 22.0))


@dataclass(frozen=True)
class _ClassStyle:
    """How colonies of one class are drawn: size (lognormal equivalent radius, px at
    colony_scale 1) and outline (harmonic irregularity, elongation)."""

    radius_median: float
    radius_sigma: float
    irregularity: float
    aspect_sigma: float
    offset_bias: float


_STYLES: dict[str, _ClassStyle] = {
    "Debris": _ClassStyle(62.0, 0.45, 0.06, 0.12, 1.0),
    "Dense": _ClassStyle(92.0, 0.50, 0.10, 0.18, -2.0),
    "Diff": _ClassStyle(105.0, 0.45, 0.16, 0.22, -3.0),
    "Spread": _ClassStyle(120.0, 0.50, 0.20, 0.25, 2.0),
    MULTI: _ClassStyle(140.0, 0.40, 0.15, 0.22, 0.0),
}


# --------------------------------------------------------------------------- config

def _as_weight_pairs(value: Any) -> tuple[tuple[str, float], ...]:
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = [tuple(p) for p in value]
    return tuple((str(k), float(w)) for k, w in items)


@dataclass(frozen=True)
class SynthConfig:
    """A synthetic world: how many frames, how large, how many colonies of which class.

    class_weights: ``(name, weight)`` pairs over :data:`CLASS_NAMES` and ``"multi"``
    (multi-label colonies), summing to 1; a dict is accepted and converted. Classes
    left out get weight 0. frame_height / frame_width override frame_size for
    non-square frames.
    """

    frames: int = 4
    frame_size: int = 2908
    colonies_per_frame: int = 30
    colony_scale: float = 1.0
    class_weights: tuple[tuple[str, float], ...] = tuple(DEFAULT_CLASS_WEIGHTS.items())
    pixel_size_um: float = 0.8
    image_format: str = "tif"
    seed: int = 0
    frame_height: int | None = None
    frame_width: int | None = None

    def __post_init__(self) -> None:
        def need_int(name: str, lo: int, hi: int, unit: str = "") -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
                raise ConfigError(f"{name}={value!r} is not allowed; use an integer in [{lo}, {hi}]{unit}",
                                  key=name)

        need_int("frames", 1, 100_000)
        need_int("frame_size", 128, 16_384, " px")
        for name in ("frame_height", "frame_width"):
            if getattr(self, name) is not None:
                need_int(name, 128, 16_384, " px (or leave it unset to use frame_size)")
        need_int("colonies_per_frame", 0, 10_000)
        need_int("seed", 0, 2**63 - 1)
        for name, lo, hi in (("colony_scale", 0.05, 10.0), ("pixel_size_um", 1e-3, 1e3)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ConfigError(f"{name}={value!r} is not allowed; use a number in [{lo:g}, {hi:g}]",
                                  key=name)
        if self.image_format not in ("tif", "png"):
            raise ConfigError(f"image_format={self.image_format!r} is not allowed; use 'tif' or 'png'",
                              key="image_format")
        try:
            pairs = _as_weight_pairs(self.class_weights)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"class_weights={self.class_weights!r} is not a mapping or list of "
                              f"(name, weight) pairs ({exc})", key="class_weights") from None
        object.__setattr__(self, "class_weights", pairs)
        allowed = (*CLASS_NAMES, MULTI)
        names = [n for n, _ in pairs]
        for name, weight in pairs:
            if name not in allowed:
                raise ConfigError(f"class_weights has unknown class {name!r}; allowed: "
                                  f"{', '.join(allowed)}", key="class_weights")
            if not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"class_weights[{name!r}]={weight!r} is not allowed; weights must be "
                                  "finite and >= 0", key="class_weights")
        if len(set(names)) != len(names):
            raise ConfigError(f"class_weights names a class twice: {names}", key="class_weights")
        total = sum(w for _, w in pairs)
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"class_weights sum to {total:g}; they must sum to 1 (e.g. "
                              f"{DEFAULT_CLASS_WEIGHTS})", key="class_weights")
        weights = dict(pairs)
        if weights.get(MULTI, 0.0) > 0 and not _multi_combinations(weights):
            raise ConfigError("class_weights gives multi-label colonies a weight but no multi-label "
                              "combination has all its classes weighted > 0; set 'multi' to 0 or "
                              "weight the classes", key="class_weights")

    @property
    def shape(self) -> tuple[int, int]:
        """Frame shape ``(H, W)`` in px."""
        return (self.frame_height or self.frame_size, self.frame_width or self.frame_size)

    @property
    def multi_label_fraction(self) -> float:
        """Expected fraction of multi-label colonies."""
        return dict(self.class_weights).get(MULTI, 0.0)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["class_weights"] = {k: w for k, w in self.class_weights}
        return out


@dataclass(frozen=True)
class SynthColony:
    """One colony of a synthetic frame.

    instance: its id in the frame's instance mask (1-based). bbox: ``(x0, y0, x1, y1)``
    px, exclusive ends, tight around its mask. label: the class, or None for a
    multi-label colony. labels: sorted label set (one entry for a single-label colony).
    area_px: mask pixels.
    """

    frame_index: int
    instance: int
    bbox: tuple[int, int, int, int]
    label: str | None
    labels: tuple[str, ...]
    area_px: int

    @property
    def multi_label(self) -> bool:
        return len(self.labels) > 1


@dataclass(frozen=True)
class WorldSummary:
    """What :func:`write_world` wrote: counts per class plus ``"multi_label"``."""

    out: Path
    frames: int
    colonies: int
    counts: dict[str, int]
    multi_label_combinations: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- class sampling

def _multi_combinations(weights: Mapping[str, float]) -> list[tuple[tuple[str, ...], float]]:
    """The multi-label combinations whose classes all have positive weight."""
    return [(combo, w) for combo, w in MULTI_LABEL_COMBINATIONS
            if all(weights.get(c, 0.0) > 0 for c in combo)]


def sample_colony_classes(n: int, rng: np.random.Generator,
                          class_weights: Mapping[str, float] | Iterable[tuple[str, float]]
                          = DEFAULT_CLASS_WEIGHTS) -> list[tuple[str, ...]]:
    """Draw ``n`` colony label sets: ``("Spread",)`` for a single-label colony, a sorted
    tuple of two or three classes for a multi-label one (weights of
    :data:`MULTI_LABEL_COMBINATIONS`, restricted to classes with positive weight)."""
    weights = dict(_as_weight_pairs(class_weights))
    bins = [(name,) for name in CLASS_NAMES] + [(MULTI,)]
    p = np.array([weights.get(b[0], 0.0) for b in bins], dtype=np.float64)
    if p.sum() <= 0:
        raise ValueError(f"class weights {weights} give no class a positive weight")
    picks = rng.choice(len(bins), size=n, p=p / p.sum())
    combos = _multi_combinations(weights)
    multi_picks: np.ndarray = np.zeros(0, dtype=np.int64)
    n_multi = int(np.count_nonzero(picks == len(bins) - 1))
    if n_multi:
        cp = np.array([w for _, w in combos], dtype=np.float64)
        multi_picks = rng.choice(len(combos), size=n_multi, p=cp / cp.sum())
    out: list[tuple[str, ...]] = []
    m = 0
    for k in picks:
        if k == len(bins) - 1:
            out.append(tuple(sorted(combos[multi_picks[m]][0])))
            m += 1
        else:
            out.append(bins[k])
    return out


# --------------------------------------------------------------------------- noise helpers

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """``(h, w)`` float32 noise varying over ``cell`` px (std ~0.7), by cubic upsampling."""
    cell = max(float(cell), 1.0)
    gh, gw = int(math.ceil(h / cell)) + 4, int(math.ceil(w / cell)) + 4
    small = rng.standard_normal((gh, gw), dtype=np.float32)
    big = cv2.resize(small, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
    o = int(cell) * 2
    return big[o:o + h, o:o + w]


def _fine_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``(h, w)`` float32 pixel noise, std 1."""
    return rng.standard_normal((h, w), dtype=np.float32)


def _cell_pattern(rng: np.random.Generator, h: int, w: int, spacing: float, jitter: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Voronoi tessellation of jittered hexagonal seeds ``spacing`` px apart.

    Returns ``(labels, dist, border)``: the cell id per pixel (int32, 1..n), the
    distance to the cell's seed (float32, px) and the 1 px cell borders (float32 0/1).
    """
    rows = int(h / (spacing * 0.866)) + 3
    cols = int(w / spacing) + 3
    gy, gx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    x = (gx - 1 + 0.5 * (gy % 2)) * spacing + rng.uniform(-jitter, jitter, gx.shape) * spacing
    y = (gy - 1) * spacing * 0.866 + rng.uniform(-jitter, jitter, gy.shape) * spacing
    xi, yi = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    src = np.ones((h, w), np.uint8)
    src[yi[inside], xi[inside]] = 0
    dist, labels = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    border = np.zeros((h, w), np.float32)
    np.not_equal(labels[:, 1:], labels[:, :-1], out=border[:, 1:], casting="unsafe")
    border[1:] += labels[1:] != labels[:-1]
    np.minimum(border, 1.0, out=border)
    return labels, dist, border


# --------------------------------------------------------------------------- class textures
# Each returns an (h, w) float32 deviation from the colony's mean brightness (grey levels);
# it is re-centred inside the colony mask later, so only its structure matters.

def _texture_epithelial(rng: np.random.Generator, h: int, w: int, radius: float,
                        maturity: float) -> np.ndarray:
    """Dense and Spread are two ends of one continuum (``maturity`` 0 -> 1): cells grow
    from ~6 to ~22 px, bright centres give way to dark nuclei, sharp uniform borders to
    patchy ones, and the contrast becomes uneven across the colony. The classes draw
    overlapping maturity ranges, so colonies near the middle are genuinely ambiguous."""
    t = float(np.clip(maturity, 0.0, 1.0))
    spacing = (6.0 + 16.0 * t) * rng.uniform(0.9, 1.1)
    labels, dist, border = _cell_pattern(rng, h, w, spacing, 0.28 + 0.2 * t)
    n = int(labels.max()) + 1
    cell_tone = rng.normal(0.0, 6.0 + 8.0 * t, n).astype(np.float32)
    # Young colonies show every cell border; in spread ones many borders fade out.
    visible = np.clip(rng.uniform(0.0, 1.0, n) + (1.0 - 1.6 * t), 0.0, 1.0).astype(np.float32)
    border *= visible[labels]
    border = cv2.GaussianBlur(border, (3, 3), 0.6 + 0.5 * t)
    tex = cell_tone[labels]
    centre = np.exp(-(dist / np.float32((0.32 - 0.08 * t) * spacing)) ** 2)
    tex += np.float32(rng.uniform(10.0, 16.0) * (1.0 - t) - rng.uniform(10.0, 18.0) * t) * centre
    tex -= np.float32(rng.uniform(26.0, 34.0) * (1.0 - t) + rng.uniform(10.0, 18.0) * t) * border
    if t > 0.2:
        tex += np.float32(9.0 * t) * _smooth_noise(rng, h, w, 5.0)
    # Contrast wanders across the colony: barely when young, strongly when spread.
    amplitude = 1.0 + (0.1 + 0.8 * t) * _smooth_noise(rng, h, w, max(radius * 0.45, 10.0))
    np.clip(amplitude, 0.2, 1.8, out=amplitude)
    tex *= amplitude
    tex += np.float32(3.5 - 0.5 * t) * _fine_noise(rng, h, w)
    return tex


#: Maturity ranges of the Dense/Spread continuum; they overlap on purpose.
_DENSE_MATURITY = (0.0, 0.55)
_SPREAD_MATURITY = (0.42, 1.0)


def _texture_dense(rng: np.random.Generator, h: int, w: int, radius: float) -> np.ndarray:
    return _texture_epithelial(rng, h, w, radius, rng.uniform(*_DENSE_MATURITY))


def _texture_spread(rng: np.random.Generator, h: int, w: int, radius: float) -> np.ndarray:
    return _texture_epithelial(rng, h, w, radius, rng.uniform(*_SPREAD_MATURITY))


def _random_walk(rng: np.random.Generator, x: float, y: float, steps: int, step: float
                 ) -> np.ndarray:
    """Vertices of a persistent random walk (a curved neurite), ``(steps + 1, 2)`` int32."""
    heading = rng.uniform(0.0, 2.0 * math.pi) + np.cumsum(rng.normal(0.0, 0.3, steps))
    xs = x + np.concatenate([[0.0], np.cumsum(step * np.cos(heading))])
    ys = y + np.concatenate([[0.0], np.cumsum(step * np.sin(heading))])
    return np.stack([xs, ys], axis=1).round().astype(np.int32)


def _texture_diff(rng: np.random.Generator, h: int, w: int, radius: float) -> np.ndarray:
    tex = 4.0 * _fine_noise(rng, h, w)
    tex += 5.0 * _smooth_noise(rng, h, w, 3.0)
    tex += 6.0 * _smooth_noise(rng, h, w, 12.0)
    halo = np.zeros((h, w), np.float32)
    dark = np.zeros((h, w), np.float32)
    n_bodies = max(3, int(h * w / rng.uniform(600.0, 1500.0)))
    xs = rng.uniform(0, w, n_bodies)
    ys = rng.uniform(0, h, n_bodies)
    for x, y in zip(xs, ys):
        # Neurites: dark thin lines with bright flanks (phase contrast).
        lines = [_random_walk(rng, x, y, int(rng.integers(6, 22)), rng.uniform(4.0, 7.0))
                 for _ in range(int(rng.integers(1, 4)))]
        cv2.polylines(halo, lines, False, float(rng.uniform(8.0, 14.0)), thickness=3)
        cv2.polylines(dark, lines, False, float(rng.uniform(24.0, 38.0)), thickness=1)
    for x, y in zip(xs, ys):
        # Cell bodies: dark ellipses with a bright rim.
        a, b = rng.uniform(3.5, 7.5), rng.uniform(3.0, 5.5)
        angle = rng.uniform(0.0, 180.0)
        centre = (int(round(x)), int(round(y)))
        cv2.ellipse(halo, centre, (int(a + 2), int(b + 2)), angle, 0, 360, float(rng.uniform(14, 24)), -1)
        cv2.ellipse(dark, centre, (int(a), int(b)), angle, 0, 360, float(rng.uniform(40, 55)), -1)
    tex += cv2.GaussianBlur(halo - dark, (3, 3), 0.6)
    return tex


def _texture_debris(rng: np.random.Generator, h: int, w: int, radius: float) -> np.ndarray:
    tex = 5.0 * _fine_noise(rng, h, w)
    tex += 6.0 * _smooth_noise(rng, h, w, 3.0)
    r_lo = rng.uniform(2.5, 5.0)
    r_hi = r_lo + rng.uniform(4.0, 9.0)
    coverage = rng.uniform(0.6, 1.5)
    n = max(4, int(coverage * h * w / (math.pi * (0.5 * (r_lo + r_hi)) ** 2)))
    xs = rng.uniform(0, w, n).round().astype(int)
    ys = rng.uniform(0, h, n).round().astype(int)
    rs = rng.uniform(r_lo, r_hi, n)
    rim = rng.uniform(28.0, 48.0, n)
    core = rng.uniform(-42.0, -18.0, n)
    for x, y, r, bright, dark in zip(xs.tolist(), ys.tolist(), rs.tolist(), rim.tolist(), core.tolist()):
        # A round dark clump with a bright halo ring; later clumps overlap earlier ones.
        cv2.circle(tex, (x, y), int(r + 2.5), bright, -1)
        cv2.circle(tex, (x, y), int(r), dark, -1)
    tex = cv2.GaussianBlur(tex, (3, 3), 0.7)  # optics: no razor-sharp rims
    tex += 5.0 * _fine_noise(rng, h, w)
    return tex


_TEXTURES: dict[str, Callable[[np.random.Generator, int, int, float], np.ndarray]] = {
    "Debris": _texture_debris,
    "Dense": _texture_dense,
    "Diff": _texture_diff,
    "Spread": _texture_spread,
}


# --------------------------------------------------------------------------- colony geometry

@dataclass
class _Plan:
    labels: tuple[str, ...]
    outline: np.ndarray          # (V, 2) float64 vertices around (0, 0), px
    rmax: float                  # largest vertex distance from (0, 0), px
    radius: float                # equivalent radius sqrt(area / pi), px
    cx: float = 0.0
    cy: float = 0.0


def _style(labels: tuple[str, ...]) -> _ClassStyle:
    return _STYLES[labels[0]] if len(labels) == 1 else _STYLES[MULTI]


def _outline(rng: np.random.Generator, radius: float, style: _ClassStyle) -> np.ndarray:
    """An irregular blob: a circle perturbed by a smooth random radial function, stretched
    and rotated, scaled to area pi * radius². Star-shaped around (0, 0), so angular
    sectors of it are connected. Returns ``(V, 2)`` float64 vertices."""
    theta = np.linspace(0.0, 2.0 * math.pi, _OUTLINE_VERTICES, endpoint=False)
    k = np.arange(2, 9, dtype=np.float64)[:, None]
    amp = rng.normal(0.0, style.irregularity, (len(k), 1)) / k ** 0.8
    phase = rng.uniform(0.0, 2.0 * math.pi, (len(k), 1))
    r = 1.0 + (amp * np.cos(k * theta + phase)).sum(axis=0)
    r = np.clip(r, 0.45, None)
    aspect = float(np.clip(np.exp(rng.normal(0.0, style.aspect_sigma)), 0.6, 1.7))
    x = r * np.cos(theta) * math.sqrt(aspect)
    y = r * np.sin(theta) / math.sqrt(aspect)
    rot = rng.uniform(0.0, math.pi)
    c, s = math.cos(rot), math.sin(rot)
    pts = np.stack([c * x - s * y, s * x + c * y], axis=1)
    area = 0.5 * abs(np.dot(pts[:, 0], np.roll(pts[:, 1], 1)) - np.dot(pts[:, 1], np.roll(pts[:, 0], 1)))
    return pts * (radius * math.sqrt(math.pi / area))


def _min_radius() -> float:
    return math.sqrt(MIN_COLONY_AREA_PX * _AREA_SAFETY / math.pi)


def _plan_colony(rng: np.random.Generator, labels: tuple[str, ...], scale: float,
                 max_radius: float) -> _Plan:
    style = _style(labels)
    radius = style.radius_median * math.exp(rng.normal(0.0, style.radius_sigma)) * scale
    radius = float(np.clip(radius, _min_radius(), max(MAX_RADIUS_PX * scale, _min_radius())))
    outline = _outline(rng, radius, style)
    plan = _Plan(labels, outline, float(np.hypot(outline[:, 0], outline[:, 1]).max()), radius)
    if plan.rmax > max_radius:  # would not fit the frame at all
        _shrink(plan, max_radius / plan.rmax)
    return plan


def _shrink(plan: _Plan, factor: float) -> None:
    plan.outline *= factor
    plan.rmax *= factor
    plan.radius *= factor


def _place(rng: np.random.Generator, plans: list[_Plan], shape: tuple[int, int]) -> list[_Plan]:
    """Place colonies largest first at random non-touching positions; a colony that finds
    no room is shrunk a few times (keeping the class mix), then dropped."""
    height, width = shape
    placed: list[_Plan] = []
    centres = np.zeros((0, 3))  # cx, cy, rmax
    for plan in sorted(plans, key=lambda p: -p.rmax):
        for _ in range(_SHRINK_STEPS + 1):
            lo = plan.rmax + EDGE_MARGIN_PX
            if 2 * lo < min(height, width):
                cx = rng.uniform(lo, width - lo, _PLACE_TRIES)
                cy = rng.uniform(lo, height - lo, _PLACE_TRIES)
                if len(centres):
                    d = np.hypot(cx[:, None] - centres[None, :, 0], cy[:, None] - centres[None, :, 1])
                    ok = np.all(d >= plan.rmax + centres[None, :, 2] + COLONY_GAP_PX, axis=1)
                else:
                    ok = np.ones(_PLACE_TRIES, bool)
                hit = np.flatnonzero(ok)
                if len(hit):
                    plan.cx, plan.cy = float(cx[hit[0]]), float(cy[hit[0]])
                    placed.append(plan)
                    centres = np.vstack([centres, [plan.cx, plan.cy, plan.rmax]])
                    break
            factor = max(_SHRINK_FACTOR, _min_radius() / plan.radius)
            if factor >= 1.0:
                break
            _shrink(plan, factor)
    return placed


def _sector_parts(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, k: int,
                  radius: float) -> np.ndarray:
    """Part index (uint8, 0..k-1) per pixel: k angular sectors around (cx, cy) with
    slightly wavy borders, each at least a quarter of the turn (two parts) or a fifth."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = np.arctan2(yy - np.float32(cy), xx - np.float32(cx))
    angle += 0.12 * _smooth_noise(rng, h, w, max(radius / 3.0, 6.0))
    start = rng.uniform(0.0, 2.0 * math.pi)
    lo = 0.3 if k == 2 else 0.2
    while True:
        share = rng.dirichlet(np.full(k, 4.0))
        if share.min() >= lo:
            break
    bounds = np.cumsum(share)[:-1] * 2.0 * math.pi
    turn = np.mod(angle - np.float32(start), np.float32(2.0 * math.pi))
    return np.searchsorted(bounds, turn.ravel()).reshape(h, w).astype(np.uint8)


# --------------------------------------------------------------------------- frame

def _frame_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _background(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Mid-grey phase-contrast background: uneven illumination, vignetting, faint mottling
    and fine pixel noise. ``(H, W)`` float32, built at 1/8 resolution and upsampled."""
    height, width = shape
    f = 8
    lh, lw = height // f + 2, width // f + 2
    level = rng.uniform(*_BG_LEVEL)
    illum = cv2.resize(rng.standard_normal((5, 5)).astype(np.float32), (lw, lh),
                       interpolation=cv2.INTER_CUBIC) * np.float32(_BG_ILLUMINATION)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    r2 = ((xx / lw - 0.5 - rng.uniform(-0.1, 0.1)) ** 2 + (yy / lh - 0.5 - rng.uniform(-0.1, 0.1)) ** 2) / 0.5
    low = np.float32(level) + illum - np.float32(_BG_VIGNETTE) * r2
    low += np.float32(_BG_MOTTLE) * rng.standard_normal((lh, lw), dtype=np.float32)
    img = cv2.resize(low, (lw * f, lh * f), interpolation=cv2.INTER_LINEAR)[:height, :width]
    img = np.ascontiguousarray(img)
    noise = rng.integers(0, _BG_NOISE_LEVELS, shape, dtype=np.uint8)
    img += noise
    return img


def _specks(rng: np.random.Generator, img: np.ndarray, placed: Sequence[_Plan]) -> None:
    """Tiny floating cells / dust on the background, far from every colony."""
    height, width = img.shape
    n = int(_BG_SPECKS_PER_MPX * height * width / 1e6)
    xs = rng.uniform(4, width - 4, n)
    ys = rng.uniform(4, height - 4, n)
    rs = rng.uniform(1.0, 3.5, n)
    if placed:
        c = np.array([(p.cx, p.cy, p.rmax) for p in placed])
        d = np.hypot(xs[:, None] - c[None, :, 0], ys[:, None] - c[None, :, 1]) - c[None, :, 2]
        keep = d.min(axis=1) > COLONY_GAP_PX + 10
        xs, ys, rs = xs[keep], ys[keep], rs[keep]
    for x, y, r in zip(xs.round().astype(int).tolist(), ys.round().astype(int).tolist(), rs.tolist()):
        base = float(img[y, x])
        cv2.circle(img, (x, y), int(r + 1.5), base + float(rng.uniform(15, 30)), -1)
        cv2.circle(img, (x, y), int(r), base - float(rng.uniform(15, 35)), -1)


@dataclass
class _Raster:
    """A placed colony rasterised: its mask inside a loose box, and its tight box."""

    plan: _Plan
    loose: tuple[int, int, int, int]     # x0, y0, x1, y1 of ``mask`` in the frame
    mask: np.ndarray                     # (y1 - y0, x1 - x0) uint8 0/1
    bbox: tuple[int, int, int, int]      # tight, exclusive ends
    area: int


def _rasterise(plan: _Plan, shape: tuple[int, int]) -> _Raster:
    height, width = shape
    x0 = max(int(math.floor(plan.cx - plan.rmax)) - 1, 0)
    y0 = max(int(math.floor(plan.cy - plan.rmax)) - 1, 0)
    x1 = min(int(math.ceil(plan.cx + plan.rmax)) + 2, width)
    y1 = min(int(math.ceil(plan.cy + plan.rmax)) + 2, height)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    pts = np.round((plan.outline + [plan.cx - x0, plan.cy - y0]) * 16).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=4)
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        return _Raster(plan, (x0, y0, x1, y1), mask, (x0, y0, x0, y0), 0)
    bbox = (x0 + int(xs[0]), y0 + int(ys[0]), x0 + int(xs[-1]) + 1, y0 + int(ys[-1]) + 1)
    return _Raster(plan, (x0, y0, x1, y1), mask, bbox, int(cv2.countNonZero(mask)))


def _paint_colony(rng: np.random.Generator, img: np.ndarray, instances: np.ndarray,
                  raster: _Raster, instance: int) -> None:
    """Texture one colony, re-centre it on a brightness drawn for it, and paint it."""
    plan, mask = raster.plan, raster.mask
    x0, y0, x1, y1 = raster.loose
    h, w = mask.shape
    radius = math.sqrt(raster.area / math.pi)
    style = _style(plan.labels)
    mean, std, (lo, hi) = _OFFSET
    offset = float(np.clip(rng.normal(mean + style.offset_bias, std), lo, hi))
    if len(plan.labels) == 1:
        tex = _TEXTURES[plan.labels[0]](rng, h, w, radius)
        tex -= np.float32(cv2.mean(tex, mask=mask)[0] - offset)
    else:
        parts = _sector_parts(rng, h, w, plan.cx - x0, plan.cy - y0, len(plan.labels), radius)
        order = rng.permutation(len(plan.labels)).tolist()  # which class gets which sector
        tex = np.zeros((h, w), np.float32)
        for part, k in enumerate(order):
            sub = _TEXTURES[plan.labels[k]](rng, h, w, radius)
            in_part = parts == part
            part_mask = (in_part & (mask > 0)).view(np.uint8)
            sub -= np.float32(cv2.mean(sub, mask=part_mask)[0] - offset - rng.normal(0.0, 4.0))
            np.copyto(tex, sub, where=in_part)
    # Bright phase-contrast halo along the colony edge.
    edge = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    tex += np.float32(rng.uniform(6.0, 22.0)) * np.exp(-edge / np.float32(1.8))
    inside = mask.view(bool)
    patch = img[y0:y1, x0:x1]
    np.add(patch, tex, out=patch, where=inside)
    np.copyto(instances[y0:y1, x0:x1], np.uint16(instance), where=inside)


def generate_frame(cfg: SynthConfig, index: int) -> tuple[np.ndarray, np.ndarray, list[SynthColony]]:
    """Generate frame ``index`` of the world ``cfg`` (independent of every other frame).

    Returns ``(image, instances, colonies)``: image ``(H, W)`` uint8; instances ``(H, W)``
    uint16 with 0 = background and ``k`` = colony ``k``; colonies sorted by instance,
    instance ids numbered 1..n in ``(y0, x0)`` order of their boxes (the order in which
    :func:`ipb_ray.data.segmentation.segment_frame` lists colonies).
    """
    rng = _frame_rng(cfg.seed, index)
    shape = cfg.shape
    label_sets = sample_colony_classes(cfg.colonies_per_frame, rng, dict(cfg.class_weights))
    max_radius = min(shape) / 2.0 - EDGE_MARGIN_PX - 1
    plans = [_plan_colony(rng, labels, cfg.colony_scale, max_radius) for labels in label_sets]
    placed = _place(rng, plans, shape)
    rasters = []
    for plan in placed:
        raster = _rasterise(plan, shape)
        if raster.area >= MIN_COLONY_AREA_PX:  # guaranteed by _AREA_SAFETY; checked anyway
            rasters.append(raster)
    if len(rasters) < len(plans):
        log.warning("frame %d: only %d of %d colonies fit a %dx%d frame; lower colonies_per_frame "
                    "or colony_scale", index, len(rasters), len(plans), shape[1], shape[0])
    rasters.sort(key=lambda r: (r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]))
    img = _background(rng, shape)
    _specks(rng, img, placed)
    instances = np.zeros(shape, np.uint16)
    colonies: list[SynthColony] = []
    for instance, raster in enumerate(rasters, start=1):
        _paint_colony(rng, img, instances, raster, instance)
        labels = tuple(sorted(raster.plan.labels))
        colonies.append(SynthColony(frame_index=index, instance=instance, bbox=raster.bbox,
                                    label=labels[0] if len(labels) == 1 else None,
                                    labels=labels, area_px=raster.area))
    np.clip(img, 0.0, 255.0, out=img)
    image = cv2.convertScaleAbs(img)
    return image, instances, colonies


# --------------------------------------------------------------------------- world on disk

def is_world(path: str | Path) -> bool:
    """Whether ``path`` holds a synthetic world (complete, or one a crashed run left)."""
    path = Path(path)
    if (path / WORLD_MARKER).is_file():
        return True
    manifest = path / WORLD_MANIFEST
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text()).get("format") == WORLD_FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    return False


def _write_bytes(path: Path, data: bytes) -> None:
    """Write atomically: a temporary file next to the target, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _encode_frame(image: np.ndarray, image_format: str) -> bytes:
    if image_format == "png":
        ok, buf = cv2.imencode(".png", image)
        if not ok:
            raise OSError("PNG encoding of a frame failed")
        return buf.tobytes()
    import tifffile

    out = io.BytesIO()
    tifffile.imwrite(out, image, photometric="minisblack")
    return out.getvalue()


def _encode_mask(instances: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", instances, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError("PNG encoding of an instance mask failed")
    return buf.tobytes()


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_world(out):
        raise FileExistsError(f"{out} is not empty and is not a synthetic world (no {WORLD_MANIFEST}); "
                              "refusing to write into it: choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / WORLD_MARKER).write_text("a synthetic colony world written by ipb_ray.data.synth\n")
    # Incomplete from here on: the manifest goes first, stale frames of an older world next.
    (out / WORLD_MANIFEST).unlink(missing_ok=True)
    (out / ANNOTATIONS).unlink(missing_ok=True)
    for sub, pattern in (("frames", "frame_*.*"), ("masks", "frame_*.png")):
        folder = out / sub
        folder.mkdir(exist_ok=True)
        for stale in folder.glob(pattern):
            stale.unlink()


def write_world(cfg: SynthConfig, out: str | Path,
                progress: Callable[[int, int], None] | None = None) -> WorldSummary:
    """Generate every frame of ``cfg`` and write the world to ``out``::

        out/frames/frame_0000.tif   8-bit grayscale frames (.png with image_format="png")
        out/masks/frame_0000.png    uint16 instance masks (0 = background, k = colony k)
        out/annotations.csv         one row per colony (paths relative to out/)
        out/world.json              config, counts; written last: present = complete

    ``out`` must be new, empty, or an earlier world (which is replaced). ``progress(done,
    total)`` is called after each frame. Returns a :class:`WorldSummary`.
    """
    out = Path(out)
    _prepare_out(out)
    rows: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    combos: Counter[str] = Counter()
    for index in range(cfg.frames):
        image, instances, colonies = generate_frame(cfg, index)
        frame_rel = f"frames/frame_{index:04d}.{cfg.image_format}"
        mask_rel = f"masks/frame_{index:04d}.png"
        _write_bytes(out / frame_rel, _encode_frame(image, cfg.image_format))
        _write_bytes(out / mask_rel, _encode_mask(instances))
        for c in colonies:
            rows.append({"frame": frame_rel, "instance": c.instance, "x0": c.bbox[0], "y0": c.bbox[1],
                         "x1": c.bbox[2], "y1": c.bbox[3], "label": c.label or "",
                         "labels": ";".join(c.labels), "multi_label": int(c.multi_label),
                         "area_px": c.area_px, "mask": mask_rel})
            if c.multi_label:
                counts["multi_label"] += 1
                combos["+".join(c.labels)] += 1
            else:
                counts[c.labels[0]] += 1
        if progress is not None:
            progress(index + 1, cfg.frames)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_bytes(out / ANNOTATIONS, buf.getvalue().encode())
    count_dict = {name: counts.get(name, 0) for name in (*CLASS_NAMES, "multi_label")}
    manifest = {
        "format": WORLD_FORMAT,
        "version": WORLD_VERSION,
        "generator": "ipb_ray.synth",  # an on-disk identifier: keep
        "config": cfg.to_dict(),
        "frames": cfg.frames,
        "colonies": len(rows),
        "class_names": list(CLASS_NAMES),
        "counts": count_dict,
        "multi_label_combinations": dict(sorted(combos.items())),
        "annotations": ANNOTATIONS,
    }
    _write_bytes(out / WORLD_MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    log.info("synthetic world: %d frames, %d colonies in %s", cfg.frames, len(rows), out)
    return WorldSummary(out=out, frames=cfg.frames, colonies=len(rows), counts=count_dict,
                        multi_label_combinations=dict(sorted(combos.items())))
