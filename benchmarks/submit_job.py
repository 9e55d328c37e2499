"""What running as a Ray job costs: `ipb submit` against running the same command directly.

Starts a two-node Ray cluster and an MLflow server on this machine
(:class:`ipb_ray.cluster.local.LocalCluster`), synthesises a small world, then measures:

- the cluster's start-up (head, worker node, MLflow server);
- per job: submit -> RUNNING (upload of the project and the runtime environment on the
  head) and RUNNING -> end (the driver: imports, checks, the work itself), for a
  `preprocess` job, a first and a second `cv` job (the second reuses the uploaded package);
- the same `ipb cv` run directly as a driver that joins the cluster (`--address`), so the
  job's overhead is the difference;
- the shared-storage probe on two nodes (marker file + one task per node).

    python benchmarks/submit_job.py --out /tmp/submit-bench
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_model

PROJECT = Path(__file__).resolve().parents[1]


def wait_for(client, job_id: str, status: str | tuple[str, ...], timeout: float = 900.0) -> float:
    """Seconds until the job's status is one of ``status`` (polled every 0.1 s)."""
    from ipb_ray.cluster.submit import status_name

    wanted = (status,) if isinstance(status, str) else status
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        info = client.get_job_info(job_id)
        if status_name(info) in wanted:
            return time.monotonic() - t0
        if status_name(info) in ("FAILED", "STOPPED"):
            raise RuntimeError(f"job {job_id} {status_name(info)}: {info.message}\n{client.get_job_logs(job_id)}")
        time.sleep(0.1)
    raise TimeoutError(job_id)


def timed_job(cluster, argv: list[str]) -> dict:
    from ipb_ray.cluster.submit import client, submit

    c = client(cluster.address)
    t0 = time.monotonic()
    job = submit(cluster.address, argv)
    submitted = time.monotonic() - t0
    to_running = wait_for(c, job, ("RUNNING", "SUCCEEDED"))
    running = wait_for(c, job, "SUCCEEDED")
    return {"job": job, "submit_s": submitted, "to_running_s": submitted + to_running, "run_s": running,
            "total_s": submitted + to_running + running}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2, help="cv jobs after the first (cached package)")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    from ipb_ray.data import synth
    from ipb_ray.cluster.local import LocalCluster

    world = out / "world"
    if not (world / "world.json").exists():
        synth.write_world(synth.SynthConfig(frames=args.frames, frame_size=1024, colonies_per_frame=20,
                                            colony_scale=0.4, seed=0, image_format="png"), world)
    t0 = time.monotonic()
    cluster = LocalCluster(out / "cluster", workers=1, cpus=2).start()
    start_s = time.monotonic() - t0
    try:
        common = ["--preset", "demo", f"data.catalog={out / 'catalog'}", f"tracking.storage_path={out / 'runs'}",
                  f"tracking.tracking_uri={cluster.mlflow_uri}", "tracking.experiment=bench", "split.folds=2",
                  "method.name=supervised", "method.epochs=1", "model.backbone=patch_stats", "model.feature_dim=8"]
        rows = {"preprocess": timed_job(cluster, ["preprocess", *common, f"data.frames={world}",
                                                  "data.annotations=null"])}
        rows["cv (first)"] = timed_job(cluster, ["cv", *common, "name=job0", "--no-model"])
        later = [timed_job(cluster, ["cv", *common, f"name=job{i + 1}", "--no-model"]) for i in range(args.repeats)]
        rows["cv (package cached, median)"] = {k: statistics.median(r[k] for r in later)
                                               for k in ("submit_s", "to_running_s", "run_s", "total_s")}
        t0 = time.monotonic()
        subprocess.run([str(Path(sys.executable).parent / "ipb"), "cv", *common, "name=direct", "--no-model",
                        "--address", cluster.gcs_address], check=True, capture_output=True, cwd=PROJECT)
        direct_s = time.monotonic() - t0

        import ray

        from ipb_ray.cluster.paths import check_cluster_paths
        from ipb_ray.config import load_config

        ray.init(address=cluster.gcs_address, log_to_driver=False)
        cfg = load_config(preset="demo", overrides=common[2:])
        probes = []
        for _ in range(5):
            t0 = time.monotonic()
            check_cluster_paths(cfg)
            probes.append(time.monotonic() - t0)
        ray.shutdown()
    finally:
        cluster.stop()

    print(f"# {cpu_model()}; 2 nodes x 2 logical CPUs on one machine; {args.frames}-frame synthetic world, "
          "2-fold supervised CV, patch_stats, 1 epoch")
    print(f"cluster start (head + worker node + MLflow server): {start_s:.1f} s")
    print("| job | submit call | submit -> RUNNING | RUNNING -> SUCCEEDED | total |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['submit_s']:.2f} s | {r['to_running_s']:.2f} s | {r['run_s']:.1f} s | "
              f"{r['total_s']:.1f} s |")
    cached = rows["cv (package cached, median)"]["total_s"]
    print(f"| `ipb cv --address` (driver joins directly) | | | | {direct_s:.1f} s |")
    print(f"job overhead against the direct driver: {cached - direct_s:+.1f} s ({(cached - direct_s) / direct_s:+.0%})")
    print(f"shared-storage probe on 2 nodes (2 paths): median {statistics.median(probes) * 1000:.0f} ms "
          f"(first {probes[0] * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
