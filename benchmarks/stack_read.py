"""Reading a time-lapse: one OME-TIFF stack against the same planes as separate TIFFs.

Writes a 48-plane 2908 x 2908 time-lapse (the paper's frame size; 16-bit, as cameras give)
once as an OME-TIFF and once as 48 single-page TIFFs, then reads every plane the way
``ipb preprocess`` does (:func:`ipb_ray.data.segmentation.load_frame`, one plane at a
time, converted to 8-bit) and prints frames/s and the peak resident memory of the reading
process, each format in a fresh process so one's memory does not count for the other.

    python benchmarks/stack_read.py [--planes 48] [--side 2908] [--dir /tmp/stack-bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write(root: Path, planes: int, side: int) -> None:
    import tifffile

    root.mkdir(parents=True, exist_ok=True)
    stack, singles = root / "timelapse.ome.tif", root / "frames"
    if stack.exists() and singles.is_dir() and len(list(singles.glob("*.tif"))) == planes:
        return
    singles.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4096, (side, side), dtype=np.uint16)

    def plane(t: int) -> np.ndarray:
        return np.roll(base, 7 * t, axis=1)  # each time point a little different, never all in memory

    with tifffile.TiffWriter(stack, ome=True, bigtiff=True) as w:
        w.write(iter(plane(t) for t in range(planes)), shape=(planes, side, side), dtype=np.uint16,
                metadata={"axes": "TYX", "PhysicalSizeX": 0.8, "PhysicalSizeY": 0.8})
    for t in range(planes):
        tifffile.imwrite(singles / f"t{t:03d}.tif", plane(t))


def read(kind: str, root: Path) -> dict[str, float]:
    from ipb_ray.data.segmentation import load_frame
    from ipb_ray.data.stacks import list_planes

    t0 = time.perf_counter()
    checksum = 0
    if kind == "stack":
        path = root / "timelapse.ome.tif"
        planes = list_planes(path).planes
        for p in planes:
            checksum += int(load_frame(path, p.to_dict())[0, :16].sum())
        n = len(planes)
    else:
        files = sorted((root / "frames").glob("*.tif"))
        for f in files:
            checksum += int(load_frame(f)[0, :16].sum())
        n = len(files)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "planes": n, "seconds": seconds, "frames_per_s": n / seconds, "peak_rss_mb": peak_mb,
            "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--planes", type=int, default=48)
    ap.add_argument("--side", type=int, default=2908)
    ap.add_argument("--dir", default="/tmp/stack-bench")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.dir)
    if args.child:
        print(json.dumps(read(args.child, root)))
        return
    write(root, args.planes, args.side)
    size = {"stack": (root / "timelapse.ome.tif").stat().st_size,
            "files": sum(f.stat().st_size for f in (root / "frames").glob("*.tif"))}
    results = []
    for kind in ("stack", "files"):
        out = subprocess.run([sys.executable, __file__, "--dir", str(root), "--child", kind], check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    if results[0]["checksum"] != results[1]["checksum"]:
        raise SystemExit("the stack and the separate files read different pixels")
    plane_mb = args.side * args.side * 2 / 2**20
    print(f"{args.planes} planes of {args.side}x{args.side} uint16 ({plane_mb:.1f} MiB a plane, "
          f"{args.planes * plane_mb:.0f} MiB in all)")
    print("| input | planes | s | frames/s | peak RSS MiB | on disk MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {'one OME-TIFF stack' if r['kind'] == 'stack' else 'separate TIFFs'} | {r['planes']} | "
              f"{r['seconds']:.2f} | {r['frames_per_s']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{size[r['kind']] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
