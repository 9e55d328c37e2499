"""Benchmark: fast colony segmentation against the scikit-image reference, one core.

    python benchmarks/segmentation.py [--frames DIR] [--synthetic N --size 2908] [--repeat R]

Frames: the real hiPSC tiles (../shared/data/hipsc_brightfield, or --frames DIR), one of
them upscaled to --size, and N synthetic --size frames (ipb_ray.data.synth where it exists,
else textured blobs generated here). Both implementations run on the same frames,
single-threaded (the thread variables are set before numpy/OpenCV load). Prints, per
frame, the median seconds of each, the speed-up, the foreground-mask IoU and the share
of reference colonies matched by a fast one at box IoU >= 0.9.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from ipb_ray.config import SegmentationConfig  # noqa: E402
from ipb_ray.data.segmentation import (  # noqa: E402
    load_frame,
    mask_iou,
    match_colonies,
    reference_segment,
    segment_frame,
)

from _common import cpu_model  # noqa: E402

cv2.setNumThreads(1)

DEFAULT_FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "hipsc_brightfield"
MATCH_IOU = 0.9


def blob_frame(size: int, seed: int) -> np.ndarray:
    """A stand-in frame: rough-textured colonies of 80-400 px radius on a smooth, slightly
    noisy, unevenly lit background (used only when ipb_ray.data.synth is absent)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    image = 105 + 35 * (xx + yy) / (2 * size) + rng.normal(0, 0.8, (size, size)).astype(np.float32)
    for _ in range(int(rng.integers(15, 30))):
        cx, cy = rng.uniform(0, size, 2)
        a, b = rng.uniform(80, 400), rng.uniform(80, 400)
        inside = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        image[inside] = 120 + rng.normal(0, 30, int(inside.sum()))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def frames(args: argparse.Namespace) -> Iterator[tuple[str, np.ndarray]]:
    tiles = sorted(p for p in args.frames.glob("*") if p.suffix.lower() in
                   (".tif", ".tiff", ".png", ".jpg", ".jpeg")) if args.frames.is_dir() else []
    for path in tiles:
        yield short(path.stem), load_frame(path)
    if tiles and args.size:
        tile = load_frame(tiles[0])
        yield f"{short(tiles[0].stem)} up", cv2.resize(
            tile, (args.size, args.size), interpolation=cv2.INTER_LINEAR)
    try:
        from ipb_ray.data import synth
    except ImportError:
        synth = None
    for i in range(args.synthetic):
        if synth is not None:
            image, _, _ = synth.generate_frame(synth.SynthConfig(frame_size=args.size, seed=i), i)
            yield f"synth #{i}", image
        else:
            yield f"blobs #{i}", blob_frame(args.size, seed=i)


def short(name: str, width: int = 30) -> str:
    return name if len(name) <= width else name[:8] + "~" + name[-(width - 9):]


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=Path, default=DEFAULT_FRAMES, help="directory of real frames")
    parser.add_argument("--synthetic", type=int, default=2, help="number of generated frames")
    parser.add_argument("--size", type=int, default=2908, help="side of generated/upscaled frames, px")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per frame (median)")
    args = parser.parse_args()
    cfg = SegmentationConfig()

    print(f"cpu: {cpu_model()} (nproc {os.cpu_count()}), OpenCV threads {cv2.getNumThreads()}, "
          f"numpy {np.__version__}, OpenCV {cv2.__version__}")
    warm = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    segment_frame(warm, cfg)  # imports and cached plans out of the timings
    reference_segment(warm, cfg)

    head = (f"{'frame':33s} {'size':>9s} {'ref s':>7s} {'fast s':>7s} {'speed-up':>8s} "
            f"{'mask IoU':>9s} {'matched':>8s} {'colonies':>9s}")
    print(head)
    print("-" * len(head))
    ref_total = fast_total = 0.0
    worst_iou, worst_match, n = 1.0, 1.0, 0
    for name, image in frames(args):
        t_ref, (ref_fg, ref_col) = timed(lambda: reference_segment(image, cfg), args.repeat)
        t_fast, (fg, col) = timed(lambda: segment_frame(image, cfg), args.repeat)
        iou = mask_iou(ref_fg, fg)
        matched = match_colonies(ref_col, col, min_iou=MATCH_IOU)
        ref_total, fast_total, n = ref_total + t_ref, fast_total + t_fast, n + 1
        worst_iou, worst_match = min(worst_iou, iou), min(worst_match, matched)
        size = f"{image.shape[1]}x{image.shape[0]}"
        print(f"{name:33s} {size:>9s} {t_ref:7.3f} {t_fast:7.3f} {t_ref / t_fast:7.1f}x "
              f"{iou:9.5f} {matched:8.3f} {len(ref_col):>4d}/{len(col):<4d}")
    if n == 0:
        print("no frames: pass --frames DIR or --synthetic N")
        return
    print("-" * len(head))
    print(f"reference: {n / ref_total:.3f} frames/s ({ref_total / n:.3f} s/frame); "
          f"fast: {n / fast_total:.3f} frames/s ({fast_total / n:.3f} s/frame); "
          f"speed-up {ref_total / fast_total:.1f}x; worst mask IoU {worst_iou:.5f}; "
          f"worst matched {worst_match:.3f} (box IoU >= {MATCH_IOU})")


if __name__ == "__main__":
    main()
