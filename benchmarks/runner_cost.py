"""Wall time of one fold under each runner of the engine (``resources.runner``): Ray
Train's local mode against this process alone, back to back on the same fold, with the
figures each run ends with (they must agree: the same patches, the same steps).

    python benchmarks/runner_cost.py /tmp/demo/catalog --methods supervised,ipb [KEY=VALUE ...]

``/tmp/demo/catalog``: the demo's world and catalog (``ipb demo --out /tmp/demo`` builds
them). Prints, per method and runner: wall seconds (Ray start-up included for the first
Ray Train run: the cluster is started here), the run's own setup seconds, macro TPR on T
and the final parameter digest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("catalog")
    ap.add_argument("--methods", default="supervised,ipb")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from ipb_ray.config import load_config
    from ipb_ray.distributed.ray_setup import init_ray
    from ipb_ray.distributed.training import train_fold

    store = tempfile.mkdtemp(prefix="runner-cost-")
    rows = []
    try:
        for method in args.methods.split(","):
            for runner in ("ray_train", "in_process"):
                cfg = load_config(preset="demo", overrides=[
                    f"data.catalog={args.catalog}", f"tracking.storage_path={store}", "resources.num_workers=0",
                    f"method.name={method}", f"resources.runner={runner}", f"name=cost-{runner}", *args.overrides])
                if runner == "ray_train":
                    init_ray(cfg.resources)  # a warm cluster, as `ipb cv` has for every fold after its first
                t0 = time.perf_counter()
                out = train_fold(cfg, args.fold)
                wall = time.perf_counter() - t0
                row = {"method": method, "runner": runner, "wall_s": round(wall, 1),
                       "setup_s": round(out["history"][0].get("setup_seconds", float("nan")), 1),
                       "epochs": len(out["history"]), "macro_tpr": out["test_balanced_accuracy"],
                       "param_digest": out["param_digest"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    print(f"\n{'method':<12}{'runner':<12}{'wall s':>8}{'setup s':>9}{'macro TPR':>11}  digest")
    for r in rows:
        print(f"{r['method']:<12}{r['runner']:<12}{r['wall_s']:>8.1f}{r['setup_s']:>9.1f}{r['macro_tpr']:>11.4f}  "
              f"{r['param_digest']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
