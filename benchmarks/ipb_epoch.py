"""What IPB's rebalancing costs: an IPB epoch against a plain MPL epoch on the same data.

Runs `train_fold` on one catalog for plain MPL (``method.name=mpl``: no labelling pass),
IPB with a separate labelling pass (``relabel=pass``) and IPB reusing the MPL steps'
pseudo-labels (``relabel=reuse``), with 1 and 2 Ray Train workers, and reports per
configuration the median MPL-phase epoch time (the first MPL epoch left out: it pays
for process start-up), the median labelling pass time, and the overhead of IPB over MPL
as a fraction of the MPL epoch. The labelling pass of epoch e+1 runs in the background
while rank 0 validates epoch e, so "labelling pass s" (its duration) and "waited s" (what
the epoch actually waited for it) differ. Per configuration it also reports the student
phase's data path: "train s" (the epoch's steps, from building the streams to the last
step), "data wait" (``data_wait_fraction``: the share of that time the loop stood waiting
for a batch, each epoch's stream start-up included), the time to the first batch, and
patches/s.

    python benchmarks/ipb_epoch.py --out /tmp/ipb-bench            # synthesises a world there first
    python benchmarks/ipb_epoch.py --out DIR --workers 1 --epochs 5 --frames 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import cpu_model


def world(out: Path, frames: int, seed: int) -> None:
    from ipb_ray.data import synth
    from ipb_ray.config import load_config
    from ipb_ray.distributed.preprocess import build_catalog

    if (out / "catalog" / "folds.parquet").exists() or (out / "catalog" / "_SUCCESS").exists():
        return
    synth.write_world(synth.SynthConfig(frames=frames, frame_size=1024, colonies_per_frame=20, colony_scale=0.4,
                                        seed=seed, image_format="png"), out / "world")
    build_catalog(load_config(preset="demo", overrides=[f"data.frames={out / 'world'}", "data.annotations=null",
                                                        f"data.catalog={out / 'catalog'}"]))


def run(out: Path, method: str, relabel: str, workers: int, epochs: int, tag: str) -> dict:
    from ipb_ray.config import load_config
    from ipb_ray.distributed.training import train_fold

    cpus = 1.0 if workers == 1 else 0.5
    cfg = load_config(preset="demo", overrides=[
        f"data.catalog={out / 'catalog'}", f"tracking.storage_path={out / 'runs'}",
        f"name=bench-{tag}-{relabel}-w{workers}", f"method.name={method}", f"method.pseudo_balance.relabel={relabel}",
        "method.teacher_epochs=1", f"method.epochs={epochs}", f"resources.num_workers={workers}",
        f"resources.cpus_per_worker={cpus}"])
    t0 = time.perf_counter()
    metrics = train_fold(cfg, 0)
    wall = time.perf_counter() - t0
    mpl = [h for h in metrics["history"] if h.get("stage") == "mpl"]
    steady = mpl[1:] or mpl
    return {"method": method, "relabel": relabel if method == "ipb" else "-", "workers": workers,
            "epoch_s": statistics.median(h["epoch_seconds"] for h in steady),
            "label_s": statistics.median(h.get("label_seconds", 0.0) for h in steady),
            "label_pass_s": statistics.median(h.get("label_pass_seconds", 0.0) for h in steady),
            "train_s": statistics.median(h["train_seconds"] for h in steady),
            "data_wait": statistics.median(h["data_wait_fraction"] for h in steady),
            "first_batch_s": statistics.median(h["first_batch_s"] for h in steady),
            "patches_per_s": statistics.median(h["train_patches_per_s"] for h in steady),
            "first_mpl_epoch_s": mpl[0]["epoch_seconds"], "steps": mpl[0]["train_steps"],
            "draws": mpl[0]["unlabelled_draws"], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working directory (world, catalog, runs)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--epochs", type=int, default=4, help="MPL epochs per run (after 1 teacher epoch)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="+", default=["mpl:pass", "ipb:pass", "ipb:reuse"],
                   help="method:relabel pairs to run (default: all three)")
    args = p.parse_args()

    from ipb_ray.config import ResourcesConfig
    from ipb_ray.distributed.ray_setup import init_ray

    init_ray(ResourcesConfig(object_store_mb=300, data_cpus=0.25))
    world(args.out, args.frames, args.seed)
    from ipb_ray.engine.fold import fold_inputs
    from ipb_ray.config import load_config

    inputs = fold_inputs(load_config(preset="demo", overrides=[f"data.catalog={args.out / 'catalog'}"]), 0)
    print(f"CPU: {cpu_model()}; catalog: |L| {len(inputs.labelled)}, |U| {len(inputs.unlabelled)}, "
          f"|V| {len(inputs.validation)}, |T| {len(inputs.test)}; demo preset (hrnet_tiny, 64+32 px, batch 16+16)")
    tag = time.strftime("%H%M%S")
    rows = []
    for w in args.workers:
        for method, relabel in (c.split(":") for c in args.configs):
            rows.append(run(args.out, method, relabel, w, args.epochs, tag))
            print(json.dumps(rows[-1]))
    print()
    print("| workers | method | relabel | steps/epoch | epoch s (median) | labelling pass s | waited s "
          "| pass / MPL epoch | waited / MPL epoch | epoch overhead vs MPL | train s | data wait | first batch s "
          "| patches/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        base = next((b for b in rows if b["workers"] == r["workers"] and b["method"] == "mpl"), None)
        over = f"{(r['epoch_s'] - base['epoch_s']) / base['epoch_s']:+.1%}" if base else "-"
        ref = base["epoch_s"] if base else float("nan")
        print(f"| {r['workers']} | {r['method']} | {r['relabel']} | {r['steps']} | {r['epoch_s']:.2f} | "
              f"{r['label_pass_s']:.2f} | {r['label_s']:.2f} | {r['label_pass_s'] / ref:.1%} | "
              f"{r['label_s'] / ref:.1%} | {over} | {r['train_s']:.2f} | {r['data_wait']:.1%} | "
              f"{r['first_batch_s']:.2f} | {r['patches_per_s']:.1f} |")


if __name__ == "__main__":
    main()
