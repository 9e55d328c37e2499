"""Classification metrics, named as in the paper (pure numpy).

TPR (true positive rate, i.e. recall) = TP / (TP + FN) and F1 = 2TP / (2TP + FP + FN) per
class; precision = TP / (TP + FP) is reported separately and named as such (the authors'
code wrote precision under the name TPR). Balanced accuracy = the mean per-class TPR.
A class with no examples has an undefined TPR (NaN) and is left out of macro averages.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["classification_report", "confusion_matrix", "per_class"]


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; rows are true classes, columns predicted classes."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in length")
    bad = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if bad.any():
        raise ValueError(f"class indices must lie in [0, {num_classes - 1}]; got "
                         f"{sorted(set(t[bad].tolist()) | set(p[bad].tolist()))[:5]}")
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class ``tpr``, ``precision``, ``f1`` and ``support`` from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    return {"tpr": _ratio(tp, tp + fn), "precision": _ratio(tp, tp + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "support": cm.sum(axis=1)}


def classification_report(y_true: Sequence[int], y_pred: Sequence[int],
                          class_names: Sequence[str]) -> dict[str, Any]:
    """Everything a fold reports: per-class TPR/precision/F1, macro averages, balanced
    accuracy, accuracy and the confusion matrix (JSON-ready lists and floats)."""
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    pc = per_class(cm)
    present = pc["support"] > 0

    def macro(v: np.ndarray) -> float:
        vals = v[present & ~np.isnan(v)]
        return float(vals.mean()) if vals.size else float("nan")

    total = cm.sum()
    return {
        "class_names": list(class_names),
        "confusion_matrix": cm.tolist(),
        "tpr": {n: float(v) for n, v in zip(class_names, pc["tpr"])},
        "precision": {n: float(v) for n, v in zip(class_names, pc["precision"])},
        "f1": {n: float(v) for n, v in zip(class_names, pc["f1"])},
        "support": {n: int(v) for n, v in zip(class_names, pc["support"])},
        "macro_tpr": macro(pc["tpr"]),
        "macro_f1": macro(pc["f1"]),
        "macro_precision": macro(pc["precision"]),
        "balanced_accuracy": macro(pc["tpr"]),
        "accuracy": float(np.trace(cm) / total) if total else float("nan"),
        "n": int(total),
    }
