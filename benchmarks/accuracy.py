"""Does ipb-ray learn? Its methods against a plain PyTorch reference, on the same folds.

    python benchmarks/accuracy.py CATALOG --folds 5 --methods reference,supervised,mpl,ipb \
        [--preset demo | --config my.yaml] [--json out.json] [--base ROW] [--budget-s S] [overrides ...]

- ``reference``: a plain in-process PyTorch trainer written here, with no Ray and no
  ipb-ray model, stream or loop: each colony's whole crop resized to one square size, a
  three-block CNN, AdamW with a one-cycle lr, flips and 90 degree rotations, class-balanced
  sampling of L, mean/std normalisation, best epoch on V, tested on T. The honest floor a
  user could write in an afternoon.
- ``supervised``, ``mpl``, ``ipb``, ``pseudo_label`` (any registered method; ``name+balancer``,
  e.g. ``pseudo_label+pseudo_balance``, sets ``method.balancer`` too; a variant with its own
  overrides is written ``label=name[+balancer][key=value key=value]``, e.g.
  ``ipb-paper=ipb[method.keep_start=false method.mpl.student_labelled=0]``): ipb-ray's real path
  (Ray Train on a local Ray cluster), :func:`ipb_ray.distributed.training.train_fold` with the
  configuration's settings.
  The reference takes exactly as many optimizer steps as ``supervised``
  (``method.epochs x steps per epoch``); MPL/IPB add ``method.teacher_epochs`` of
  pre-training and take ``method.epochs x steps per epoch`` teacher/student steps (and,
  with ``method.finetune_epochs``, that many epochs of fine-tuning on L, reported as
  ``ipb`` with a second row ``ipb before fine-tuning``).

Every method sees the same fold's L (training), V (model selection) and T (test) from
the catalog's stored folds (or a view drawn for the configured split). Prints per method:
macro TPR, worst-class TPR, macro F1, accuracy, wall time, and the paired t-test p of
macro TPR and worst-class TPR against ``supervised`` (or the first method, or ``--base``). ``--json``
writes every fold's report as soon as the fold ends, and a rerun with the same ``--json``
skips the (method, fold) pairs already there: a long benchmark resumes where it stopped.
For methods with a pseudo-balancer the curves print, per epoch, the teacher's pseudo-label
precision and recall per class on U (against U's hidden labels), each class's share of
the draw and the most copies of one colony; ``--json`` keeps them too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# --------------------------------------------------------------------------- the reference

def _load_crops(catalog_dir: str, ids: list[str], size: int) -> np.ndarray:
    """Whole crops of ``ids`` (in order) resized to ``size`` x ``size``, float32 in [0, 1]."""
    import cv2
    import pyarrow.parquet as pq

    from ipb_ray.data.catalog import SCHEMA, decode_png

    table = pq.read_table(Path(catalog_dir) / "parts", columns=["colony_id", "image"], schema=SCHEMA)
    where = {c: i for i, c in enumerate(table.column("colony_id").to_pylist())}
    images = table.column("image")
    out = np.empty((len(ids), 1, size, size), np.float32)
    for k, cid in enumerate(ids):
        crop = decode_png(images[where[cid]].as_py())
        out[k, 0] = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    return out


def _reference_net(num_classes: int, width: int = 32):
    import torch.nn as nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))

    return nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * width, num_classes))


def _augment(x: Any, gen: Any) -> Any:
    """Random flips and 90 degree rotations, one draw per sample."""
    import torch

    flip_h = torch.rand(len(x), generator=gen) < 0.5
    flip_v = torch.rand(len(x), generator=gen) < 0.5
    turns = torch.randint(0, 4, (len(x),), generator=gen)
    x = x.clone()
    x[flip_h] = x[flip_h].flip(-1)
    x[flip_v] = x[flip_v].flip(-2)
    for k in (1, 2, 3):
        sel = turns == k
        x[sel] = torch.rot90(x[sel], k, (-2, -1))
    return x


def reference_fold(catalog_dir: str, inputs: Any, steps: int, batch_size: int, size: int, seed: int,
                   lr: float = 3e-3, eval_every: int | None = None) -> dict[str, Any]:
    """Train the reference on one fold's L, pick the best evaluation on V, test on T."""
    import torch
    import torch.nn.functional as F

    from ipb_ray.evaluation.metrics import classification_report

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    names = inputs.class_names
    x_l = torch.from_numpy(_load_crops(catalog_dir, list(inputs.labelled), size))
    y_l = torch.tensor(inputs.labelled_labels, dtype=torch.int64)
    label_of = _labels(catalog_dir, names)
    val_ids, test_ids = list(inputs.validation), list(inputs.test)
    x_v = torch.from_numpy(_load_crops(catalog_dir, val_ids, size)) if val_ids else None
    y_v = np.array([label_of[c] for c in val_ids], np.int64)
    x_t = torch.from_numpy(_load_crops(catalog_dir, test_ids, size))
    y_t = np.array([label_of[c] for c in test_ids], np.int64)
    mean, std = float(x_l.mean()), float(x_l.std()) or 1.0
    norm = (lambda x: (x - mean) / std)

    net = _reference_net(len(names))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    counts = np.bincount(y_l.numpy(), minlength=len(names)).astype(np.float64)
    weights = torch.from_numpy((1.0 / np.maximum(counts, 1))[y_l.numpy()])  # class-balanced draws
    eval_every = eval_every or max(1, steps // 20)

    def predict(x: Any) -> np.ndarray:
        net.eval()
        with torch.no_grad():
            out = torch.cat([net(norm(x[i:i + 256])) for i in range(0, len(x), 256)])
        net.train()
        return out.argmax(1).numpy()

    best, best_state = -1.0, None
    for step in range(steps):
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
        loss = F.cross_entropy(net(norm(_augment(x_l[idx], gen))), y_l[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % eval_every == 0 or step == steps - 1:
            score = classification_report(y_v, predict(x_v), names)["balanced_accuracy"] if x_v is not None \
                else float(step)
            if score >= best:
                best, best_state = score, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return classification_report(y_t, predict(x_t), names)


def _labels(catalog_dir: str, names: tuple[str, ...]) -> dict[str, int]:
    from ipb_ray.data.catalog import read_catalog

    table = read_catalog(catalog_dir, columns=["colony_id", "label"])
    index = {n: i for i, n in enumerate(names)}
    return {c: index.get(lab, -1) for c, lab in zip(table.column("colony_id").to_pylist(),
                                                    table.column("label").to_pylist())}


# --------------------------------------------------------------------------- the table

def _worst(report: dict[str, Any]) -> float:
    """The lowest per-class TPR of a report (classes absent from T, NaN, left out)."""
    return min(v for v in report["tpr"].values() if v == v)


def _summary(reports: list[dict[str, Any]]) -> dict[str, float]:
    worst = [_worst(r) for r in reports]
    return {"macro_tpr": float(np.mean([r["macro_tpr"] for r in reports])),
            "macro_tpr_std": float(np.std([r["macro_tpr"] for r in reports])),
            "worst_tpr": float(np.mean(worst)),
            "macro_f1": float(np.mean([r["macro_f1"] for r in reports])),
            "accuracy": float(np.mean([r["accuracy"] for r in reports]))}


def _paired_p(a: list[float], b: list[float]) -> float:
    from scipy import stats

    if len(a) < 2:
        return float("nan")
    d = np.asarray(b) - np.asarray(a)
    if np.allclose(d, 0):
        return 1.0
    return float(stats.ttest_rel(b, a).pvalue)


def print_table(results: dict[str, dict[str, Any]], base: str) -> str:
    lines = ["| method | macro TPR (mean ± std) | worst-class TPR | macro F1 | accuracy | wall s/fold | "
             f"p macro TPR vs {base} | p worst-class vs {base} |",
             "|---|---|---|---|---|---|---|---|"]
    ref = results.get(base)
    for name, res in results.items():
        s = _summary(res["reports"])
        p1 = p2 = float("nan")
        if ref is not None and name != base:  # paired over the folds both rows have
            fa = ref.get("folds") or list(range(len(ref["reports"])))
            fb = res.get("folds") or list(range(len(res["reports"])))
            both = [f for f in fa if f in fb]
            ra = [ref["reports"][fa.index(f)] for f in both]
            rb = [res["reports"][fb.index(f)] for f in both]
            p1 = _paired_p([r["macro_tpr"] for r in ra], [r["macro_tpr"] for r in rb])
            p2 = _paired_p([_worst(r) for r in ra], [_worst(r) for r in rb])
        fmt = lambda p: "-" if p != p else f"{p:.3f}"  # noqa: E731
        wall = lambda s: "-" if np.all(np.isnan(s)) else f"{np.nanmean(s):.0f}"  # noqa: E731
        lines.append(f"| {name} | {s['macro_tpr']:.3f} ± {s['macro_tpr_std']:.3f} | {s['worst_tpr']:.3f} | "
                     f"{s['macro_f1']:.3f} | {s['accuracy']:.3f} | {wall(res['seconds'])} | {fmt(p1)} | "
                     f"{fmt(p2)} |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _print_curves(method: str, fold: int, history: list[dict[str, Any]], names: tuple[str, ...]) -> None:
    """One line per epoch: losses, validation balanced accuracy and, for IPB, the
    teacher's pseudo-label mix and what the student's stream received."""
    for h in history:
        loss, val = h.get("train_loss"), h.get("val_balanced_accuracy")
        line = f"  {method} fold {fold} epoch {h['epoch']} ({h.get('stage')}): loss " \
               f"{loss if loss is None else round(loss, 3)} val BA {val if val is None else round(val, 3)}"
        if f"teacher_proportion/{names[0]}" in h:
            line += " teacher mix " + " ".join(f"{n}:{h[f'teacher_proportion/{n}']:.2f}" for n in names)
            line += " -> stream " + " ".join(f"{n}:{h.get(f'stream_share/{n}', 0):.2f}" for n in names)
            if f"pseudo_precision/{names[0]}" in h:  # against U's hidden labels
                fmt = lambda v: "-" if v is None or v != v else f"{v:.2f}"  # noqa: E731
                line += (f"\n    pseudo-labels acc {fmt(h.get('pseudo_accuracy'))} precision/recall "
                         + " ".join(f"{n}:{fmt(h.get(f'pseudo_precision/{n}'))}/{fmt(h.get(f'pseudo_tpr/{n}'))}"
                                    for n in names)
                         + f"; draw right {fmt(h.get('draw_precision'))}, most copies {h.get('max_copies')}")
        print(line, flush=True)


def print_balance(results: dict[str, dict[str, Any]], names: list[str]) -> None:
    """Per pseudo-balanced method, fold-mean per class: the teacher's pseudo-label precision
    and recall on U at the first and the last unlabelled epoch, the draw's share by pseudo
    and by true class in the last, and over the run the share of draws whose label is
    right and the most copies of one colony."""
    def mean(rows: list[list[Any]]) -> np.ndarray:
        a = np.array([[np.nan if v is None else float(v) for v in r] for r in rows], dtype=np.float64)
        return np.nanmean(a, axis=0) if a.size else np.full(len(names), np.nan)

    for name, res in results.items():
        runs = [b for b in res.get("balance", []) if b]
        if not runs:
            continue
        print(f"\n{name}: pseudo-labels on U against its hidden labels, mean of {len(runs)} folds")
        print("| class | precision first / last | recall first / last | draw share last (by truth) |")
        print("|---|---|---|---|")
        cols = {}
        for key in ("pseudo_precision", "pseudo_tpr"):
            cols[key] = (mean([r[0][key] for r in runs]), mean([r[-1][key] for r in runs]))
        share, true_share = mean([r[-1]["draw_share"] for r in runs]), mean([r[-1]["draw_true_share"] for r in runs])
        for i, n in enumerate(names):
            p0, p1 = cols["pseudo_precision"][0][i], cols["pseudo_precision"][1][i]
            r0, r1 = cols["pseudo_tpr"][0][i], cols["pseudo_tpr"][1][i]
            print(f"| {n} | {p0:.2f} / {p1:.2f} | {r0:.2f} / {r1:.2f} | {share[i]:.3f} ({true_share[i]:.3f}) |")
        acc = [[e.get("pseudo_accuracy") for e in r] for r in runs]
        right = [[e.get("draw_precision") for e in r] for r in runs]
        copies = [max(e.get("max_copies") or 0 for e in r) for r in runs]
        print(f"pseudo-label accuracy per epoch {np.round(mean(acc), 2).tolist()}; draws with the right label "
              f"per epoch {np.round(mean(right), 2).tolist()}; most copies of one colony {max(copies)}", flush=True)


def parse_methods(text: str) -> list[tuple[str, str, list[str]]]:
    """``--methods`` entries as ``(label, method[+balancer], overrides)``: commas inside
    ``[...]`` do not split, ``label=`` is optional (default: the entry itself)."""
    entries, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            entries.append(cur)
            cur = ""
        else:
            cur += ch
    entries.append(cur)
    out = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        body, _, rest = entry.partition("[")
        label, eq, name = body.partition("=")
        if not eq:
            label, name = entry, body
        if rest and not rest.endswith("]"):
            raise SystemExit(f"--methods entry {entry!r}: overrides go in one [...] at the end")
        out.append((label.strip(), name.strip(), rest[:-1].split() if rest else []))
    return out


PB_CURVES = ("pseudo_precision", "pseudo_tpr", "draw_share", "draw_true_share", "teacher_proportion")


def _balance_curves(history: list[dict[str, Any]], names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The pseudo-balancer's per-epoch figures of a run (epochs that have them)."""
    keep = []
    for h in history:
        if f"teacher_proportion/{names[0]}" not in h:
            continue
        row = {"epoch": h["epoch"], "max_copies": h.get("max_copies"), "draw_precision": h.get("draw_precision"),
               "pseudo_accuracy": h.get("pseudo_accuracy"), "val_balanced_accuracy": h.get("val_balanced_accuracy")}
        for key in PB_CURVES:
            row[key] = [h.get(f"{key}/{n}") for n in names]
        keep.append(row)
    return keep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("catalog")
    ap.add_argument("--folds", type=int, default=3, help="the first N folds")
    ap.add_argument("--methods", default="reference,supervised,mpl,ipb")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--config", default=None)
    ap.add_argument("--reference-size", type=int, default=None,
                    help="side the reference resizes whole crops to (default data.patch_size or global_patch)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new folds after this long")
    ap.add_argument("--json", default=None, help="write every fold's report here")
    ap.add_argument("--base", default=None, help="row the others are compared with (default: supervised, else "
                    "the first method); with --json, any row the file holds")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. method.epochs=10")
    args = ap.parse_intermixed_args(argv)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from ipb_ray.config import load_config
    from ipb_ray.data.fold_views import fold_catalog
    from ipb_ray.distributed.training import train_fold
    from ipb_ray.engine.fold import fold_inputs, labelled_steps

    cfg = load_config(args.config, overrides=[f"data.catalog={args.catalog}", *args.overrides],
                      preset=None if args.config else args.preset)
    cfg = cfg.replace(f"data.catalog={fold_catalog(cfg)}")
    specs = parse_methods(args.methods)
    methods = [label for label, _, _ in specs]
    m = cfg.method
    size = args.reference_size or (cfg.data.global_patch if cfg.data.multi_scale else cfg.data.patch_size)
    print(f"catalog {cfg.data.catalog}; folds 0..{args.folds - 1}; methods {methods}; model {cfg.model.backbone} "
          f"width {cfg.model.width}; epochs {m.teacher_epochs}+{m.epochs}+{m.finetune_epochs} fine-tuning; steps/epoch "
          f"{m.steps_per_epoch or 'one pass'}; batch {m.batch_size}", flush=True)
    results: dict[str, dict[str, Any]] = {k: {"reports": [], "seconds": [], "folds": [], "steps": [],
                                              "balance": []} for k in methods}
    if args.json and Path(args.json).exists():  # resume: keep what an earlier run of this command finished
        old = json.loads(Path(args.json).read_text())["results"]
        for k, v in old.items():
            results.setdefault(k, {"reports": [], "seconds": [], "folds": [], "steps": [], "balance": []}).update(v)
        print(f"resuming from {args.json}: " + ", ".join(f"{k} folds {v.get('folds')}" for k, v in old.items()),
              flush=True)

    def save() -> None:
        if args.json:
            done = {k: v for k, v in results.items() if v["reports"]}
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps({"config": cfg.name, "catalog": cfg.data.catalog, "overrides": args.overrides,
                                       "methods": args.methods, "results": done}, indent=1, default=float))
            tmp.replace(args.json)

    def record(key: str, fold: int, report: dict[str, Any], seconds: float, steps: int,
               balance: list[dict[str, Any]] | None = None) -> None:
        res = results.setdefault(key, {"reports": [], "seconds": [], "folds": [], "steps": [], "balance": []})
        for k in ("folds", "steps", "balance"):
            res.setdefault(k, [])
        res["reports"].append(report)
        res["seconds"].append(seconds)
        res["folds"].append(fold)
        res["steps"].append(steps)
        res["balance"].append(balance or [])

    t_start = time.perf_counter()
    for fold in range(args.folds):
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: stopping before fold {fold}", flush=True)
            break
        inputs = fold_inputs(cfg, fold)
        steps = labelled_steps(len(inputs.labelled), max(cfg.resources.num_workers, 1), m.batch_size,
                               m.steps_per_epoch) * m.epochs
        for method, (_, spec, extra) in zip(methods, specs):
            if fold in results[method].get("folds", []):
                continue  # finished by an earlier run of this command
            t0 = time.perf_counter()
            balance: list[dict[str, Any]] = []
            run_steps = steps
            if spec == "reference":
                report = reference_fold(cfg.data.catalog, inputs, steps, m.batch_size, size, cfg.seed + fold)
            else:
                name, _, balancer = spec.partition("+")  # e.g. pseudo_label+pseudo_balance
                run = cfg.replace(f"method.name={name}", f"name=acc-{cfg.name}-{int(time.time())}",
                                  *([f"method.balancer={balancer}"] if balancer else []), *extra)
                out = train_fold(run, fold)
                report = out["test_report"]
                history = out.get("history", [])
                run_steps = int(sum(h.get("train_steps", 0) or 0 for h in history))
                balance = _balance_curves(history, inputs.class_names)
                _print_curves(method, fold, history, inputs.class_names)
                if out.get("pre_finetune_test_report"):  # method.finetune_epochs: the MPL stage's own choice too
                    record(f"{method} before fine-tuning", fold, out["pre_finetune_test_report"], float("nan"),
                           run_steps)
            dt = time.perf_counter() - t0
            record(method, fold, report, dt, run_steps, balance)
            save()
            print(f"fold {fold} {method:10s} macro TPR {report['macro_tpr']:.3f} worst "
                  f"{_worst(report):.3f} acc {report['accuracy']:.3f} "
                  f"({dt:.0f} s, {run_steps} optimizer steps)", flush=True)
    done = {k: v for k, v in results.items() if v["reports"]}
    for name, res in done.items():  # eval-mode predictions on T: a collapsed model shows here
        hist = np.sum([np.asarray(r["confusion_matrix"]).sum(0) for r in res["reports"]], axis=0)
        truth = np.sum([np.asarray(r["confusion_matrix"]).sum(1) for r in res["reports"]], axis=0)
        names = res["reports"][0]["class_names"]
        print(f"{name:10s} predicted on T: " + ", ".join(f"{n} {int(h)}" for n, h in zip(names, hist))
              + "  (true: " + ", ".join(f"{n} {int(t)}" for n, t in zip(names, truth)) + ")", flush=True)
    if args.base and args.base not in done:
        print(f"--base {args.base!r} has no results; rows: {', '.join(done)}", file=sys.stderr)
        return 2
    base = args.base or ("supervised" if "supervised" in done else methods[0])
    print_table(done, base)
    if done:
        print_balance(done, list(next(iter(done.values()))["reports"][0]["class_names"]))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
