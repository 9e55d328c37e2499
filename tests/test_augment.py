"""Augmentation: the paper's independent p=0.25 ops, reflection borders, UDA views, speed."""

from __future__ import annotations

import itertools
import time

import cv2
import numpy as np
import pytest
import torch

import torchvision.transforms.v2.functional as TF

from ipb_ray.patches.augment import (PAPER_OPS, STRONG_OPS, _brightness, _contrast, _sharpness, _strong_op, as_tensor,
                             paper_augment, strong_view, weak_strong, weak_view)
from ipb_ray.patches.geometry import PatchGeometry, centre_crop, cut, prepare_crop, sample_coord, to_scales


def _image(seed=0, size=32, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(1, size, size, generator=g)


def test_each_paper_op_fires_independently_with_p_025():
    rng = np.random.default_rng(2024)
    x = _image(size=16)
    n = 4000
    fired = np.array([[paper_augment(x, rng)[1][k] for k in PAPER_OPS] for _ in range(n)])
    rates = fired.mean(0)
    assert np.all(np.abs(rates - 0.25) < 0.03), dict(zip(PAPER_OPS, rates))
    for i, j in itertools.combinations(range(len(PAPER_OPS)), 2):
        joint = (fired[:, i] & fired[:, j]).mean()
        assert abs(joint - 0.0625) < 0.02, (PAPER_OPS[i], PAPER_OPS[j], joint)


def test_probability_extremes_and_flip_p():
    rng = np.random.default_rng(0)
    x = _image()
    out, fired = paper_augment(x, rng, p=0.0)
    assert not any(fired.values()) and torch.equal(out, x) and out is not x
    _, fired = paper_augment(x, rng, p=1.0)
    assert all(fired.values())
    rates = np.mean([[f["hflip"], f["rotate"]] for f in
                     (paper_augment(x, rng, flip_p=0.5)[1] for _ in range(2000))], axis=0)
    assert abs(rates[0] - 0.5) < 0.04 and abs(rates[1] - 0.25) < 0.04


def test_fired_flags_match_the_pixels():
    x = _image(3)
    for seed in range(50):
        out, fired = paper_augment(x, np.random.default_rng(seed))
        if fired == {"hflip": True, "vflip": False, "rotate": False, "jitter": False, "blur": False}:
            assert torch.equal(out, x.flip(-1))
        if not any(fired.values()):
            assert torch.equal(out, x)


def test_same_seed_same_output_and_input_untouched():
    x = _image(1, size=64)
    before = x.clone()
    for fn in (lambda r: paper_augment(x, r, p=0.9)[0], lambda r: weak_view(x, r), lambda r: strong_view(x, r)):
        a, b = fn(np.random.default_rng(9)), fn(np.random.default_rng(9))
        assert torch.equal(a, b)
        assert not torch.equal(fn(np.random.default_rng(10)), a)
    assert torch.equal(x, before)


def test_rotation_reflects_borders_no_black_corners():
    flat = torch.full((1, 64, 64), 0.5)
    rng = np.random.default_rng(0)
    for _ in range(50):  # brightness/contrast 0 -> factors exactly 1; blur of a constant is the constant
        out, fired = paper_augment(flat, rng, p=1.0, brightness=0.0, contrast=0.0)
        assert fired["rotate"]
        assert torch.allclose(out, flat, atol=1e-5)
    textured = _image(4, size=64, lo=0.2, hi=0.8)
    for _ in range(50):
        out, _ = paper_augment(textured, rng, p=1.0, brightness=0.0, contrast=0.0)
        assert out.min() >= 0.2 - 1e-5 and out.max() <= 0.8 + 1e-5


def test_outputs_stay_in_unit_range():
    rng = np.random.default_rng(5)
    x = (_image(5, size=48) > 0.5).float()  # only 0s and 1s: the harshest case for clamping
    for _ in range(200):
        for out in (paper_augment(x, rng, p=1.0)[0], weak_view(x, rng), strong_view(x, rng, n_ops=3)):
            assert out.dtype == torch.float32 and out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("op", STRONG_OPS)
@pytest.mark.parametrize("magnitude", [0.0, 0.5, 1.0])
def test_every_strong_op_keeps_shape_and_range(op, magnitude):
    x = _image(6, size=40)[0].numpy()
    before = x.copy()
    for sign in (-1, 1):
        out = _strong_op(x, op, magnitude, sign)
        assert out.shape == x.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("factor", [0.25, 0.8, 1.5, 1.9])
def test_jitter_ops_match_torchvision(factor):
    x = _image(7, size=40)
    a = x[0].numpy()
    for ours, theirs in [(_brightness, TF.adjust_brightness), (_contrast, TF.adjust_contrast),
                         (_sharpness, TF.adjust_sharpness)]:
        np.testing.assert_allclose(ours(a, factor), theirs(x, factor)[0].numpy(), atol=1e-5)


def test_weak_and_strong_views():
    rng = np.random.default_rng(8)
    x = _image(8, size=64)
    batch = torch.stack([_image(s, size=64) for s in range(4)])
    assert weak_view(x, rng).shape == (1, 64, 64) and strong_view(x, rng).shape == (1, 64, 64)
    assert weak_view(batch, rng).shape == (4, 1, 64, 64) and strong_view(batch, rng).shape == (4, 1, 64, 64)
    for _ in range(20):
        assert not torch.equal(strong_view(x, rng), x)
        # integer shifts with reflected borders only move existing pixels around
        w = weak_view(x, rng)
        assert set(w.flatten().tolist()) <= set(x.flatten().tolist())
    weak, strong = weak_strong(batch, rng)
    assert weak.shape == strong.shape == batch.shape
    out, fired = paper_augment(batch, rng)
    assert out.shape == batch.shape and all(v.shape == (4,) for v in fired.values())


def test_uint8_window_and_scales_after_augmentation():
    window = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    x = as_tensor(window)
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    out, _ = paper_augment(x, np.random.default_rng(1), p=1.0)
    big, small = to_scales(out, PatchGeometry(64, (64, 32)))
    assert torch.equal(small, centre_crop(big, 32)) and small.shape == (1, 32, 32)
    with pytest.raises(ValueError):
        as_tensor(np.zeros((3, 8, 8), np.uint8))


def test_per_sample_speed_224_multiscale():
    rng = np.random.default_rng(0)
    h, w = 400, 600
    image = rng.integers(0, 256, (h, w), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (w // 2 - 10, h // 2 - 10), 20, 0, 360, 1, -1)
    mask = mask.astype(bool)
    geometry = PatchGeometry(224, (224, 112))
    img, m, scale = prepare_crop(image, mask, geometry.size)

    def one():
        coord, _ = sample_coord(m, geometry, rng, scale=scale)
        window, _ = paper_augment(as_tensor(cut(img, coord, geometry)), rng)
        return to_scales(window, geometry)

    for _ in range(20):
        one()
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    per = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        weak_strong(torch.rand(1, 224, 224), rng)
    uda = (time.perf_counter() - t0) / n
    print(f"\nper-sample sample_coord+cut+paper_augment+to_scales (224/112, 400x600 colony): "
          f"{per * 1e3:.3f} ms; weak+strong view pair: {uda * 1e3:.3f} ms")
    assert per < 5e-3
