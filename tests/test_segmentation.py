"""Colony segmentation: each step against its scikit-image/SciPy oracle, the fast pipeline
against the reference one, frame reading, and the agreement helpers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipb_ray.config import SegmentationConfig
from ipb_ray.data.segmentation import (
    Colony,
    FrameError,
    _disk,
    _fill_holes,
    _open,
    box_iou,
    box_iou_matrix,
    load_frame,
    local_entropy,
    mask_iou,
    match_colonies,
    otsu_threshold,
    reference_segment,
    segment_frame,
    to_uint8,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HIPSC_DIR = SHARED_DATA / "hipsc_brightfield"
BCCD_DIR = SHARED_DATA / "bccd" / "JPEGImages"


def blob_frame(shape: tuple[int, int], blobs: list[tuple[int, int, int]], seed: int = 0,
               hole: tuple[int, int, int] | None = None) -> np.ndarray:
    """Smooth, slightly noisy background with rough-textured disks ``(cx, cy, radius)``;
    ``hole`` is a smooth disk cut out of a textured one (a colony with a hole)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    image = 110.0 + 30.0 * xx / w + rng.normal(0.0, 0.7, shape)
    for cx, cy, r in blobs:
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        image[inside] = 120.0 + rng.normal(0.0, 35.0, int(inside.sum()))
    if hole is not None:
        cx, cy, r = hole
        image[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 125.0
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def disk_box(cx: int, cy: int, r: int) -> tuple[int, int, int, int]:
    return (cx - r, cy - r, cx + r + 1, cy + r + 1)


# --------------------------------------------------------------------------- steps vs oracles

@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (9, 40), (300, 37), (40, 300)])
@pytest.mark.parametrize("radius", [1, 2, 3, 4])
def test_local_entropy_matches_skimage(shape, radius):
    from skimage.filters.rank import entropy
    from skimage.morphology import disk

    rng = np.random.default_rng(radius)
    # Few grey levels so that windows hold repeats (the counting path), plus full range.
    for image in (rng.integers(0, 6, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8)):
        got = local_entropy(image, radius)
        want = entropy(image, disk(radius))
        assert got.dtype == np.float32 and got.shape == shape
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_local_entropy_large_radius_falls_back_to_skimage():
    from skimage.filters.rank import entropy
    from skimage.morphology import disk

    image = np.random.default_rng(1).integers(0, 20, (50, 60), dtype=np.uint8)
    np.testing.assert_allclose(local_entropy(image, 6), entropy(image, disk(6)), atol=1e-5)


def test_disk_kernel_is_skimage_disk():
    from skimage.morphology import disk

    assert np.array_equal(_disk(3), disk(3))
    assert int(_disk(3).sum()) == 29


def test_otsu_matches_skimage():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(2)
    for values in (rng.normal(0, 1, 5000),
                   np.concatenate([rng.normal(1, 0.3, 3000), rng.normal(4, 0.5, 1000)]),
                   rng.integers(0, 5, (40, 50)).astype(np.float64)):
        assert otsu_threshold(values) == pytest.approx(threshold_otsu(values), abs=1e-5)
    assert otsu_threshold(np.full((4, 4), 2.5)) == 2.5


def test_opening_matches_skimage_at_borders_too():
    from skimage import morphology

    rng = np.random.default_rng(3)
    mask = rng.random((80, 90)) < 0.6
    got = _open(mask.view(np.uint8), 3).astype(bool)
    want = morphology.opening(mask, morphology.disk(3), mode="ignore")
    assert np.array_equal(got, want)


def test_fill_holes_matches_scipy():
    from scipy import ndimage

    rng = np.random.default_rng(4)
    for density in (0.3, 0.5, 0.7):
        mask = rng.random((60, 70)) < density
        got = _fill_holes(mask.view(np.uint8)).astype(bool)
        assert np.array_equal(got, ndimage.binary_fill_holes(mask))
    ring = np.zeros((20, 20), bool)
    ring[5:15, 5:15] = True
    ring[8:12, 8:12] = False
    assert _fill_holes(ring.view(np.uint8))[8:12, 8:12].all()


# --------------------------------------------------------------------------- pipeline

def test_segment_frame_finds_blobs_drops_small_and_fills_holes():
    blobs = [(70, 60, 40), (220, 70, 35), (150, 190, 45), (290, 200, 12)]  # the last is < 2000 px
    frame = blob_frame((256, 340), blobs, hole=(150, 190, 14))
    fg, colonies = segment_frame(frame, SegmentationConfig())
    assert fg.shape == frame.shape and fg.dtype == bool
    assert len(colonies) == 3
    truth = np.array([disk_box(*b) for b in blobs[:3]])
    assert match_colonies(truth, colonies, min_iou=0.8) == 1.0
    assert fg[190, 150], "the smooth hole inside a colony must be filled"
    assert not fg[200, 290], "a colony under min_object_px must be dropped"


def test_colony_fields_are_consistent():
    frame = blob_frame((256, 340), [(220, 70, 35), (70, 60, 40), (150, 190, 45)], seed=5)
    fg, colonies = segment_frame(frame)
    assert [c.index for c in colonies] == list(range(len(colonies)))
    keys = [(c.bbox[1], c.bbox[0]) for c in colonies]
    assert keys == sorted(keys)
    union = np.zeros_like(fg)
    for c in colonies:
        assert isinstance(c, Colony)
        x0, y0, x1, y1 = c.bbox
        assert c.mask.shape == (y1 - y0, x1 - x0) and c.mask.dtype == bool
        assert c.area_px == int(c.mask.sum()) >= 2000
        # the mask touches all four sides of its box
        assert c.mask[0].any() and c.mask[-1].any() and c.mask[:, 0].any() and c.mask[:, -1].any()
        union[y0:y1, x0:x1] |= c.mask
    assert np.array_equal(union, fg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        colonies[0].index = 7  # type: ignore[misc]


@pytest.mark.parametrize("cfg", [
    SegmentationConfig(),
    SegmentationConfig(opening_radius=0, fill_holes=False, min_object_px=0),
    SegmentationConfig(blur_ksize=5, entropy_radius=2, opening_radius=2, min_object_px=500),
])
def test_fast_agrees_with_reference_on_generated_frames(cfg):
    blobs = [(60, 70, 38), (200, 60, 30), (300, 180, 50), (120, 200, 42), (330, 40, 20)]
    frame = blob_frame((270, 400), blobs, seed=6, hole=(300, 180, 10))
    ref_fg, ref_col = reference_segment(frame, cfg)
    fg, col = segment_frame(frame, cfg)
    assert mask_iou(ref_fg, fg) >= 0.97
    assert match_colonies(ref_col, col, min_iou=0.9) >= 0.95
    assert [c.bbox for c in col] == [c.bbox for c in ref_col]


def test_degenerate_frames():
    for frame in (np.full((64, 64), 100, np.uint8), np.zeros((2, 2), np.uint8), np.array([[7]], np.uint8)):
        fg, colonies = segment_frame(frame)
        assert colonies == [] and not fg.any()
    with pytest.raises(ValueError, match="uint8"):
        segment_frame(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="empty"):
        segment_frame(np.zeros((0, 8), np.uint8))


# --------------------------------------------------------------------------- reading frames

def test_to_uint8_conversions():
    img16 = np.array([[1000, 2000], [3000, 1000]], np.uint16)
    assert to_uint8(img16).tolist() == [[0, 128], [255, 0]]  # min-max per frame
    assert to_uint8(np.array([[True, False]])).tolist() == [[255, 0]]
    assert to_uint8(np.array([[0.25, 0.75]])).tolist() == [[0, 255]]
    assert to_uint8(np.full((3, 3), 7, np.uint16)).max() == 0
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 1] = 200
    assert to_uint8(rgb).tolist() == [[117, 117], [117, 117]]  # 0.587 * 200
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 9, np.uint8)], axis=2)
    assert np.array_equal(to_uint8(rgba), to_uint8(rgb))
    assert to_uint8(np.ones((4, 5, 1), np.uint8)).shape == (4, 5)
    with pytest.raises(FrameError, match="NaN"):
        to_uint8(np.array([[np.nan, 1.0]]))
    with pytest.raises(FrameError, match="pixel type"):
        to_uint8(np.array([["a"]]))
    with pytest.raises(FrameError, match="img.x: .*shape"):
        to_uint8(np.zeros((2, 3, 4, 5), np.uint8), name="img.x")


def test_load_frame_formats(tmp_path):
    rng = np.random.default_rng(7)
    gray = rng.integers(0, 256, (30, 40), dtype=np.uint8)

    Image.fromarray(gray).save(tmp_path / "g.png")
    assert np.array_equal(load_frame(tmp_path / "g.png"), gray)

    wide = (gray.astype(np.uint16) * 16 + 100)
    Image.fromarray(wide).save(tmp_path / "w16.png")
    got = load_frame(tmp_path / "w16.png")
    assert got.dtype == np.uint8 and got.min() == 0 and got.max() == 255
    assert np.array_equal(np.argsort(got, axis=None, kind="stable"),
                          np.argsort(wide, axis=None, kind="stable"))

    import tifffile
    tifffile.imwrite(tmp_path / "w16.tif", wide)
    assert np.array_equal(load_frame(tmp_path / "w16.tif"), got)
    rgb16 = np.stack([wide, wide, wide], axis=2)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    assert np.array_equal(load_frame(tmp_path / "rgb16.tif"), got)

    rgb = np.stack([gray, gray, gray], axis=2)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert np.array_equal(load_frame(tmp_path / "c.png"), gray)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "c4.png")
    assert np.array_equal(load_frame(tmp_path / "c4.png"), gray)

    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    jpg = load_frame(tmp_path / "c.jpg")
    assert jpg.shape == gray.shape and np.abs(jpg.astype(int) - gray).mean() < 10

    # Palette TIFF with a grey palette (as the hiPSC tiles): grey levels, not indices.
    indices = (255 - gray)  # a reversed grey palette: index k shows grey 255 - k
    pimg = Image.fromarray(indices, mode="L").convert("P")
    pimg.putpalette([v for k in range(256) for v in (255 - k,) * 3])
    pimg.save(tmp_path / "p.tif", compression="tiff_lzw")  # LZW: read by Pillow
    pimg.save(tmp_path / "p_raw.tif")                       # uncompressed: read by tifffile
    for name in ("p.tif", "p_raw.tif"):
        assert Image.open(tmp_path / name).mode == "P"
        assert np.array_equal(load_frame(tmp_path / name), gray), name


def test_load_frame_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.tif"
    with pytest.raises(FrameError, match=r"nope\.tif.*no such file"):
        load_frame(missing)

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(FrameError, match=r"notes\.png.*not a readable image"):
        load_frame(text)

    zero = tmp_path / "zero.tif"
    zero.write_bytes(b"")
    with pytest.raises(FrameError, match=r"zero\.tif.*empty"):
        load_frame(zero)

    import tifffile
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 16, 16), np.uint8))
    with pytest.raises(FrameError, match=r"stack\.tif.*(stack|pages)"):
        load_frame(stack)

    empty = tmp_path / "empty.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(empty, np.zeros((0, 10), np.uint8))
    with pytest.raises(FrameError, match=r"empty\.tif.*empty"):
        load_frame(empty)
    assert issubclass(FrameError, ValueError)


# --------------------------------------------------------------------------- agreement helpers

def test_iou_helpers():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # exclusive ends: touching, no overlap
    m = box_iou_matrix(np.array([[0, 0, 10, 10], [0, 0, 5, 5]]), np.array([[0, 0, 10, 10]] * 3))
    assert m.shape == (2, 3) and np.allclose(m[:, 0], [1.0, 0.25])
    assert box_iou_matrix(np.zeros((0, 4)), np.zeros((2, 4))).shape == (0, 2)
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert mask_iou(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    # one-to-one: two reference boxes cannot share the single test box
    ref = np.array([[0, 0, 10, 10], [0, 0, 10, 10]])
    assert match_colonies(ref, np.array([[0, 0, 10, 10]])) == 0.5
    assert match_colonies(np.zeros((0, 4)), np.zeros((0, 4))) == 1.0
    assert match_colonies(ref, []) == 0.0


# --------------------------------------------------------------------------- real data

def _hipsc_tiles() -> list[Path]:
    tiles = sorted(HIPSC_DIR.glob("*.tif*")) if HIPSC_DIR.is_dir() else []
    if not tiles:
        pytest.skip(f"hiPSC tiles not found at {HIPSC_DIR}")
    return tiles


@pytest.mark.realdata
def test_hipsc_tiles_load_as_grayscale():
    for path in _hipsc_tiles():
        image = load_frame(path)
        assert image.shape == (1958, 1958) and image.dtype == np.uint8
        # grey palette: the grey levels equal the stored indices
        assert np.array_equal(image, np.asarray(Image.open(path)))


@pytest.mark.realdata
def test_fast_agrees_with_reference_on_hipsc_tiles():
    for path in _hipsc_tiles():
        image = load_frame(path)
        ref_fg, ref_col = reference_segment(image)
        fg, col = segment_frame(image)
        assert len(ref_col) >= 5, f"{path.name}: the reference finds too few colonies"
        assert mask_iou(ref_fg, fg) >= 0.97, path.name
        assert match_colonies(ref_col, col, min_iou=0.9) >= 0.95, path.name


@pytest.mark.realdata
def test_bccd_jpeg_loads():
    if not BCCD_DIR.is_dir():
        pytest.skip(f"BCCD images not found at {BCCD_DIR}")
    path = sorted(BCCD_DIR.glob("*.jpg"))[0]
    assert Image.open(path).mode == "RGB"
    image = load_frame(path)
    assert image.shape == (480, 640) and image.dtype == np.uint8


# --------------------------------------------------------------------------- synthetic world

def test_segments_synthetic_frame():
    synth = pytest.importorskip("ipb_ray.data.synth", reason="ipb_ray.data.synth (synthetic frames) not available")
    image, _instances, colonies = synth.generate_frame(
        synth.SynthConfig(frame_size=1024, seed=0), 0)
    truth = np.array([c.bbox if hasattr(c, "bbox") else c["bbox"] for c in colonies])
    _, found = segment_frame(image)
    assert match_colonies(truth, found, min_iou=0.8) >= 0.9
