"""What the fixed fine-tuning guard would have chosen, from the runs' own histories.

    python benchmarks/guard_posthoc.py RUNS_DIR RESULTS.json LABEL:METHOD:EPOCHS ...

The fine-tuning stage restarts selection. Before commit "keep_start across fine-tuning"
it selected anew (its first epoch always replaced the choice it started from, even when
worse on V); since, under ``method.keep_start``, its networks must beat that choice on V.
Selection never changes what is trained, so for a run made before the fix the fixed
choice follows from its history: the pre-fine-tuning choice (its test report is the
``LABEL before fine-tuning`` row) unless a fine-tuning epoch scored at least as well on V
(then the run's own final report). ``LABEL:METHOD:EPOCHS`` names a row of the benchmark
JSON, the ``method.name`` in its run directories and their number of epochs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _v(h: dict, key: str = "val_balanced_accuracy") -> float:
    v = h.get(key)
    return -1.0 if v is None else float(v)


def fixed_choice(history: list[dict]) -> str:
    """``"finetune"`` or ``"before"``: which choice the guarded selection returns."""
    before = [h for h in history if h["stage"] != "finetune" and "best_epoch" in h]
    if not before:
        return "finetune"
    last = before[-1]  # the choice fine-tuning started from, and its V score
    score = _v(last, "teacher_val_balanced_accuracy") if last.get("best_net") == "teacher" \
        and last["stage"] != "teacher" else _v(last)
    fine = [_v(h) for h in history if h["stage"] == "finetune"]
    return "finetune" if fine and max(fine) >= score else "before"


def main(argv: list[str]) -> int:
    runs, results = Path(argv[0]), json.loads(Path(argv[1]).read_text())["results"]
    for spec in argv[2:]:
        label, method, epochs = spec.split(":")
        row, before = results[label], results[f"{label} before fine-tuning"]
        out = []
        for fold in row["folds"]:
            dirs = sorted(runs.glob(f"acc-*-{method}-fold{fold}"), key=lambda p: p.stat().st_mtime)
            hist = None
            for d in dirs:
                cps = sorted(d.glob("checkpoint_*"))
                h = json.loads((cps[-1] / "history.json").read_text()) if cps else []
                if len(h) == int(epochs) and (label.startswith("fixmatch") or
                                               any(r.get("student_loss_sup", 0) > 0 for r in h)):
                    hist = h  # the latest run of this row and fold
            if hist is None:
                print(f"{label} fold {fold}: no run directory found", file=sys.stderr)
                continue
            pick = fixed_choice(hist)
            i, j = row["folds"].index(fold), before["folds"].index(fold)
            rep = row["reports"][i] if pick == "finetune" else before["reports"][j]
            out.append((fold, pick, rep["macro_tpr"], min(v for v in rep["tpr"].values() if v == v)))
            print(f"{label} fold {fold}: {pick:8s} macro TPR {rep['macro_tpr']:.3f} (as run "
                  f"{row['reports'][i]['macro_tpr']:.3f}) worst {out[-1][3]:.3f}")
        if out:
            print(f"{label} guarded: mean macro TPR {sum(o[2] for o in out) / len(out):.3f}, worst-class "
                  f"{sum(o[3] for o in out) / len(out):.3f} over folds {[o[0] for o in out]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
