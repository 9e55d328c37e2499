"""Benchmark: does the patch stream keep a GPU busy? HRNet at 224 + 112 px, bf16, 1..N data CPUs.

    python benchmarks/gpu_feed.py --catalog CATALOG [--cpus 1 2 4 8] [--batch-size 64] [--epochs 3]
                                  [--stream labelled|unlabelled] [--backbone hrnet]

Needs a CUDA GPU: on a machine without one it prints what it would measure and exits 0.

For each number of data CPUs ``n`` it starts a local Ray cluster with ``n`` CPUs for
the patch tasks (plus one for this process) and the GPU, builds the catalog's crop cache
(:mod:`ipb_ray.distributed.epoch_stream`) and runs ``--epochs`` epochs (after one warm-up
epoch) of the training stream the project trains on: each epoch's whole-epoch shuffled
plan (the ``labelled`` stream in ``train`` mode, or IPB's pseudo-balanced ``unlabelled``
stream with weak and strong views), ``n`` patch tasks at once, batches pinned on Ray's
batch thread, copied with ``non_blocking=True`` and stepped (forward, backward, SGD) under
bf16 autocast, as the training loop does with ``method.mixed_precision``.

Figures per ``n``: samples/s reaching the GPU; the GPU busy fraction (CUDA-event time of
the steps / wall time of the epoch, start-up included); the loop's data-wait fraction
(time blocked on the next batch / wall time); and, once, the GPU-bound ceiling: the same
steps on a batch already on the GPU. ``busy`` near 1 means the data path keeps the GPU
fed; the ``n`` where samples/s reaches the ceiling is the number of data CPUs a GPU of
this kind needs.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", type=Path, required=True, help="a finished colony catalog (ipb preprocess)")
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2, 4, 8], help="data CPUs (patch tasks at once)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per setting (after 1 warm-up)")
    p.add_argument("--stream", choices=("labelled", "unlabelled"), default="labelled")
    p.add_argument("--backbone", default="hrnet")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 steps instead of bf16 autocast")
    p.add_argument("--ceiling-steps", type=int, default=30, help="steps of the GPU-bound ceiling")
    return p.parse_args(argv)


def what_it_measures(args: argparse.Namespace) -> str:
    return (f"No CUDA GPU here: skipping. On a GPU node this measures, for {args.backbone} at 224 + 112 px "
            f"({'bf16' if args.bf16 else 'fp32'}), batch {args.batch_size}, the {args.stream} stream of "
            f"{args.catalog}: for each of {args.cpus} data CPUs, samples/s reaching the GPU, the GPU busy "
            f"fraction (CUDA-event step time / wall time), the loop's data-wait fraction, the time to the "
            f"first batch, and the GPU-bound ceiling (the same steps on a batch already on the GPU).")


def make_step(model, opt, bf16: bool, unlabelled: bool):
    import torch
    import torch.nn.functional as F

    def step(batch: dict, device) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            if unlabelled:
                weak = [batch[k].to(device, non_blocking=True) for k in ("weak224", "weak112")]
                strong = [batch[k].to(device, non_blocking=True) for k in ("strong224", "strong112")]
                with torch.no_grad():
                    target = model(*weak)[0].argmax(1)
                logits = model(*strong)[0]
            else:
                logits = model(*[batch[k].to(device, non_blocking=True) for k in ("x224", "x112")])[0]
                target = batch["label"].to(device, non_blocking=True).clamp(min=0)
            loss = F.cross_entropy(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run_setting(args: argparse.Namespace, n: int, spec, class_names) -> dict:
    import ray
    import torch

    from _plans import epoch_plan, ids_and_labels
    from ipb_ray.distributed import epoch_stream
    from ipb_ray.nn.models import create_model

    ray.init(num_cpus=n + 1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        device = torch.device("cuda", 0)
        torch.manual_seed(0)
        model = create_model(args.backbone, len(class_names), multi_scale=True).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
        step = make_step(model, opt, args.bf16, args.stream == "unlabelled")
        t0 = time.perf_counter()
        cache = epoch_stream.crop_cache(str(args.catalog), workers=n)
        setup_s = time.perf_counter() - t0
        ids, labels = ids_and_labels(args.catalog)
        rows = []
        for epoch in range(1 + args.epochs):
            plan = epoch_plan(args.stream, ids, labels, class_names, epoch)
            events, wait_s, first = [], 0.0, None
            torch.cuda.synchronize()
            start = last = time.perf_counter()
            patches = 0
            for batch in epoch_stream.plan_batches(cache, spec, plan, epoch=epoch, batch_size=args.batch_size,
                                                   workers=n, cpus=1.0, device="cuda"):
                now = time.perf_counter()
                wait_s += now - last
                first = now - start if first is None else first
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                step(batch, device)
                end.record()
                events.append((begin, end))
                patches += int(batch["label"].shape[0])
                last = time.perf_counter()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
            gpu_s = sum(b.elapsed_time(e) for b, e in events) / 1000
            rows.append({"patches_per_s": patches / wall, "busy": gpu_s / wall, "data_wait": wait_s / wall,
                         "first_batch_s": first or float("nan")})
        timed = rows[1:]
        return {"cpus": n, "setup_s": setup_s, **{k: statistics.median(r[k] for r in timed) for k in timed[0]}}
    finally:
        epoch_stream.forget_caches()
        ray.shutdown()


def ceiling(args: argparse.Namespace, class_names) -> float:
    """Samples/s of the same steps on one batch already on the GPU."""
    import torch

    from ipb_ray.nn.models import create_model

    device = torch.device("cuda", 0)
    model = create_model(args.backbone, len(class_names), multi_scale=True).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    step = make_step(model, opt, args.bf16, args.stream == "unlabelled")
    b = args.batch_size
    names = ("weak224", "weak112", "strong224", "strong112") if args.stream == "unlabelled" else ("x224", "x112")
    batch = {k: torch.rand(b, 1, int(k[-3:]), int(k[-3:]), device=device) for k in names}
    batch["label"] = torch.zeros(b, dtype=torch.int64, device=device)
    for _ in range(3):
        step(batch, device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.ceiling_steps):
        step(batch, device)
    torch.cuda.synchronize()
    return args.ceiling_steps * b / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(what_it_measures(args))
        return
    from _plans import stream_spec
    from ipb_ray.data import catalog

    class_names = tuple(catalog.read_manifest(args.catalog)["class_names"])
    spec = stream_spec(args.stream, class_names)
    print(f"GPU: {torch.cuda.get_device_name(0)}; {args.backbone} 224+112 px, "
          f"{'bf16' if args.bf16 else 'fp32'}, batch {args.batch_size}, {args.stream} stream; "
          f"{os.cpu_count()} CPUs on the node", flush=True)
    top = ceiling(args, class_names)
    print(f"GPU-bound ceiling: {top:.0f} samples/s", flush=True)
    print(f"{'data CPUs':>9} {'samples/s':>9} {'of ceiling':>10} {'GPU busy':>8} {'data wait':>9} "
          f"{'1st batch s':>11} {'set-up s':>8}")
    for n in args.cpus:
        if n + 1 > (os.cpu_count() or 1):
            print(f"{n:>9} skipped: the node has {os.cpu_count()} CPUs")
            continue
        r = run_setting(args, n, spec, class_names)
        print(f"{n:>9} {r['patches_per_s']:9.0f} {r['patches_per_s'] / top:10.0%} {r['busy']:8.0%} "
              f"{r['data_wait']:9.0%} {r['first_batch_s']:11.2f} {r['setup_s']:8.1f}", flush=True)


if __name__ == "__main__":
    main()
