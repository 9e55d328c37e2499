"""Mask-constrained multi-scale patches: geometry, constraints, resize path, revisits."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from ipb_ray.patches import geometry as P
from ipb_ray.config import DataConfig
from ipb_ray.patches.geometry import (PatchCoord, PatchGeometry, centre_coord, centre_crop, cut, foreground_fraction,
                             prepare_crop, revisit, sample_coord, sample_patches, to_scales)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the seeded property test below still runs
    given = None

SMALL = PatchGeometry(size=64, scales=(64, 32))
SINGLE = PatchGeometry(size=48, scales=(48,))
MULTI = PatchGeometry(size=224, scales=(224, 112))


# ------------------------------------------------------------------ mask makers


def _blobs(rng, h, w):
    m = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(1, 4)):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(3, max(4, w // 2))), int(rng.integers(3, max(4, h // 2))))
        cv2.ellipse(m, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return m.astype(bool)


def _thin(rng, h, w):
    m = np.zeros((h, w), np.uint8)
    p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
    p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
    cv2.line(m, p0, p1, 1, int(rng.integers(1, 5)))
    return m.astype(bool)


def _border(rng, h, w):
    m = np.zeros((h, w), bool)
    side = rng.integers(4)
    k = int(rng.integers(1, max(2, min(h, w) // 2)))
    [m[:k], m[-k:], m[:, :k], m[:, -k:]][side][...] = True
    return m


def _ring(h, w, thickness=8):
    m = np.zeros((h, w), np.uint8)
    r = min(h, w) // 2 - 2
    cv2.circle(m, (w // 2, h // 2), r, 1, thickness)
    return m.astype(bool)


MAKERS = {"blobs": _blobs, "thin": _thin, "border": _border,
          "ring": lambda rng, h, w: _ring(h, w), "full": lambda rng, h, w: np.ones((h, w), bool),
          "empty": lambda rng, h, w: np.zeros((h, w), bool)}


def _texture(rng, h, w):
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def _reference_valid(mask, geometry):
    """Every window position's validity, computed independently of the module (cumsum)."""
    s = geometry.size
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    ii[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    counts = ii[s:, s:] - ii[:-s, s:] - ii[s:, :-s] + ii[:-s, :-s]
    c = s // 2
    centre_in = mask[c:c + counts.shape[0], c:c + counts.shape[1]]
    return centre_in & (counts / (s * s) >= geometry.min_foreground), centre_in


def _check_invariants(image, mask, geometry, seed):
    img2, m2, scale = prepare_crop(image, mask, geometry.size)
    s = geometry.size
    assert min(img2.shape) >= s and img2.shape == m2.shape and m2.dtype == bool
    assert (scale > 1.0) == (min(image.shape) < s)
    valid, centre_in = _reference_valid(m2, geometry)
    rng = np.random.default_rng(seed)
    coord, met = sample_coord(m2, geometry, rng, scale=scale)
    assert coord.scale == scale
    assert 0 <= coord.x <= img2.shape[1] - s and 0 <= coord.y <= img2.shape[0] - s
    assert met == bool(valid.any())
    centre = m2[coord.y + s // 2, coord.x + s // 2]
    if met:
        assert valid[coord.y, coord.x]
        assert centre
        assert foreground_fraction(m2, coord, geometry) >= geometry.min_foreground
    elif centre_in.any():
        assert centre  # the fallback still prefers a window centred in the colony
    views = to_scales(cut(img2, coord, geometry), geometry)
    assert [v.shape for v in views] == [(1, k, k) for k in geometry.scales]
    for v in views:
        assert v.dtype == np.float32 and v.min() >= 0.0 and v.max() <= 1.0
    for got, want in zip(revisit(image, mask, coord, geometry), views):
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------- geometry


def test_geometry_from_config():
    assert PatchGeometry.from_config(DataConfig()) == PatchGeometry(224, (224, 112), 0.25)
    single = PatchGeometry.from_config(DataConfig(multi_scale=False, min_foreground=0.4))
    assert single == PatchGeometry(128, (128,), 0.4)


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 64, "scales": (80,)}, "outside"),
    ({"size": 64, "scales": ()}, "empty"),
    ({"size": 0, "scales": (1,)}, "positive"),
    ({"size": 64, "scales": (64,), "min_foreground": 1.5}, "min_foreground"),
])
def test_geometry_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PatchGeometry(**kwargs)


def test_local_scale_is_the_exact_centre_of_the_global_window():
    rng = np.random.default_rng(0)
    image = _texture(rng, 400, 600)
    mask = _blobs(rng, 400, 600) | _ring(400, 600)
    (coord, (g, l)), = sample_patches(image, mask, MULTI, rng)
    assert g.shape == (1, 224, 224) and l.shape == (1, 112, 112)
    np.testing.assert_array_equal(l, g[:, 56:168, 56:168])
    window = image[coord.y:coord.y + 224, coord.x:coord.x + 224]
    np.testing.assert_array_equal(l[0], window[56:168, 56:168].astype(np.float32) / 255)


def test_to_scales_accepts_tensors_and_batches():
    window = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    arrays = to_scales(window, SMALL)
    tensors = to_scales(torch.from_numpy(arrays[0]), SMALL)
    assert all(isinstance(t, torch.Tensor) for t in tensors)
    for a, t in zip(arrays, tensors):
        np.testing.assert_array_equal(a, t.numpy())
    batch = to_scales(torch.from_numpy(np.stack([arrays[0]] * 3)), SMALL)
    assert [tuple(b.shape) for b in batch] == [(3, 1, 64, 64), (3, 1, 32, 32)]
    assert torch.equal(centre_crop(batch[0], 32), batch[1])


# ------------------------------------------------------------------ constraints


@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("geometry", [SMALL, SINGLE], ids=["ms64", "ss48"])
def test_constraints_hold_on_seeded_random_masks(kind, geometry):
    rng = np.random.default_rng(12345)
    for trial in range(40):
        h, w = int(rng.integers(20, 220)), int(rng.integers(20, 220))
        if trial < 5:  # tiny colonies, as small as the paper's smallest crops and below
            h, w = 30, 40
        mask = MAKERS[kind](rng, h, w)
        _check_invariants(_texture(rng, h, w), mask, geometry, seed=trial)


def test_constraints_hold_at_paper_scale():
    rng = np.random.default_rng(7)
    for trial in range(10):
        h, w = int(rng.integers(55, 500)), int(rng.integers(85, 700))
        _check_invariants(_texture(rng, h, w), _blobs(rng, h, w), MULTI, seed=trial)


if given is not None:
    @settings(max_examples=150, deadline=None)
    @given(h=st.integers(20, 160), w=st.integers(20, 160), kind=st.sampled_from(sorted(MAKERS)),
           seed=st.integers(0, 2**32 - 1), min_fg=st.sampled_from([0.0, 0.25, 0.6, 1.0]))
    def test_constraints_hold_property(h, w, kind, seed, min_fg):
        rng = np.random.default_rng(seed)
        geometry = PatchGeometry(size=40, scales=(40, 20), min_foreground=min_fg)
        _check_invariants(_texture(rng, h, w), MAKERS[kind](rng, h, w), geometry, seed)
else:
    def test_constraints_hold_property():
        pytest.skip("hypothesis is not installed; the seeded property test covers the same checks")


@pytest.mark.parametrize("tries", [0, P._REJECTION_TRIES], ids=["enumerate", "rejection"])
def test_draws_are_uniform_over_valid_positions(tries, monkeypatch):
    monkeypatch.setattr(P, "_REJECTION_TRIES", tries)
    mask = np.zeros((48, 48), bool)
    mask[:, :30] = True  # valid: centre column < 30, at least 25 % colony
    geometry = PatchGeometry(size=32, scales=(32,))
    valid, _ = _reference_valid(mask, geometry)
    rng = np.random.default_rng(3)
    hits = np.zeros_like(valid, dtype=int)
    for _ in range(8000):
        c, met = sample_coord(mask, geometry, rng)
        assert met
        hits[c.y, c.x] += 1
    assert not hits[~valid].any()
    expected = 8000 / valid.sum()
    assert hits[valid].min() > 0.5 * expected and hits[valid].max() < 1.6 * expected


def test_fallback_when_no_window_is_valid():
    mask = np.zeros((100, 100), bool)
    mask[50, 10:90] = True  # a thin line: never 25 % of a window
    geometry = PatchGeometry(size=64, scales=(64,))
    coord, met = sample_coord(mask, geometry, np.random.default_rng(0))
    assert not met and mask[coord.y + 32, coord.x + 32]
    coord, met = sample_coord(np.zeros((80, 90), bool), geometry, np.random.default_rng(0))
    assert not met and 0 <= coord.x <= 26 and 0 <= coord.y <= 16


def test_unprepared_crop_and_misplaced_window_are_rejected():
    with pytest.raises(ValueError, match="prepare_crop"):
        sample_coord(np.ones((30, 200), bool), SMALL, np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not fit"):
        cut(np.zeros((64, 64), np.uint8), PatchCoord(1, 0), SMALL)


# ------------------------------------------------------------------ resize path


def test_tiny_colony_is_resized_up_without_padding():
    rng = np.random.default_rng(11)
    image = rng.integers(40, 200, (40, 60), dtype=np.uint8)
    mask = np.zeros((40, 60), bool)
    cv2.ellipse(mask.view(np.uint8), (30, 20), (26, 17), 0, 0, 360, 1, -1)
    geometry = PatchGeometry(size=128, scales=(128, 64))
    img2, m2, scale = prepare_crop(image, mask, 128)
    assert scale == pytest.approx(3.2) and img2.shape == (128, 192) and m2.dtype == bool
    for coord, views in sample_patches(image, mask, geometry, rng, k=20):
        assert coord.scale == scale
        window = np.rint(views[0][0] * 255).astype(np.uint8)
        np.testing.assert_array_equal(window, img2[coord.y:coord.y + 128, coord.x:coord.x + 128])
        assert window.min() >= image.min() and window.max() <= image.max()  # no 0 fill
        assert not any(np.all(row == row[0]) for row in window)  # no constant runs
        for got, want in zip(revisit(image, mask, coord, geometry), views):
            np.testing.assert_array_equal(got, want)


def test_stored_scale_reproduces_the_preparation():
    rng = np.random.default_rng(5)
    image, mask = _texture(rng, 55, 85), np.ones((55, 85), bool)
    a = prepare_crop(image, mask, 224)
    b = prepare_crop(image, mask, 224, scale=a[2])
    assert min(a[0].shape) == 224
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    big = _texture(rng, 300, 300)
    assert prepare_crop(big, mask[:1, :1].repeat(300, 0).repeat(300, 1), 224)[2] == 1.0


# ------------------------------------------------------------- reproducibility


def test_same_seed_same_patches_different_seed_different_coords():
    rng = np.random.default_rng(0)
    image, mask = _texture(rng, 500, 700), np.ones((500, 700), bool)

    def draw(seed):
        return sample_patches(image, mask, MULTI, np.random.default_rng(seed), k=4)

    a, b = draw(42), draw(42)
    assert [c for c, _ in a] == [c for c, _ in b]
    for (_, va), (_, vb) in zip(a, b):
        for x, y in zip(va, vb):
            np.testing.assert_array_equal(x, y)
    coords = {tuple((c.x, c.y) for c, _ in draw(seed)) for seed in range(5)}
    assert len(coords) == 5


# ----------------------------------------------------------------- test patch


def test_centre_coord_is_deterministic_and_centred_on_a_disc():
    mask = np.zeros((300, 400), np.uint8)
    cv2.circle(mask, (180, 160), 120, 1, -1)
    mask = mask.astype(bool)
    a, b = centre_coord(mask, MULTI), centre_coord(mask, MULTI)
    assert a == b == PatchCoord(x=180 - 112, y=160 - 112)


def test_centre_coord_on_a_ring_or_crescent_lands_in_the_colony():
    rings = []
    for h, w, r in [(400, 400, 60), (360, 500, 80), (480, 640, 220)]:
        m = np.zeros((h, w), np.uint8)
        cv2.circle(m, (w // 2, h // 2), r, 1, 10)
        rings.append(m.astype(bool))
    crescent = np.zeros((360, 400), np.uint8)
    cv2.ellipse(crescent, (200, 250), (100, 100), 0, 200, 340, 1, 25)
    for mask in rings + [crescent.astype(bool)]:
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        assert not mask[int(round(ys.mean())), int(round(xs.mean()))]  # centre of mass outside
        assert mask[112:h - 111, 112:w - 111].any()  # some colony pixel can centre a window
        c = centre_coord(mask, MULTI)
        assert c == centre_coord(mask, MULTI)
        assert 0 <= c.x <= w - 224 and 0 <= c.y <= h - 224
        assert mask[c.y + 112, c.x + 112]


def test_centre_coord_stays_inside_the_crop_when_no_colony_pixel_can_be_the_centre():
    mask = _ring(230, 240, thickness=6)  # ring hugs the crop: no colony pixel can centre a window
    c = centre_coord(mask, MULTI)
    assert 0 <= c.x <= 240 - 224 and 0 <= c.y <= 230 - 224


def test_centre_coord_of_an_empty_mask_is_the_crop_centre():
    c = centre_coord(np.zeros((100, 140), bool), SMALL, scale=2.0)
    assert c == PatchCoord(x=70 - 32, y=50 - 32, scale=2.0)


# ------------------------------------------------------------------ whole-crop windows

WHOLE = PatchGeometry(size=64, scales=(64, 32), whole=True)


@pytest.mark.parametrize("shape", [(20, 30), (64, 64), (150, 90)])
def test_whole_window_is_the_whole_crop_stretched(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image[0, 0] = 255  # a corner pixel survives: nothing is cut away
    mask = np.zeros(shape, bool)  # no colony pixel at all: whole windows need none
    prepared, pmask, _ = prepare_crop(image, mask, 64, whole=True)
    assert prepared.shape == pmask.shape == (64, 64)
    coord, _ = sample_coord(pmask, WHOLE, rng)
    assert (coord.x, coord.y) == (0, 0) and centre_coord(pmask, WHOLE) == PatchCoord(0, 0, 1.0)
    [(drawn, scales)] = sample_patches(image, mask, WHOLE, rng)
    expected = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA if shape[0] * shape[1] > 4096
                          else cv2.INTER_LINEAR)
    np.testing.assert_array_equal(scales[0][0], expected.astype(np.float32) / 255.0)
    assert scales[1].shape == (1, 32, 32)
    np.testing.assert_array_equal(revisit(image, mask, drawn, WHOLE)[0], scales[0])


def test_inside_window_is_the_default_and_whole_is_a_config_choice():
    assert not PatchGeometry.from_config(DataConfig()).whole
    assert PatchGeometry.from_config(DataConfig(window="whole")).whole
    from ipb_ray.config import ConfigError

    with pytest.raises(ConfigError, match="inside, whole"):
        DataConfig(window="cells")
