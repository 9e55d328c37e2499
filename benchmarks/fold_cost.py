"""Where a fold's time goes: one fold of each method, its wall time split by what it was
spent on, against a plain in-process PyTorch loop with the same model, patches and batches.

    python benchmarks/fold_cost.py CATALOG [--methods supervised,ipb,fixmatch+pseudo_balance] \
        [--workers 0|1] [--mlflow] [--plain-steps 200] [--json out.json] [overrides ...]

For each method, one ``train_fold`` on fold ``split.fold``, after Ray is up and the crop
cache built (both timed apart: a cross-validation pays them once per process). The fold's
wall time is split, from the run's own history (``ipb_ray.distributed.training`` times
every part of an epoch), into:

- optimizer steps (the training loop minus the time it waited for a batch), data wait;
- validation on V, BatchNorm recalibration, the labelling pass (the plan's wait for the
  pseudo-labels, and starting the next pass), the test on T;
- reports (checkpoint writes, MLflow logging with ``--mlflow``, Train's report);
- loop set-up (networks, optimisers; in process also reading the catalog's crops) and what
  is left: Ray Train's start-up and shut-down (in process: reading the fold's roles).

The plain loop: the same network (``build_model``), L's un-augmented windows cut once into
memory by the project's own plain stream, the same weak augmentation
(:func:`ipb_ray.patches.augment.train_view`) and scales, the same optimiser, batch size and
loss, class-balanced draws; its steps/s is the limit to compare the fold's optimizer-step
rate with. Plain batched inference over U's windows, pre-cut, at the labelling pass's batch
(``eval.batch_size``) gives the limit for IPB's labelling pass (colonies/s).

Nothing here is a timed test: it prints measured figures (and writes ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The parts of a fold, in the order printed.
PARTS = ("ray_start", "cache_build", "train_startup", "loop_setup", "optimizer_steps", "data_wait", "validation",
         "bn_recalibration", "labelling", "test", "reports")


def split_fold(history: list[dict[str, Any]], final: dict[str, Any], wall: float) -> dict[str, float]:
    """A ``train_fold`` wall time split by its history rows (pure; see the module docstring).
    ``reports`` counts every epoch's report: the last row holds the earlier ones, and the
    last report is taken to cost their mean."""
    def total(key: str) -> float:
        return float(sum(float(h.get(key) or 0.0) for h in history))

    trained = total("train_seconds")
    wait = float(sum(float(h.get("train_seconds") or 0.0) * float(h.get("data_wait_fraction") or 0.0)
                     for h in history))
    earlier = float(history[-1].get("report_seconds") or 0.0) if history else 0.0
    reports = earlier + (earlier / max(len(history) - 1, 1) if len(history) > 1 else 0.0)
    parts = {"optimizer_steps": trained - wait, "data_wait": wait, "validation": total("val_seconds"),
             "bn_recalibration": total("bn_seconds"), "labelling": total("plan_seconds") + total("prefetch_seconds"),
             "test": float(final.get("test_seconds") or 0.0), "reports": reports,
             "loop_setup": total("setup_seconds")}
    parts["train_startup"] = max(wall - sum(parts.values()), 0.0)
    return parts


def steps_per_second(history: list[dict[str, Any]], labelled_only: bool = True) -> float:
    """Optimizer steps per second of training-loop time (data wait included), over the
    labelled epochs (the supervised stream; the loop records ``global_step`` only in
    epochs that stream U) or all."""
    rows = [h for h in history if not labelled_only or "global_step" not in h]
    steps = sum(int(h.get("train_steps") or 0) for h in rows)
    seconds = sum(float(h.get("train_seconds") or 0.0) for h in rows)
    return steps / seconds if seconds > 0 else float("nan")


def _windows(cfg: Any, cache: Any, names: tuple[str, ...], ids: list[str], batch: int) -> Any:
    """Un-augmented windows (the largest scale) of ``ids``, cut by the project's plain stream."""
    import torch

    from ipb_ray.distributed.epoch_stream import plan_batches
    from ipb_ray.engine.fold import stream_specs
    from ipb_ray.patches.plan import stream_plan

    spec = stream_specs(cfg, names, False).plain
    plan = stream_plan(cache.ids, seed=cfg.seed, stream="calibration", epoch=0, ids=ids, shuffle=False)
    column = f"x{max(spec.geometry.scales)}"
    out = [b[column] for b in plan_batches(cache, spec, plan, epoch=0, batch_size=batch, drop_last=False)]
    return torch.cat(out) if out else torch.empty(0)


def plain_loop(cfg: Any, inputs: Any, windows: Any, labels: list[int], steps: int) -> float:
    """Steps/s of a plain PyTorch loop: same network, augmentation, scales, optimiser, loss."""
    import torch
    import torch.nn.functional as F

    from ipb_ray.nn.models import build_model
    from ipb_ray.nn.optim import make_optimizer
    from ipb_ray.patches.augment import train_view
    from ipb_ray.patches.geometry import PatchGeometry, to_scales

    m, geometry = cfg.method, PatchGeometry.from_config(cfg.data)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg, len(inputs.class_names), inputs)
    opt = make_optimizer(net.parameters(), m.optimizer, m.lr, momentum=m.momentum, weight_decay=m.weight_decay,
                         nesterov=m.nesterov)
    y = torch.tensor(labels, dtype=torch.int64)
    counts = np.bincount(labels, minlength=len(inputs.class_names)).astype(np.float64)
    weights = torch.from_numpy((1.0 / np.maximum(counts, 1))[labels])
    gen, rng = torch.Generator().manual_seed(cfg.seed), np.random.default_rng(cfg.seed)
    net.train()

    def step() -> None:
        idx = torch.multinomial(weights, m.batch_size, replacement=True, generator=gen)
        views = to_scales(train_view(windows[idx], rng, cfg.augment), geometry)
        out = net(*views)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        loss = F.cross_entropy(logits.float(), y[idx], label_smoothing=m.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(min(10, steps)):  # warm-up: allocator, kernels
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0)


def plain_inference(cfg: Any, inputs: Any, windows: Any, batch: int = 256) -> float:
    """Colonies/s of plain batched inference (eval mode, no gradient) over ``windows``."""
    import torch

    from ipb_ray.nn.models import build_model
    from ipb_ray.patches.geometry import PatchGeometry, to_scales

    geometry = PatchGeometry.from_config(cfg.data)
    net = build_model(cfg, len(inputs.class_names), inputs).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            net(*to_scales(windows[i:i + batch], geometry))
    return len(windows) / max(time.perf_counter() - t0, 1e-9)


def _mlflow_run(store: str, cfg: Any) -> tuple[str, str]:
    from ipb_ray.tracking import runs as tracking

    uri = f"sqlite:///{store}/mlflow.db"
    parent = tracking.open_parent(uri, "fold-cost", cfg, run_name="fold-cost")
    return tracking.absolute_uri(uri), tracking.open_fold(uri, parent, cfg.split.fold, cfg)


def print_table(rows: dict[str, dict[str, Any]]) -> str:
    names = list(rows)
    lines = ["| part | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for part in (*PARTS, "wall"):
        cells = []
        for n in names:
            r = rows[n]
            whole = r["wall"] + r["parts"]["ray_start"] + r["parts"]["cache_build"]
            v = whole if part == "wall" else r["parts"][part]
            cells.append(f"{v:.1f} s" + ("" if part == "wall" else f" ({100 * v / whole:.0f} %)"))
        lines.append(f"| {part.replace('_', ' ')} | " + " | ".join(cells) + " |")
    for key, title in (("steps", "optimizer steps"), ("steps_per_s", "optimizer steps/s (labelled epochs)"),
                       ("plain_steps_per_s", "plain loop steps/s"), ("step_ratio", "ratio to the plain loop"),
                       ("not_steps_share", "not optimizer steps, share of wall"),
                       ("label_colonies_per_s", "labelling pass colonies/s"),
                       ("plain_infer_per_s", "plain inference colonies/s")):
        lines.append(f"| {title} | " + " | ".join(
            (f"{rows[n][key]:.3g}" if isinstance(rows[n].get(key), float) else str(rows[n].get(key, "-")))
            for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("catalog")
    ap.add_argument("--methods", default="supervised,ipb,fixmatch+pseudo_balance")
    ap.add_argument("--workers", type=int, default=0, help="resources.num_workers: 0 = local mode, 1 = one Train "
                    "worker on the local cluster")
    ap.add_argument("--runner", default="auto", choices=("auto", "ray_train", "in_process"),
                    help="resources.runner: with --workers 0, auto runs the fold in this process (no Ray start "
                         "or crop cache counted: the run decodes its crops itself, inside loop set-up)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--mlflow", action="store_true", help="log every epoch to a SQLite MLflow store, as ipb cv does")
    ap.add_argument("--plain-steps", type=int, default=200)
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)

    from ipb_ray import config as C
    from ipb_ray.distributed.epoch_stream import crop_cache
    from ipb_ray.distributed.ray_setup import init_ray
    from ipb_ray.data.fold_views import resolve_fold_catalog
    from ipb_ray.distributed.training import data_workers, runs_in_process, train_fold
    from ipb_ray.engine.fold import eval_batch, fold_inputs

    store = tempfile.mkdtemp(prefix="ipb-fold-cost-")
    base = [f"data.catalog={args.catalog}", f"resources.num_workers={args.workers}", f"resources.runner={args.runner}",
            f"tracking.storage_path={store}/runs", *args.overrides]
    cfg0 = resolve_fold_catalog(C.load_config(preset=args.preset, overrides=["method.name=supervised", *base]))
    base.append(f"data.catalog={cfg0.data.catalog}")  # the view of the folds split.* asks for
    t0 = time.perf_counter()
    init_ray(cfg0.resources)
    ray_start = time.perf_counter() - t0
    inputs = fold_inputs(cfg0, cfg0.split.fold)
    t0 = time.perf_counter()
    cache = crop_cache(inputs.catalog, cpus=cfg0.resources.data_cpus, workers=data_workers(cfg0))
    cache_build = time.perf_counter() - t0
    sizes = {"L": len(inputs.labelled), "V": len(inputs.validation), "T": len(inputs.test), "U": len(inputs.unlabelled)}
    print(f"Ray start {ray_start:.1f} s, crop cache {cache_build:.1f} s ({len(cache.ids)} colonies); fold "
          f"{cfg0.split.fold} of {cfg0.data.catalog}: " + ", ".join(f"|{k}| {v}" for k, v in sizes.items()), flush=True)

    l_windows = _windows(cfg0, cache, inputs.class_names, list(inputs.labelled), 256)
    plain = plain_loop(cfg0, inputs, l_windows, list(inputs.labelled_labels), args.plain_steps)
    u_ids = list(inputs.unlabelled)[:4000]
    # like for like: the labelling pass's own batch (eval.batch_size; 0 = the training batch)
    infer = plain_inference(cfg0, inputs, _windows(cfg0, cache, inputs.class_names, u_ids, 256),
                            batch=eval_batch(cfg0)) if u_ids else float("nan")
    print(f"plain loop {plain:.2f} steps/s; plain inference {infer:.0f} colonies/s", flush=True)

    rows: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(m.strip() for m in args.methods.split(",") if m.strip()):
        name, _, balancer = spec.partition("+")
        extra = [f"method.name={name}", f"name=cost{i}-{name}"] + ([f"method.balancer={balancer}"] if balancer else [])
        cfg = C.load_config(preset=args.preset, overrides=[*extra, *base])
        run = _mlflow_run(store, cfg) if args.mlflow else None
        t0 = time.perf_counter()
        metrics = train_fold(cfg, cfg.split.fold, mlflow_run=run)
        wall = time.perf_counter() - t0
        history = metrics["history"]
        parts = split_fold(history, metrics, wall)
        ray_parts = i == 0 and not runs_in_process(cfg)  # in process: no Ray, its own crops (in loop set-up)
        parts.update(ray_start=ray_start if ray_parts else 0.0, cache_build=cache_build if ray_parts else 0.0)
        whole = wall + parts["ray_start"] + parts["cache_build"]
        steps = sum(int(h.get("train_steps") or 0) for h in history)
        passes = [h for h in history if h.get("label_pass_seconds")]
        pool = cfg.method.pseudo_balance.label_pool or len(inputs.unlabelled)
        rate = steps_per_second(history)
        rows[spec] = {"wall": wall, "parts": parts, "steps": steps, "steps_per_s": rate,
                      "plain_steps_per_s": plain, "step_ratio": rate / plain,
                      "not_steps_share": 1.0 - parts["optimizer_steps"] / whole,
                      "label_colonies_per_s": (min(pool, len(inputs.unlabelled)) * len(passes)
                                               / sum(h["label_pass_seconds"] for h in passes)) if passes
                      else float("nan"),
                      "plain_infer_per_s": infer}
        print(f"{spec}: {wall:.1f} s, {steps} steps", flush=True)
    table = print_table(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"catalog": str(cfg0.data.catalog), "sizes": sizes,
                                               "workers": args.workers, "runner": args.runner,
                                               "overrides": args.overrides, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
