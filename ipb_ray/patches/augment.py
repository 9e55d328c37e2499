"""Patch augmentation: the paper's policy and the weak/strong views of UDA.

- :func:`paper_augment` (paper, "Augmentation"): horizontal flip, vertical flip,
  rotation in [0, 180] degrees, brightness/contrast jitter (factors 1 +- 0.5 and
  1 +- 0.75, the authors' code values) and a 3x3 Gaussian blur, each fired independently
  with probability 0.25.
- :func:`weak_view` / :func:`strong_view`: the pair the teacher's UDA consistency loss
  compares (MPL/UDA): flips plus a small translation, and a RandAugment-style policy for
  single-channel images followed by cutout.

Inputs are ``(1, S, S)`` or ``(B, 1, S, S)`` float32 torch tensors in [0, 1] on the CPU
(``(S, S)`` uint8 windows from :func:`ipb_ray.patches.geometry.cut` go through :func:`as_tensor`).
Augment the whole ``S`` window, then cut the centre scale
(:func:`ipb_ray.patches.geometry.to_scales` takes tensors), so both scales see the same
transform. Geometric ops reflect the border (OpenCV ``BORDER_REFLECT_101``): a rotated
patch never gets invented black corners. All randomness comes from the
``numpy.random.Generator`` passed in, and every call consumes the same number of draws
whichever ops fire, so a seed reproduces a draw exactly. Batches are augmented sample by
sample with independent draws. No Ray import.

The pixel work is numpy/OpenCV on ``(S, S)`` float32 planes, and tensors are wrapped
without copies at the edges. Torch's own elementwise ops would be natural here, but on a
224 px plane they split across intra-op threads, and on a busy Ray node (other workers
on every core) that made one augmentation take milliseconds instead of ~0.05 ms. The
ops follow torchvision's definitions (contrast blends with the image mean, sharpness
blends with the 13-weight smoothing kernel and keeps the border, ...); the tests check
the jitter ops against ``torchvision.transforms.v2.functional``.
"""

from __future__ import annotations

from typing import Any, Callable

import cv2
import numpy as np
import torch

from ipb_ray.patches.ops import STRONG_OPS

__all__ = [
    "PAPER_OPS",
    "STRONG_OPS",
    "as_tensor",
    "paper_augment",
    "configured_pair",
    "strong_view",
    "train_view",
    "weak_view",
    "weak_strong",
]

#: Ops of :func:`paper_augment`, in the order they are applied; keys of its ``fired`` dict.
PAPER_OPS = ("hflip", "vflip", "rotate", "jitter", "blur")


# What magnitude 1 means for each strong op (RandAugment's usual ranges).
_MAX_ROTATE_DEG = 30.0
_MAX_SHEAR = 0.3                # shear factor
_MAX_TRANSLATE = 0.3            # fraction of the side
_MAX_ENHANCE = 0.9              # contrast/brightness/sharpness factor 1 +- this
_MAX_POSTERIZE_DROP = 4         # bits dropped: 8 -> 4
_BLUR_SIGMA = (0.1, 2.0)        # torchvision GaussianBlur's default sigma range

_BORDER = cv2.BORDER_REFLECT_101

Rng = np.random.Generator
_SHARPEN_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


def _planes(x: Any) -> np.ndarray:
    """``x`` as a (B, S, S) float32 numpy array in [0, 1] (no copy for a float32 CPU
    tensor); uint8 is divided by 255."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / np.float32(255.0)
    elif a.dtype != np.float32:
        a = a.astype(np.float32)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    elif not (a.ndim == 3 and a.shape[0] == 1):
        raise ValueError(f"expected (S, S), (1, S, S) or (B, 1, S, S), got {tuple(a.shape)}")
    return a


def as_tensor(window: Any) -> torch.Tensor:
    """A window as a ``(1, S, S)`` (or ``(B, 1, S, S)``) float32 tensor in [0, 1].

    uint8 numpy/tensor input is divided by 255; float input is taken as already in [0, 1];
    a 2-D input gets the channel axis.
    """
    if not isinstance(window, (np.ndarray, torch.Tensor)):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(window).__name__}")
    batched = window.ndim == 4
    a = _planes(window)
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.unsqueeze(1) if batched else t


def _per_sample(fn: Callable[..., tuple[np.ndarray, Any]], x: Any, rng: Rng,
                **kwargs: Any) -> tuple[torch.Tensor, list[Any]]:
    """Apply a single-plane ``fn`` to one image or to each image of a batch, in order;
    the result has the input's layout ((1, S, S) or (B, 1, S, S))."""
    batched = getattr(x, "ndim", 0) == 4
    planes = _planes(x)
    outs, infos = [], []
    for plane in planes:
        out, info = fn(plane, rng, **kwargs)
        outs.append(out)
        infos.append(info)
    stacked = torch.from_numpy(np.stack(outs))
    return (stacked.unsqueeze(1) if batched else stacked), infos


def _clip(a: np.ndarray) -> np.ndarray:
    return np.clip(a, 0.0, 1.0, out=a)


def _warp(a: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    h, w = a.shape
    return cv2.warpAffine(a, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=_BORDER)


def _rotate(a: np.ndarray, degrees: float) -> np.ndarray:
    h, w = a.shape
    return _warp(a, cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0))


def _shear(a: np.ndarray, factor: float, axis: str) -> np.ndarray:
    h, w = a.shape
    if axis == "x":  # x' = x + f (y - cy)
        m = np.array([[1.0, factor, -factor * (h - 1) / 2.0], [0.0, 1.0, 0.0]])
    else:            # y' = y + f (x - cx)
        m = np.array([[1.0, 0.0, 0.0], [factor, 1.0, -factor * (w - 1) / 2.0]])
    return _warp(a, m)


def _translate(a: np.ndarray, dx: float, dy: float) -> np.ndarray:
    return _warp(a, np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]]))


def _brightness(a: np.ndarray, factor: float) -> np.ndarray:
    return _clip(a * np.float32(factor))


def _contrast(a: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image mean (torchvision's adjust_contrast for one channel)."""
    f = np.float32(factor)
    return _clip(a * f + np.float32(1.0 - factor) * a.mean(dtype=np.float32))


def _sharpness(a: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a smoothed copy whose 1 px border is the image itself (torchvision/PIL)."""
    smooth = a.copy()
    smooth[1:-1, 1:-1] = cv2.filter2D(a, -1, _SHARPEN_KERNEL, borderType=_BORDER)[1:-1, 1:-1]
    f = np.float32(factor)
    return _clip(a * f + smooth * np.float32(1.0 - factor))


def _to_u8(a: np.ndarray) -> np.ndarray:
    return np.rint(a * 255.0).clip(0, 255).astype(np.uint8)


def _from_u8(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) / np.float32(255.0)


# ------------------------------------------------------------------ paper policy


def _paper_one(a: np.ndarray, rng: Rng, *, flip_p: float, brightness: float,
               contrast: float, blur_kernel: int, max_rotation: float, rot90: bool,
               rotate_p: float, jitter_p: float, blur_p: float) -> tuple[np.ndarray, dict[str, bool]]:
    # Fixed draw count, whatever fires: firing coins, then every op's parameter.
    coins = rng.random(len(PAPER_OPS))
    angle = rng.uniform(0.0, max_rotation)
    b = rng.uniform(max(0.0, 1.0 - brightness), 1.0 + brightness)
    c = rng.uniform(max(0.0, 1.0 - contrast), 1.0 + contrast)
    sigma = rng.uniform(*_BLUR_SIGMA)
    quarter_turns = int(rng.integers(0, 4)) if rot90 else 0
    probs = (flip_p, flip_p, rotate_p, jitter_p, blur_p)
    fired = {name: bool(u < q) for name, u, q in zip(PAPER_OPS, coins, probs)}

    out = a
    if fired["hflip"]:
        out = out[:, ::-1]
    if fired["vflip"]:
        out = out[::-1]
    if quarter_turns:
        out = np.rot90(out, quarter_turns)
    out = np.ascontiguousarray(out)
    if fired["rotate"]:
        out = _rotate(out, angle)
    if fired["jitter"]:
        out = _contrast(_brightness(out, b), c)
    if fired["blur"]:
        k = int(blur_kernel)
        out = cv2.GaussianBlur(out, (k, k), sigmaX=sigma, borderType=_BORDER)
    if out is a or np.shares_memory(out, a):
        out = out.copy()
    return _clip(out), fired


def paper_augment(x: Any, rng: Rng, p: float = 0.25, brightness: float = 0.5, contrast: float = 0.75,
                  blur_kernel: int = 3, max_rotation: float = 180.0,
                  flip_p: float | None = None, *, rot90: bool = False, rotate_p: float | None = None,
                  jitter_p: float | None = None, blur_p: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The paper's augmentation of a patch window.

    ``x``: (1, S, S) or (B, 1, S, S) float32 in [0, 1] (uint8 accepted). Each of
    :data:`PAPER_OPS` fires independently with probability ``p`` (flips with ``flip_p``,
    default ``p``; the authors' code flips with 0.5): flips, a rotation by an angle
    uniform in [0, ``max_rotation``] degrees with reflected borders, brightness then
    contrast factors uniform in [1 - b, 1 + b] and [1 - c, 1 + c], a ``blur_kernel``
    square Gaussian blur (sigma uniform in [0.1, 2]). ``rotate_p``, ``jitter_p`` and
    ``blur_p`` override ``p`` per op; ``rot90`` adds a rotation by a random multiple of 90
    degrees after the flips (lossless: with the flips, all 8 symmetries of the square).
    Returns a new float32 tensor (same
    shape, in [0, 1]; the input is never modified) and ``fired``: op name -> bool, or
    -> (B,) bool array for a batch.
    """
    flip_p = p if flip_p is None else flip_p
    out, infos = _per_sample(_paper_one, x, rng, flip_p=flip_p, brightness=brightness,
                             contrast=contrast, blur_kernel=blur_kernel, max_rotation=max_rotation, rot90=rot90,
                             rotate_p=p if rotate_p is None else rotate_p,
                             jitter_p=p if jitter_p is None else jitter_p, blur_p=p if blur_p is None else blur_p)
    if out.ndim == 3:
        return out, infos[0]
    return out, {name: np.array([i[name] for i in infos], dtype=bool) for name in PAPER_OPS}


# -------------------------------------------------------------- UDA weak/strong


def _weak_one(a: np.ndarray, rng: Rng, *, flip_p: float, max_translate: float) -> tuple[np.ndarray, None]:
    coins = rng.random(2)
    h, w = a.shape
    t = int(max_translate * min(h, w))
    dy, dx = (int(v) for v in rng.integers(-t, t + 1, size=2)) if t > 0 else (0, 0)
    out = a
    if coins[0] < flip_p:
        out = out[:, ::-1]
    if coins[1] < flip_p:
        out = out[::-1]
    if dy or dx:
        padded = cv2.copyMakeBorder(np.ascontiguousarray(out), t, t, t, t, _BORDER)
        out = padded[t - dy:t - dy + h, t - dx:t - dx + w]
    return np.array(out, dtype=np.float32, copy=True), None


def weak_view(x: Any, rng: Rng, flip_p: float = 0.5, max_translate: float = 0.125) -> torch.Tensor:
    """UDA's weak view: horizontal and vertical flips (each with ``flip_p``) and a shift by
    a whole number of px up to ``max_translate`` of the side in x and y, borders
    reflected. ``x``: (1, S, S) or (B, 1, S, S) float32 in [0, 1]; same shape out."""
    return _per_sample(_weak_one, x, rng, flip_p=flip_p, max_translate=max_translate)[0]


def _strong_op(a: np.ndarray, op: str, m: float, sign: int) -> np.ndarray:
    """One RandAugment op on an (S, S) float32 plane at magnitude ``m`` in [0, 1];
    ``sign`` picks the direction of the signed ops. May return ``a`` itself."""
    h, w = a.shape
    if op == "identity":
        return a
    if op == "autocontrast":
        lo, hi = float(a.min()), float(a.max())
        return (a - np.float32(lo)) / np.float32(hi - lo) if hi > lo else a
    if op == "equalize":
        return _from_u8(cv2.equalizeHist(_to_u8(a)))
    if op == "rotate":
        return _rotate(a, sign * m * _MAX_ROTATE_DEG)
    if op == "solarize":
        threshold = np.float32(1.0 - m)
        return np.where(a >= threshold, np.float32(1.0) - a, a)
    if op == "posterize":
        bits = 8 - int(round(m * _MAX_POSTERIZE_DROP))
        return _from_u8(_to_u8(a) & np.uint8((0xFF << (8 - bits)) & 0xFF))
    if op == "contrast":
        return _contrast(a, 1.0 + sign * m * _MAX_ENHANCE)
    if op == "brightness":
        return _brightness(a, 1.0 + sign * m * _MAX_ENHANCE)
    if op == "sharpness":
        return _sharpness(a, 1.0 + sign * m * _MAX_ENHANCE)
    if op == "shear_x":
        return _shear(a, sign * m * _MAX_SHEAR, "x")
    if op == "shear_y":
        return _shear(a, sign * m * _MAX_SHEAR, "y")
    if op == "translate_x":
        return _translate(a, sign * m * _MAX_TRANSLATE * w, 0.0)
    if op == "translate_y":
        return _translate(a, 0.0, sign * m * _MAX_TRANSLATE * h)
    raise ValueError(f"unknown strong op {op!r}; choose from {', '.join(STRONG_OPS)}")


def _strong_one(a: np.ndarray, rng: Rng, *, n_ops: int, magnitude: float | None,
                cutout: float, ops: tuple[str, ...], max_magnitude: float) -> tuple[np.ndarray, tuple[str, ...]]:
    h, w = a.shape
    picks = rng.integers(0, len(ops), size=n_ops)
    mags = rng.random(n_ops) * max_magnitude if magnitude is None else np.full(n_ops, float(magnitude))
    signs = rng.integers(0, 2, size=n_ops) * 2 - 1
    max_side = max(1, int(cutout * min(h, w)))
    side = int(rng.integers(1, max_side + 1))
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))

    out = a
    for i, m, sgn in zip(picks.tolist(), mags.tolist(), signs.tolist()):
        out = _strong_op(out, ops[i], m, sgn)
    out = np.array(out, dtype=np.float32, copy=True)  # never write into the caller's data
    if cutout > 0:
        y0, x0 = cy - side // 2, cx - side // 2
        out[max(0, y0):y0 + side, max(0, x0):x0 + side] = out.mean()
    return _clip(out), tuple(ops[i] for i in picks.tolist())


def strong_view(x: Any, rng: Rng, n_ops: int = 2, magnitude: float | None = None,
                cutout: float = 0.25, ops: tuple[str, ...] = STRONG_OPS,
                max_magnitude: float = 1.0) -> torch.Tensor:
    """UDA's strong view: RandAugment for single-channel images, then cutout.

    ``n_ops`` ops drawn with replacement from :data:`STRONG_OPS`, each at ``magnitude``
    in [0, 1] (a fraction of the op's range: rotate 30 degrees, shear 0.3, translate
    0.3 of the side, enhance factors 1 +- 0.9, solarize threshold 1 - m, posterize to
    8 - 4 m bits) or, when None, a magnitude uniform in [0, 1] per op; then a square of
    side uniform in [1, ``cutout`` * S] px at a random centre is filled with the image
    mean. ``x``: (1, S, S) or (B, 1, S, S) float32 in [0, 1]; same shape out, in [0, 1].
    ``ops`` restricts the ops drawn from (default all of :data:`STRONG_OPS`);
    ``max_magnitude`` caps a random magnitude (uniform in [0, max_magnitude]).
    """
    if not 0.0 <= cutout <= 1.0:
        raise ValueError(f"strong_view cutout={cutout!r} is a fraction of the side; use [0, 1]")
    if magnitude is not None and not 0.0 <= magnitude <= 1.0:
        raise ValueError(f"strong_view magnitude={magnitude!r} must lie in [0, 1] (or None for random)")
    unknown = [op for op in ops if op not in STRONG_OPS]
    if unknown or not ops:
        raise ValueError(f"strong_view ops {list(ops)}: unknown {unknown}; choose from {', '.join(STRONG_OPS)}")
    if not 0.0 <= max_magnitude <= 1.0:
        raise ValueError(f"strong_view max_magnitude={max_magnitude!r} must lie in [0, 1]")
    return _per_sample(_strong_one, x, rng, n_ops=n_ops, magnitude=magnitude, cutout=cutout, ops=tuple(ops),
                       max_magnitude=max_magnitude)[0]


def weak_strong(x: Any, rng: Rng, **strong_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The UDA pair of one window (or batch): ``(weak_view(x), strong_view(x))``."""
    x = as_tensor(x)
    return weak_view(x, rng), strong_view(x, rng, **strong_kwargs)


def train_view(x: Any, rng: Rng, aug: Any) -> torch.Tensor:
    """The configured weak (training) view: :func:`paper_augment` with the keys of an
    :class:`ipb_ray.config.AugmentConfig` ``aug``."""
    return paper_augment(x, rng, brightness=aug.brightness, contrast=aug.contrast, max_rotation=aug.max_rotation,
                         flip_p=aug.flip_p, rot90=aug.rot90, rotate_p=aug.rotate_p, jitter_p=aug.jitter_p,
                         blur_p=aug.blur_p)[0]


def configured_pair(x: Any, rng: Rng, aug: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """UDA's pair under an :class:`ipb_ray.config.AugmentConfig`: the configured weak
    (training) view, and the strong view of the same window: the weak view's geometry
    then RandAugment over ``aug.strong_ops`` at magnitudes up to
    ``aug.strong_max_magnitude``, then cutout."""
    x = as_tensor(x)
    weak = train_view(x, rng, aug)
    strong = strong_view(train_view(x, rng, aug), rng, n_ops=aug.strong_n_ops, cutout=aug.cutout,
                         ops=tuple(aug.strong_ops), max_magnitude=aug.strong_max_magnitude)
    return weak, strong
