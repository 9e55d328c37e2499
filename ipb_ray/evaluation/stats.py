"""Cross-validation summaries and paired comparison of two configurations (numpy/scipy).

Inputs are per-fold dicts from :func:`ipb_ray.evaluation.metrics.classification_report`. A metric that
is NaN in a fold (e.g. the TPR of a class absent from that fold's truth) is left out of
that metric's summary rather than poisoning it; every summary says how many folds it used.
Outputs are plain floats, ints, lists and dicts (NaN stays a float NaN, as in the reports).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from scipy import stats as sps

__all__ = ["PER_CLASS_METRICS", "SCALAR_METRICS", "aggregate_folds", "format_comparison", "paired_tests"]

PER_CLASS_METRICS = ("tpr", "precision", "f1")
SCALAR_METRICS = ("macro_tpr", "macro_f1", "macro_precision", "balanced_accuracy", "accuracy")
_REQUIRED_KEYS = ("class_names", "confusion_matrix") + PER_CLASS_METRICS + SCALAR_METRICS
# (metric key in a report, row name) of the whole-model rows of paired_tests
_MACRO_ROWS = (("macro_tpr", "macro TPR"), ("macro_f1", "macro F1"))


def _check_reports(reports: Sequence[dict], label: str = "reports") -> list[str]:
    """Check every fold report has the needed keys and the same class names; return them."""
    if len(reports) == 0:
        raise ValueError(f"{label} is empty; pass one classification_report per fold")
    names: list[str] | None = None
    for i, rep in enumerate(reports):
        if not isinstance(rep, dict):
            raise ValueError(f"{label}[{i}] is a {type(rep).__name__}, not a dict; pass "
                             "the dicts returned by metrics.classification_report")
        missing = [k for k in _REQUIRED_KEYS if k not in rep]
        if missing:
            raise ValueError(f"{label}[{i}] lacks {missing}; pass the dicts returned by "
                             "metrics.classification_report")
        fold_names = list(rep["class_names"])
        if names is None:
            names = fold_names
        elif fold_names != names:
            raise ValueError(f"{label}[{i}] has class_names {fold_names} but {label}[0] has "
                             f"{names}; every fold must be scored with the same classes in "
                             "the same order")
    assert names is not None
    return names


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample std (ddof=1) of the non-NaN values, and how many there were."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    mean = float(v.mean()) if v.size else math.nan
    std = float(v.std(ddof=1)) if v.size >= 2 else math.nan
    return {"mean": mean, "std": std, "n": int(v.size)}


def aggregate_folds(reports: Sequence[dict]) -> dict[str, Any]:
    """Summarise per-fold reports: mean/std per class and of the whole-model metrics,
    plus the confusion matrix summed over folds.

    Layout::

        {"folds": k, "class_names": [...],
         "tpr" | "precision" | "f1": {"mean": {cls: x}, "std": {cls: x}, "n": {cls: int}},
         "macro_tpr" | "macro_f1" | "macro_precision" | "balanced_accuracy" | "accuracy":
             {"mean": x, "std": x, "n": int},
         "confusion_matrix": [[int, ...], ...]}   # rows = true class

    NaN fold values are ignored; ``n`` counts the folds actually used. The std is the
    sample std (ddof=1) and is NaN when fewer than two folds have a value; the mean is NaN
    when none has.
    """
    names = _check_reports(reports)
    out: dict[str, Any] = {"folds": len(reports), "class_names": names}
    for metric in PER_CLASS_METRICS:
        summaries = {c: _mean_std([float(rep[metric][c]) for rep in reports]) for c in names}
        out[metric] = {key: {c: summaries[c][key] for c in names} for key in ("mean", "std", "n")}
    for metric in SCALAR_METRICS:
        out[metric] = _mean_std([float(rep[metric]) for rep in reports])
    cms = [np.asarray(rep["confusion_matrix"], dtype=np.int64) for rep in reports]
    for i, cm in enumerate(cms):
        if cm.shape != (len(names), len(names)):
            raise ValueError(f"reports[{i}] has a {cm.shape} confusion matrix for "
                             f"{len(names)} classes; the report looks hand-edited or corrupt")
    out["confusion_matrix"] = np.sum(cms, axis=0).tolist()
    return out


def _paired_row(name: str, metric: str, xa: Sequence[float], xb: Sequence[float],
                alpha: float) -> dict[str, Any]:
    """One comparison row; folds where either side is NaN are dropped first."""
    a = np.asarray(xa, dtype=np.float64)
    b = np.asarray(xb, dtype=np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    n = int(a.size)
    mean_a = float(a.mean()) if n else math.nan
    mean_b = float(b.mean()) if n else math.nan
    diffs = b - a
    if n < 2:
        p_t = p_w = math.nan          # nothing to test with fewer than two pairs
    elif np.all(diffs == 0):
        p_t = p_w = 1.0               # identical on every fold: no evidence of a difference
    else:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # a constant nonzero difference has zero spread: t = +-inf, p = 0 (scipy warns)
            warnings.simplefilter("ignore", RuntimeWarning)
            p_t = float(sps.ttest_rel(b, a).pvalue)
            p_w = float(sps.wilcoxon(b, a).pvalue)
    return {
        "name": name, "metric": metric, "n": n,
        "mean_a": mean_a, "mean_b": mean_b, "diff": mean_b - mean_a,
        "p_t": p_t, "p_w": p_w,
        "significant_t": bool(p_t < alpha), "significant_w": bool(p_w < alpha),  # NaN -> False
        "alpha": alpha,
    }


def paired_tests(a: Sequence[dict], b: Sequence[dict], alpha: float = 0.05) -> list[dict]:
    """Compare configuration B with A fold by fold (same folds, same order).

    One row per class (its TPR), then "macro TPR" and "macro F1". Each row::

        {"name": class name | "macro TPR" | "macro F1",
         "metric": "tpr" | "macro_tpr" | "macro_f1",
         "n": folds used, "mean_a": x, "mean_b": x, "diff": mean_b - mean_a,
         "p_t": paired Student's t-test p (scipy.stats.ttest_rel, two-sided),
         "p_w": Wilcoxon signed-rank p (scipy.stats.wilcoxon, two-sided, zero
                differences dropped as scipy's default "wilcox" does),
         "significant_t": p_t < alpha, "significant_w": p_w < alpha, "alpha": alpha}

    Folds where either configuration's value is NaN are dropped for that row, and the means
    are over the folds kept. Edge cases, chosen so nothing crashes: fewer than two folds
    left -> both p-values NaN (not significant); every difference exactly zero -> both
    p-values 1.0. A constant nonzero difference gives the t-test p = 0. With k nonzero
    differences the smallest two-sided Wilcoxon p is 2 / 2**k, so at alpha = 0.05 it needs
    six or more folds to ever be significant.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1; got {alpha}")
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} fold reports but b has {len(b)}; paired tests need "
                         "both configurations scored on the same folds")
    names_a = _check_reports(a, "a")
    names_b = _check_reports(b, "b")
    if names_a != names_b:
        raise ValueError(f"a has class_names {names_a} but b has {names_b}; score both "
                         "configurations with the same classes in the same order")
    rows = [_paired_row(c, "tpr", [float(r["tpr"][c]) for r in a],
                        [float(r["tpr"][c]) for r in b], alpha) for c in names_a]
    for key, label in _MACRO_ROWS:
        rows.append(_paired_row(label, key, [float(r[key]) for r in a],
                                [float(r[key]) for r in b], alpha))
    return rows


def _fmt(x: float, spec: str) -> str:
    return "n/a" if math.isnan(x) else format(x, spec)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_comparison(rows: Sequence[dict], name_a: str, name_b: str) -> str:
    """Markdown table of :func:`paired_tests` rows; a ``*`` follows each p-value below the
    rows' alpha. Per-class rows read "TPR (<class>)"."""
    a, b = _cell(name_a), _cell(name_b)
    lines = [f"| metric | {a} mean | {b} mean | {b} − {a} | t-test p | Wilcoxon p | n |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = f"TPR ({r['name']})" if r["metric"] == "tpr" else str(r["name"])
        p_t = _fmt(r["p_t"], ".3g") + ("*" if r["significant_t"] else "")
        p_w = _fmt(r["p_w"], ".3g") + ("*" if r["significant_w"] else "")
        lines.append(f"| {_cell(label)} | {_fmt(r['mean_a'], '.3f')} | "
                     f"{_fmt(r['mean_b'], '.3f')} | {_fmt(r['diff'], '+.3f')} | "
                     f"{p_t} | {p_w} | {r['n']} |")
    if rows:
        alphas = sorted({float(r["alpha"]) for r in rows})
        lines.append("")
        lines.append(f"`*` p < {', '.join(format(x, 'g') for x in alphas)} "
                     "(two-sided, paired over folds)")
    return "\n".join(lines)
