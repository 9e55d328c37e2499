"""``ipb predict``: a trained model over new frames, as one Ray Data pipeline.

    frames ─▶ segment (Ray tasks; the segmentation of ``ipb preprocess``, per frame)
           ─▶ cut the test windows and classify (an actor pool holding the model once;
              GPU actors when asked and present) ─▶ the driver writes one Parquet file per
              frame as its last colony arrives

Each frame's file is named by a key hashing the frame file (size and mtime), the
segmentation, the model and the windows, so a rerun skips finished frames and redoes
changed ones; an unreadable frame, a frame without colonies or a name that does not match
``--pattern`` goes to ``rejects/`` with the reason (and counts as finished). When all
frames are done the tables, figures and page of :mod:`ipb_ray.prediction` are written
from the per-frame files (see :func:`run_predict` for the layout of ``--out``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ipb_ray.config import ExperimentConfig, to_dict

__all__ = ["frame_key", "PredictSummary", "run_predict"]

log = logging.getLogger(__name__)
PREDICTIONS_DIR, REJECTS_DIR = "predictions", "rejects"


@dataclass
class PredictSummary:
    out: str
    model: str
    frames: int
    frames_skipped: int
    colonies: int
    rejects: int
    seconds: float
    segment_seconds: float
    infer_seconds: float
    files: dict[str, str] = field(default_factory=dict)

    @property
    def frames_per_s(self) -> float:
        done = self.frames - self.frames_skipped
        return done / self.seconds if self.seconds > 0 else math.nan


def _segment_rows(row: dict[str, Any], data: dict[str, Any], pattern: str | None) -> list[dict[str, Any]]:
    """Ray Data flat_map: one frame -> one row per colony (or one reject row for the frame)."""
    from ipb_ray.config import DataConfig, from_dict
    from ipb_ray.data import catalog, importers
    from ipb_ray.prediction.tables import compile_pattern, frame_keys

    task = importers.ShardTask.from_json(row["task"])
    t0 = time.perf_counter()
    rows, rejects = importers.run_shard(task, from_dict(data, DataConfig))
    seconds = time.perf_counter() - t0
    plane = task.items[0].get("plane")
    base = {"frame_key": row["key"], "frame": task.items[0]["source"], "path": task.items[0]["path"],
            "plane": json.dumps(plane) if plane else "",  # a stack's plane: what the overlay reads
            "seg_seconds": seconds,
            "rejects": json.dumps(rejects), "n_colonies": len(rows)}
    if not rows:
        return [{**_EMPTY, **base, "kind": "reject"}]
    try:
        first = json.loads(rows[0]["provenance"])
        well, t = frame_keys(rows[0]["source"], compile_pattern(pattern) if pattern else None,
                             first.get(catalog.ANNOTATION_COLUMNS), rows[0]["frame_index"])
    except ValueError as exc:
        return [{**_EMPTY, **base, "kind": "reject", "n_colonies": 0,
                 "rejects": json.dumps([{"source": base["frame"], "item": "frame", "reason": str(exc)}])}]
    return [{**base, "kind": "colony", "colony_id": r["colony_id"], "well": well, "time": t,
             "x0": r["x0"], "y0": r["y0"], "x1": r["x1"], "y1": r["y1"], "area_px": r["area_px"],
             "labels": ";".join(r["labels"]), "image": r["image"], "mask": r["mask"]} for r in rows]


_EMPTY = {"colony_id": "", "well": "", "time": math.nan, "x0": 0, "y0": 0, "x1": 0, "y1": 0, "area_px": 0,
          "labels": "", "image": b"", "mask": b""}


class _Classifier:
    """Ray Data actor: holds the model once; a batch of colony rows -> their predictions."""

    def __init__(self, module: Any, cfg: dict[str, Any], class_names: Sequence[str], use_gpu: bool):
        import torch

        from ipb_ray.config import from_dict
        from ipb_ray.patches.core import StreamSpec
        from ipb_ray.patches.geometry import PatchGeometry

        cfg_obj = from_dict(cfg)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.module = module.to(self.device).eval()
        self.names = tuple(class_names)
        geometry = PatchGeometry.from_config(cfg_obj.data)
        self.spec = StreamSpec(geometry, self.names, seed=cfg_obj.seed, mode="test", tta=cfg_obj.eval.tta)
        self.column = f"x{geometry.size}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ipb_ray.patches.core import patch_batch
        from ipb_ray.prediction.tables import entropy, prob_column

        t0 = time.perf_counter()
        n, k = len(batch["kind"]), len(self.names)
        members = getattr(self.module, "nets", None)
        probs, spread = np.full((n, k), np.nan, np.float32), np.zeros(n, np.float32)
        member_probs = [np.zeros(0, np.float32)] * n
        keep = np.flatnonzero(batch["kind"] == "colony")
        if len(keep):
            rows = {"colony_id": batch["colony_id"][keep], "image": batch["image"][keep],
                    "mask": batch["mask"][keep], "label": [None] * len(keep)}
            windows = patch_batch(rows, self.spec)
            x = torch.from_numpy(windows[self.column]).to(self.device)
            with torch.no_grad():
                out = self.module.member_probs(x) if members is not None else self.module(x)[None]
            out = out.float().cpu().numpy()  # (K, windows, C)
            where = {cid: i for i, cid in enumerate(rows["colony_id"])}
            per = np.zeros((len(keep), out.shape[0], k), np.float64)
            copies = np.zeros(len(keep))
            for w, cid in enumerate(windows["colony_id"]):  # the mean over each colony's tta windows
                per[where[cid]] += out[:, w, :]
                copies[where[cid]] += 1
            per /= copies[:, None, None]
            probs[keep] = per.mean(1)
            spread[keep] = per.std(1).mean(1)
            for j, i in enumerate(keep):
                member_probs[i] = per[j].astype(np.float32).ravel()
        out_batch = {key: batch[key] for key in batch if key != "image"}
        for c, name in enumerate(self.names):
            out_batch[prob_column(name)] = probs[:, c]
        best = np.nan_to_num(probs, nan=-1.0).argmax(1)
        out_batch["predicted"] = np.array([self.names[i] if kind == "colony" else "" for i, kind
                                           in zip(best, batch["kind"])], dtype=object)
        out_batch["confidence"] = np.nanmax(np.where(np.isnan(probs), -1, probs), axis=1).astype(np.float32)
        out_batch["entropy"] = entropy(np.nan_to_num(probs, nan=1.0 / k)).astype(np.float32)
        out_batch["disagreement"] = spread
        out_batch["member_probs"] = np.array(member_probs + [None], dtype=object)[:-1]
        out_batch["infer_seconds"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        return out_batch


def frame_key(task_key: str, model: str, cfg: ExperimentConfig, pattern: str | None) -> str:
    """The name of a frame's output: the frame (its shard key hashes the file and the
    segmentation), the model, the windows and the pattern."""
    text = json.dumps([task_key, model, to_dict(cfg.data), cfg.eval.tta, cfg.seed, pattern], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _atomic_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _write_frame(out: Path, key: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    kind = rows[0]["kind"]
    rejects = json.loads(rows[0]["rejects"])
    if rejects or kind == "reject":
        reasons = [{"frame": rows[0]["frame"], "item": r.get("item", "frame"), "reason": r["reason"]}
                   for r in rejects] or [{"frame": rows[0]["frame"], "item": "frame", "reason": "no colonies found"}]
        _atomic_parquet(pa.Table.from_pylist(reasons), out / REJECTS_DIR / f"{key}.parquet")
    if kind != "colony":
        return
    keep = [{k: v for k, v in r.items() if k not in ("kind", "rejects", "n_colonies", "image")} for r in rows]
    for r in keep:
        r["member_probs"] = [float(v) for v in (r["member_probs"] if r["member_probs"] is not None else [])]
    _atomic_parquet(pa.Table.from_pylist(keep), out / PREDICTIONS_DIR / f"{key}.parquet")


def run_predict(predictor: Any, frames: str, out: str | Path, *, annotations: str | None = None,
                pattern: str | None = None, cfg: ExperimentConfig | None = None, workers: int = 1,
                use_gpu: bool = False, batch_size: int = 64, suggest: int = 0, overlays: int = 4,
                progress: Callable[[int, int], None] | None = None) -> PredictSummary:
    """Predict every colony of ``frames`` (a directory or glob; ``annotations``: a table as
    ``ipb preprocess`` reads, whose labels are kept beside the predictions and whose
    ``well``/``time`` columns place each frame) with ``predictor``
    (:func:`ipb_ray.tracking.registry.load_predictor`), ``workers`` classifying actors.

    ``--out`` gets: ``predictions/<frame>.parquet`` and ``rejects/<frame>.parquet`` (one per
    frame; a rerun skips them), ``colonies.parquet`` (every colony: frame, well, time, box,
    area, ``prob/<class>``, predicted class, confidence, entropy, ensemble disagreement,
    annotated labels), ``rejects.csv``, ``per_frame.csv`` and ``per_well.csv`` (colonies and
    area per predicted class), ``timecourse.png``, ``overlays/*.png``, ``report.html``,
    ``suggestions.csv`` (with ``suggest`` > 0) and ``predict.json`` (the run's figures).
    ``cfg`` supplies the Ray resources (``resources.*``); the segmentation and windows are
    the model's own."""
    import ray

    from ipb_ray.config import ExperimentConfig as _Cfg
    from ipb_ray.data import importers
    from ipb_ray.distributed.ray_setup import init_ray
    from ipb_ray.prediction.tables import compile_pattern

    t_start = time.perf_counter()
    out = Path(out)
    if pattern:
        compile_pattern(pattern)  # a bad pattern fails here, before anything starts
    model_cfg = predictor.cfg.replace(f"data.frames={frames}", f"data.annotations={annotations}"
                                      if annotations else "data.annotations=null")
    plan = importers.plan_frames(model_cfg.data.frames, model_cfg.data.annotations, model_cfg.data, importer="frames")
    if not plan.tasks:
        raise FileNotFoundError(f"no frames found under {frames}")
    for sub in (PREDICTIONS_DIR, REJECTS_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
    keys = {t.key: frame_key(t.key, predictor.source, model_cfg, pattern) for t in plan.tasks}
    done = {p.stem for sub in (PREDICTIONS_DIR, REJECTS_DIR) for p in (out / sub).glob("*.parquet")}
    todo = [t for t in plan.tasks if keys[t.key] not in done]
    total, finished = len(plan.tasks), len(plan.tasks) - len(todo)
    if progress:
        progress(finished, total)
    log.info("predict: %d frames, %d already done", total, finished)
    seg_s = infer_s = 0.0
    if todo:
        res = (cfg or _Cfg()).resources
        init_ray(res)
        ds = ray.data.from_items([{"task": t.to_json(), "key": keys[t.key]} for t in todo],
                                 override_num_blocks=len(todo))
        ds = ds.flat_map(_segment_rows, fn_kwargs={"data": to_dict(model_cfg.data), "pattern": pattern},
                         num_cpus=res.data_cpus)
        gpu = use_gpu and ray.cluster_resources().get("GPU", 0) > 0
        ds = ds.map_batches(_Classifier, fn_constructor_kwargs={
            "module": predictor.module, "cfg": to_dict(model_cfg), "class_names": predictor.class_names,
            "use_gpu": gpu}, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=max(1, workers)),
            num_gpus=1 if gpu else 0,
            num_cpus=0 if gpu else res.data_cpus, batch_format="numpy")
        pending: dict[str, list[dict[str, Any]]] = {}
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for i in range(len(batch["kind"])):
                row = {k: v[i] for k, v in batch.items()}
                rows = pending.setdefault(str(row["frame_key"]), [])
                rows.append(row)
                infer_s += float(row["infer_seconds"])
                if len(rows) >= max(int(row["n_colonies"]), 1):
                    seg_s += float(rows[0]["seg_seconds"])
                    _write_frame(out, str(row["frame_key"]), pending.pop(str(row["frame_key"])))
                    finished += 1
                    if progress:
                        progress(finished, total)
        if pending:
            raise RuntimeError(f"{len(pending)} frame(s) did not receive all their colonies: {sorted(pending)[:5]}")
    files = _finish(out, predictor, {keys[t.key] for t in plan.tasks}, plan.rejects, suggest, overlays, frames)
    summary = PredictSummary(str(out), predictor.source, total, total - len(todo), files.pop("_colonies"),
                             files.pop("_rejects"), time.perf_counter() - t_start, seg_s, infer_s,
                             {k: v for k, v in files.items() if isinstance(v, str)})
    (out / "predict.json").write_text(json.dumps({**asdict(summary), "frames_per_s": summary.frames_per_s,
                                                  "cv_estimate": predictor.cv_estimate}, indent=2, default=str))
    return summary


def _finish(out: Path, predictor: Any, keys: set[str], plan_rejects: list[dict[str, str]], suggest: int,
            overlays: int, frames: str) -> dict[str, Any]:
    """The run's tables, figures and page, from its per-frame files (this run's frames only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ipb_ray.prediction import pages
    from ipb_ray.prediction.tables import per_frame, per_well, records, suggest as pick, time_course

    parts = [pq.read_table(p) for p in sorted((out / PREDICTIONS_DIR).glob("*.parquet")) if p.stem in keys]
    table = pa.concat_tables(parts, promote_options="default") if parts else None
    rejects = [pq.read_table(p).to_pylist() for p in sorted((out / REJECTS_DIR).glob("*.parquet")) if p.stem in keys]
    reject_rows = [r for part in rejects for r in part] + [
        {"frame": r["source"], "item": r["item"], "reason": r["reason"]} for r in plan_rejects]
    files: dict[str, Any] = {"_colonies": 0 if table is None else table.num_rows, "_rejects": len(reject_rows)}
    _csv(out / "rejects.csv", reject_rows, ["frame", "item", "reason"])
    files["rejects"] = str(out / "rejects.csv")
    names = predictor.class_names
    if table is None:
        return files
    pq.write_table(table.drop_columns(["mask"]), out / "colonies.parquet")
    files["colonies"] = str(out / "colonies.parquet")
    cols = {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in table.column_names if k != "mask"}
    cols["time"] = cols["time"].astype(np.float64)
    frame_recs, well_recs = per_frame(cols, names), per_well(cols, names)
    _csv(out / "per_frame.csv", frame_recs)
    _csv(out / "per_well.csv", well_recs)
    files.update(per_frame=str(out / "per_frame.csv"), per_well=str(out / "per_well.csv"))
    if suggest:
        picked = pick(cols, names, suggest)
        keep = ["frame", "x0", "y0", "x1", "y1", "predicted", "confidence", "entropy", "disagreement", "well", "time"]
        every = records(cols)
        rows = [{"labels": "", **{k: every[i][k] for k in keep}} for i in picked]
        _csv(out / "suggestions.csv", rows, ["frame", "x0", "y0", "x1", "y1", "labels", *keep[5:]])
        files["suggestions"] = str(out / "suggestions.csv")
    files.update(pages.write_all(out, cols, table, names, time_course(cols, names), frame_recs, reject_rows,
                                 predictor, frames, overlays))
    return files


def _csv(path: Path, rows: list[dict[str, Any]], header: Sequence[str] | None = None) -> None:
    import csv

    header = list(header or (rows[0].keys() if rows else []))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
