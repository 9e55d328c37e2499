"""Training step speed: every backbone at the paper's input sizes, and 1 vs 2 Ray Train workers.

Part A (in-process, no Ray): forward + backward + SGD step on random batches, single-scale
128 px and multi-scale 224 + 112 px, for each registered backbone. Part B: `train_fold`
on a catalog with 1 and then 2 workers on the local Ray cluster, reporting the patches/s
the training loop achieved (epochs after the first, median).

    python benchmarks/train_step.py                       # part A, all backbones
    python benchmarks/train_step.py --catalog DIR --ray   # plus part B on that catalog
"""

from __future__ import annotations

import argparse
import statistics
import time


def bench_step(name: str, multi_scale: bool, batch: int, steps: int, device: str, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from ipb_ray.nn.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name, 4, multi_scale=multi_scale).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    shapes = [(batch, 1, 224, 224), (batch, 1, 112, 112)] if multi_scale else [(batch, 1, 128, 128)]
    xs = [torch.rand(s, device=device) for s in shapes]
    y = torch.randint(0, 4, (batch,), device=device)
    params = sum(p.numel() for p in model.parameters())

    def step():
        logits, _ = model(*xs)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"backbone": name, "input": "224+112" if multi_scale else "128", "batch": batch,
            "params_M": params / 1e6, "s_per_step": med, "steps_per_s": 1 / med, "patches_per_s": batch / med}


def bench_ray(catalog: str, epochs: int, backbone: str) -> list[dict]:
    from ipb_ray.config import load_config
    from ipb_ray.distributed.training import train_fold

    rows = []
    for workers, cpus in ((1, 1.0), (2, 0.5)):
        cfg = load_config(preset="demo", overrides=[
            f"data.catalog={catalog}", "method.name=supervised", f"model.backbone={backbone}",
            f"method.epochs={epochs}", f"resources.num_workers={workers}", f"resources.cpus_per_worker={cpus}",
            f"name=bench-w{workers}-{int(time.time())}", "tracking.storage_path=/tmp/ipb-bench-runs"])
        t0 = time.perf_counter()
        m = train_fold(cfg, 0)
        rows.append({"workers": workers, "cpus_per_worker": cpus, "wall_s": time.perf_counter() - t0,
                     "last_epoch_patches_per_s": m["train_patches_per_s"], "steps_last_epoch": m["train_steps"],
                     "data_wait_fraction": m["data_wait_fraction"], "first_batch_s": m["first_batch_s"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="vgg19_bn,hrnet,vgg_tiny,hrnet_tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--catalog", default=None)
    ap.add_argument("--ray", action="store_true", help="also run part B (needs --catalog)")
    ap.add_argument("--ray-epochs", type=int, default=3)
    ap.add_argument("--ray-backbone", default="hrnet_tiny")
    ap.add_argument("--no-steps", action="store_true", help="skip part A")
    args = ap.parse_args()
    import torch

    print(f"device {args.device}, torch {torch.__version__}, threads {args.threads}, batch {args.batch}")
    names = [] if args.no_steps else args.backbones.split(",")
    if names:
        print(f"{'backbone':<12} {'input':<8} {'params M':>9} {'s/step':>8} {'steps/s':>8} {'patches/s':>10}")
    for name in names:
        for ms in (False, True):
            r = bench_step(name, ms, args.batch, args.steps, args.device, args.threads)
            print(f"{r['backbone']:<12} {r['input']:<8} {r['params_M']:>9.2f} {r['s_per_step']:>8.3f} "
                  f"{r['steps_per_s']:>8.2f} {r['patches_per_s']:>10.1f}", flush=True)
    if args.ray:
        if not args.catalog:
            ap.error("--ray needs --catalog")
        print(f"\nRay Train on {args.catalog}, backbone {args.ray_backbone}, demo preset sizes")
        for r in bench_ray(args.catalog, args.ray_epochs, args.ray_backbone):
            print(f"workers {r['workers']} x {r['cpus_per_worker']} CPU: last epoch "
                  f"{r['last_epoch_patches_per_s']:.1f} patches/s ({r['steps_last_epoch']} steps; waiting for data "
                  f"{100 * r['data_wait_fraction']:.0f} % of the epoch, first batch after {r['first_batch_s']:.1f} s), "
                  f"wall {r['wall_s']:.1f} s", flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
