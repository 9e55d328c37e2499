"""How fast does `ipb predict` go? Frames/s and colonies/s over full-size frames.

    python benchmarks/predict.py [--frames 8] [--size 2908] [--workers 1,2] [--model REF] [--out DIR]

Writes a synthetic plate of ``--frames`` frames of ``--size``² px (the paper's 2908 px
frames), trains the demo's model on a small synthetic world unless ``--model`` names one
(models:/..., runs:/... or a checkpoint directory), then runs the real ``ipb predict``
pipeline (Ray Data: segmentation tasks, a classifying actor pool of ``--workers`` actors)
once per worker count, each into a fresh output directory. Prints, per run: wall
seconds, frames/s and colonies/s (start-up included), and the share of the task time
spent in segmentation against inference (the sum over frames of the segmentation task's
time, and over batches of the classifier's).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _demo_model(root: Path) -> str:
    """A checkpoint of the demo's network trained on fold 0 of a small synthetic world."""
    from ipb_ray.config import load_config
    from ipb_ray.data import synth
    from ipb_ray.distributed.preprocess import build_catalog
    from ipb_ray.distributed.training import train_fold

    synth.write_world(synth.SynthConfig(frames=6, frame_size=1024, colonies_per_frame=16, colony_scale=0.4, seed=0,
                                        image_format="png"), root / "world")
    cfg = load_config(preset="demo", overrides=[
        f"data.frames={root / 'world'}", "data.annotations=null", f"data.catalog={root / 'catalog'}",
        f"tracking.storage_path={root / 'runs'}", "method.name=supervised", "resources.num_workers=0"])
    build_catalog(cfg)
    return train_fold(cfg, 0)["checkpoint"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=2908)
    ap.add_argument("--colonies", type=int, default=40, help="colonies per frame")
    ap.add_argument("--workers", default="1,2", help="classifying actors, comma-separated runs")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--out", default="/tmp/ipb-predict-bench")
    args = ap.parse_args(argv)

    from ipb_ray.config import load_config
    from ipb_ray.data import synth
    from ipb_ray.distributed.predict import run_predict
    from ipb_ray.tracking.registry import load_predictor

    out = Path(args.out)
    plate = out / "plate"
    if not (plate / "frames").is_dir() or len(list((plate / "frames").glob("*"))) != args.frames:
        shutil.rmtree(plate, ignore_errors=True)
        t0 = time.perf_counter()
        synth.write_world(synth.SynthConfig(frames=args.frames, frame_size=args.size, colonies_per_frame=args.colonies,
                                            colony_scale=1.0, seed=5, image_format="png"), plate)
        print(f"wrote {args.frames} frames of {args.size}² px in {time.perf_counter() - t0:.0f} s", flush=True)
    model = args.model or _demo_model(out / "train")
    predictor = load_predictor(model, args.tracking_uri)
    cfg = load_config(preset="demo", overrides=["resources.num_workers=0"])
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        run_out = out / f"run-w{workers}"
        shutil.rmtree(run_out, ignore_errors=True)
        s = run_predict(predictor, str(plate / "frames"), run_out, cfg=cfg, workers=workers, overlays=0)
        task_s = s.segment_seconds + s.infer_seconds
        rows.append((workers, s.seconds, s.frames, s.colonies, s.segment_seconds / task_s if task_s else float("nan"),
                     s.segment_seconds, s.infer_seconds))
        print(f"workers {workers}: {s.frames} frames, {s.colonies} colonies in {s.seconds:.1f} s", flush=True)
    print(f"\nmodel {predictor.source} ({predictor.members} network(s), {predictor.cfg.model.backbone}, windows "
          f"{predictor.cfg.data.global_patch}+{predictor.cfg.data.local_patch} px, tta {predictor.cfg.eval.tta}); "
          f"{args.frames} frames of {args.size}² px")
    print("| classifying actors | wall s | frames/s | colonies/s | segmentation share of task time | "
          "segmentation task-s | inference task-s |")
    print("|---|---|---|---|---|---|---|")
    for w, wall, frames, colonies, share, seg, inf in rows:
        print(f"| {w} | {wall:.1f} | {frames / wall:.3f} | {colonies / wall:.1f} | {share:.0%} | {seg:.1f} | {inf:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
