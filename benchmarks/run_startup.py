"""Fixed cost of a Ray Train run: two tiny supervised runs of one fold back to back in one
driver (2 epochs of 3 steps), printing each run's wall time and its epochs' time to the
first batch and training seconds. The second run shows what every later fold of a
cross-validation pays.

    .venv/bin/python benchmarks/run_startup.py CATALOG [overrides]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time

from ipb_ray import config as C
from ipb_ray.distributed.ray_setup import init_ray
from ipb_ray.distributed.training import train_fold


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    store = tempfile.mkdtemp(prefix="ipb-startup-")
    t0 = time.perf_counter()
    cfg = C.load_config(preset="demo", overrides=[f"data.catalog={argv[0]}", "method.name=supervised",
                                                  f"tracking.storage_path={store}", "method.epochs=2",
                                                  "method.steps_per_epoch=3", *argv[1:]])
    init_ray(cfg.resources)
    print(f"Ray start-up {time.perf_counter() - t0:.1f} s", flush=True)
    for i in range(2):
        t = time.perf_counter()
        m = train_fold(cfg.replace(f"name=startup{i}"), 0)
        epochs = ", ".join(f"first batch {h['first_batch_s']:.1f} s / trained {h['train_seconds']:.1f} s"
                           for h in m["history"])
        print(f"run {i}: {time.perf_counter() - t:.1f} s ({epochs})", flush=True)
    shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
