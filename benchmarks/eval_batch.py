"""Windows per second of eval-mode prediction (no gradient) by batch size, for the network a
configuration builds: what ``eval.batch_size`` should be on this machine.

    python benchmarks/eval_batch.py --sizes 8,16,32,64,128,256 [--seconds 3] [overrides ...]

e.g. the accuracy benchmark's Chula network: ``model.width=1.0 data.global_patch=64
data.local_patch=32``. Random inputs of the configured scales (the rate does not depend on
the pixels); each size is timed for ``--seconds`` after one warm-up pass, twice in turn
(the best of the two is printed, so a passing disturbance does not decide the choice).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rate(net, scales: list[int], batch: int, seconds: float) -> float:
    """Windows/s of ``net`` on random grey windows of ``scales`` (the catalog stores grey)."""
    import torch

    xs = [torch.randn(batch, 1, s, s) for s in scales]
    with torch.no_grad():
        net(*xs)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            net(*xs)
            n += batch
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8,16,32,64,128,256")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import torch

    from ipb_ray.config import load_config
    from ipb_ray.nn.models import create_model
    from ipb_ray.patches.geometry import PatchGeometry

    cfg = load_config(preset=args.preset, overrides=args.overrides)
    geometry = PatchGeometry.from_config(cfg.data)
    scales = list(geometry.scales)
    torch.manual_seed(cfg.seed)
    net = create_model(cfg.model.backbone, args.classes, 1, width=cfg.model.width,
                       multi_scale=len(scales) > 1).eval()
    sizes = [int(s) for s in args.sizes.split(",")]
    best = {b: 0.0 for b in sizes}
    for _ in range(2):
        for b in sizes:
            best[b] = max(best[b], rate(net, scales, b, args.seconds))
    print(f"{cfg.model.backbone} width {cfg.model.width}, scales {scales}, {torch.get_num_threads()} threads")
    for b in sizes:
        print(f"batch {b:5d}: {best[b]:8.0f} windows/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": args.overrides, "scales": scales,
                                               "threads": torch.get_num_threads(), "windows_per_s": best}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
