"""An experiment's cross-validation report, rendered from MLflow alone (HTML and Markdown).

Reads what ``ipb cv`` logs (the names below are the contract with the tracking module):

- parent runs, one per configuration: tag ``ipb.kind = "cv"``, tags ``ipb.method``,
  ``ipb.backbone``, ``ipb.preset``, ``ipb.labelled_fraction``, ``ipb.config_key``; artifact
  ``fold_reports.json`` (``[{"fold": k, "report": classification_report}, ...]``); the run
  name is the configuration's display name;
- child runs, one per fold: tag ``mlflow.parentRunId``; per-epoch metric histories (step =
  epoch) such as ``teacher_loss``, ``student_loss``, ``teacher_proportion/<class>``,
  ``sampling_weight/<class>`` and ``unlabelled_true_share/<class>``.

Renders, each only where the data exists: per-class TPR and F1 mean ± std over folds
(the paper's Tables 2 and 3), the summed confusion matrix of the best configuration
(Table 4), paired tests of every configuration against a baseline (Table 5), the loss
curves (Figure 2), the teacher's class proportions and the sampling weights (Figures 6-7)
and macro TPR against the labelled fraction (Figure 8). The HTML file is self-contained
(figures embedded); the Markdown file links the PNGs written next to it.

Summaries are recomputed from the fold reports with :func:`ipb_ray.evaluation.stats.aggregate_folds`
(the logged ``cv_summary.json`` and ``cv_*`` metrics are not needed). NaN prints "n/a".
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ipb_ray.evaluation.stats import aggregate_folds, format_comparison, paired_tests
from ipb_ray.tracking.runs import CV_KIND, FOLD_KIND, FOLD_REPORTS, Tag, quiet_downloads

__all__ = ["FIGURE_FILES", "LOSS_SERIES", "PRE_FINETUNE_MACRO_TPR", "render_report"]

# (metric key, legend label) of the loss curves of Figure 2: every stage's trained network
# (MPL/IPB: the teacher in pre-training, the student in the MPL and fine-tuning stages),
# and the teacher during the MPL steps
LOSS_SERIES = (("train_loss", "trained network"), ("teacher_loss", "teacher (MPL steps)"))


def _method_rank(name: str) -> int:
    """Tables list methods in registration order; unknown names (another version's) last."""
    from ipb_ray.methods import list_methods

    known = list_methods()
    return known.index(name) if name in known else len(known)


def _is_baseline(name: str) -> bool:
    from ipb_ray.methods import get_method

    try:
        return get_method(name).baseline
    except ValueError:
        return False
_PREFIXES = ("teacher_proportion/", "sampling_weight/", "unlabelled_true_share/", "pseudo_precision/",
             "pseudo_tpr/", "draw_share/", "draw_true_share/")
FIGURE_FILES = {"figure2": "fig2_losses.png", "figures6_7": "fig6_7_class_balance.png",
                "pseudo_labels": "fig_pseudo_labels.png", "figure8": "fig8_labelled_fraction.png"}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.best td{font-weight:bold}.note{color:#666;font-size:.9em}img{max-width:100%}
code{background:#f4f4f4;padding:0 .2em}
"""


# --------------------------------------------------------------------------- data

@dataclass
class _Config:
    """One parent run (a configuration) with its fold reports and fold-run histories."""

    run_id: str
    name: str
    method: str
    balancer: str
    backbone: str
    preset: str
    fraction_tag: str
    fraction: float
    config_key: str
    status: str
    start_time: int
    reports: dict[int, dict] = field(default_factory=dict)   # fold -> classification report
    summary: dict = field(default_factory=dict)               # aggregate_folds output
    child_ids: list[str] = field(default_factory=list)
    # metric key -> list over fold runs of {epoch: value}
    histories: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    before_finetune: list[float] = field(default_factory=list)  # fold runs' macro TPR before fine-tuning

    @property
    def class_names(self) -> list[str]:
        return list(self.summary.get("class_names", []))


def _nan(x: Any) -> float:
    """A float, with None / junk as NaN (a strict JSON writer may have turned NaN into null)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _normalise_report(rep: dict) -> dict:
    """Make a logged report acceptable to stats.aggregate_folds: nulls become NaN and the
    derived whole-model metrics that an older writer may have left out are filled in."""
    rep = dict(rep)
    names = [str(c) for c in rep.get("class_names", [])]
    rep["class_names"] = names
    for key in ("tpr", "precision", "f1"):
        vals = rep.get(key) or {}
        rep[key] = {c: _nan(vals.get(c)) for c in names}
    support = rep.get("support") or {}
    present = [c for c in names if _nan(support.get(c, 1)) > 0]

    def macro(key: str) -> float:
        v = np.asarray([rep[key][c] for c in present], dtype=np.float64)
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else math.nan

    for key, per_class in (("macro_tpr", "tpr"), ("macro_f1", "f1"), ("macro_precision", "precision")):
        rep[key] = _nan(rep[key]) if key in rep else macro(per_class)
    rep["balanced_accuracy"] = _nan(rep.get("balanced_accuracy", rep["macro_tpr"]))
    if "accuracy" in rep:
        rep["accuracy"] = _nan(rep["accuracy"])
    else:
        cm = np.asarray(rep.get("confusion_matrix", []), dtype=np.float64)
        rep["accuracy"] = float(np.trace(cm) / cm.sum()) if cm.ndim == 2 and cm.sum() > 0 else math.nan
    return rep


def _all_runs(client: Any, experiment_id: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs




def _load_fold_reports(client: Any, run_id: str, tmp: Path) -> dict[int, dict]:
    dst = tmp / run_id
    dst.mkdir(parents=True, exist_ok=True)
    local = client.download_artifacts(run_id, FOLD_REPORTS, str(dst))
    entries = json.loads(Path(local).read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{FOLD_REPORTS} holds a {type(entries).__name__}, not a list")
    reports: dict[int, dict] = {}
    for e in entries:
        reports[int(e["fold"])] = _normalise_report(e["report"])
    if not reports:
        raise ValueError(f"{FOLD_REPORTS} is empty")
    return dict(sorted(reports.items()))


def _wanted_metric(key: str) -> bool:
    return key in dict(LOSS_SERIES) or key.startswith(_PREFIXES) or key == "max_copies"


def _history(client: Any, run_id: str, key: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        out[int(m.step)] = _nan(m.value)          # the last value logged at an epoch wins
    return out


def _load(client: Any, tracking_uri: str, experiment: str) -> tuple[Any, list[_Config], list[str]]:
    """The experiment, its usable configurations (sorted) and notes on parent runs left out."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None or getattr(exp, "lifecycle_stage", "active") == "deleted":
        state = "is deleted" if exp is not None else "does not exist"
        raise ValueError(f"MLflow experiment {experiment!r} {state} at tracking URI {tracking_uri!r}; "
                         "run `ipb cv` first (or check the experiment name and --tracking-uri)")
    runs = _all_runs(client, exp.experiment_id)
    parents = [r for r in runs if r.data.tags.get(Tag.KIND) == CV_KIND]
    notes: list[str] = []
    configs: list[_Config] = []
    with tempfile.TemporaryDirectory(prefix="ipb-report-") as tmp, quiet_downloads():
        for r in parents:
            tags = r.data.tags
            name = r.info.run_name or tags.get("mlflow.runName") or r.info.run_id
            try:
                reports = _load_fold_reports(client, r.info.run_id, Path(tmp))
                summary = aggregate_folds(list(reports.values()))
            except Exception as exc:  # missing artifact, unreadable JSON, inconsistent reports
                notes.append(f"run {name!r} ({r.info.run_id}, status {r.info.status}) left out: "
                             f"no usable {FOLD_REPORTS} ({type(exc).__name__}: {str(exc)[:200]})")
                continue
            frac_tag = tags.get(Tag.LABELLED_FRACTION, "")
            configs.append(_Config(
                run_id=r.info.run_id, name=str(name), method=tags.get(Tag.METHOD, ""),
                balancer=tags.get(Tag.BALANCER, ""),
                backbone=tags.get(Tag.BACKBONE, ""), preset=tags.get(Tag.PRESET, ""),
                fraction_tag=frac_tag, fraction=_nan(frac_tag), config_key=tags.get(Tag.CONFIG_KEY, ""),
                status=r.info.status, start_time=int(r.info.start_time or 0), reports=reports,
                summary=summary))
    if not configs:
        why = f" ({len(parents)} parent run(s) found, none usable: " + "; ".join(notes) + ")" if parents else ""
        raise ValueError(f"MLflow experiment {experiment!r} at tracking URI {tracking_uri!r} has no "
                         f"cross-validation parent runs (tag ipb.kind='cv') with a {FOLD_REPORTS} "
                         f"artifact{why}; run `ipb cv` first")

    # A configuration cross-validated twice: keep the newest parent run.
    newest: dict[tuple[str, str], _Config] = {}
    for c in sorted(configs, key=lambda c: c.start_time):
        if c.config_key:
            key = (c.config_key, c.fraction_tag)
            if key in newest:
                old = newest[key]
                notes.append(f"run {old.name!r} ({old.run_id}) superseded by the newer run "
                             f"{c.run_id} of the same configuration (ipb.config_key {c.config_key})")
            newest[key] = c
    configs = [c for c in configs if not c.config_key or newest[(c.config_key, c.fraction_tag)] is c]
    configs.sort(key=lambda c: (_method_rank(c.method),
                                math.isnan(c.fraction), 0.0 if math.isnan(c.fraction) else c.fraction,
                                c.start_time, c.name))
    seen: dict[str, int] = {}
    for c in configs:
        seen[c.name] = seen.get(c.name, 0) + 1
    for c in configs:                            # display names must tell the rows apart
        if seen[c.name] > 1:
            c.name = f"{c.name} [{c.run_id[:8]}]"

    by_parent = {c.run_id: c for c in configs}
    for r in runs:
        c = by_parent.get(r.data.tags.get("mlflow.parentRunId", ""))
        if c is None or r.data.tags.get(Tag.KIND, FOLD_KIND) != FOLD_KIND or r.data.tags.get(Tag.SUPERSEDED_BY):
            continue  # not a fold run of a reported configuration, or replaced by a later run of its fold
        c.child_ids.append(r.info.run_id)
        before = r.data.metrics.get(PRE_FINETUNE_MACRO_TPR)
        if before is not None:
            c.before_finetune.append(float(before))
        for key in sorted(k for k in r.data.metrics if _wanted_metric(k)):
            c.histories.setdefault(key, []).append(_history(client, r.info.run_id, key))
    return exp, configs, notes


def _fold_mean(histories: Sequence[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and sample std over fold runs (NaN-safe; folds lacking an epoch skip it)."""
    epochs = sorted({e for h in histories for e in h})
    means, stds = [], []
    for e in epochs:
        v = np.asarray([h[e] for h in histories if e in h], dtype=np.float64)
        v = v[~np.isnan(v)]
        means.append(float(v.mean()) if v.size else math.nan)
        stds.append(float(v.std(ddof=1)) if v.size >= 2 else math.nan)
    return np.asarray(epochs, dtype=np.float64), np.asarray(means), np.asarray(stds)


# --------------------------------------------------------------------------- formatting

def _num(x: Any, spec: str = ".4f") -> str:
    x = _nan(x)
    return "n/a" if math.isnan(x) else format(x, spec)


def _pm(mean: Any, std: Any, n: int | None = None, folds: int | None = None) -> str:
    """``mean ± std``; "n/a" for a missing mean; notes when fewer folds than all had a value."""
    if math.isnan(_nan(mean)):
        return "n/a"
    text = f"{_num(mean)} ± {_num(std)}"
    if n is not None and folds is not None and n < folds:
        text += f" (n={n})"
    return text


def _fraction_text(c: _Config) -> str:
    return _num(c.fraction, "g") if not math.isnan(c.fraction) else (c.fraction_tag or "n/a")


@dataclass
class _Table:
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool]              # per column: right-aligned
    bold_rows: set[int] = field(default_factory=set)

    def markdown(self) -> str:
        def cell(s: str) -> str:
            return str(s).replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(cell(h) for h in self.header) + " |",
                 "|" + "|".join("---:" if num else "---" for num in self.numeric) + "|"]
        for i, row in enumerate(self.rows):
            cells = [f"**{cell(v)}**" if i in self.bold_rows and v else cell(v) for v in row]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def html(self) -> str:
        out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in self.header) + "</tr>"]
        for i, row in enumerate(self.rows):
            cls = ' class="best"' if i in self.bold_rows else ""
            out.append(f"<tr{cls}>" + "".join(
                f'<td class="num">{html.escape(v)}</td>' if num else f"<td>{html.escape(v)}</td>"
                for v, num in zip(row, self.numeric)) + "</tr>")
        out.append("</table>")
        return "\n".join(out)


_PIPE = re.compile(r"(?<!\\)\|")


def _markdown_to_html(text: str) -> str:
    """HTML for format_comparison's output: its Markdown table, then its footnote lines."""
    lines = text.split("\n")
    table = [ln for ln in lines if ln.startswith("|")]
    rest = [ln for ln in lines if ln.strip() and not ln.startswith("|")]
    out: list[str] = []
    if table:
        def cells(line: str) -> list[str]:
            return [html.escape(c.strip().replace("\\|", "|")) for c in _PIPE.split(line.strip())[1:-1]]
        out.append("<table>")
        out.append("<tr>" + "".join(f"<th>{c}</th>" for c in cells(table[0])) + "</tr>")
        for line in table[2:]:
            cs = cells(line)
            out.append("<tr>" + "".join(f"<td>{c}</td>" if j == 0 else f'<td class="num">{c}</td>'
                                        for j, c in enumerate(cs)) + "</tr>")
        out.append("</table>")
    for line in rest:
        out.append(f'<p class="note">{html.escape(line.replace("`", ""))}</p>')
    return "\n".join(out)


def _safe_uri(uri: str) -> str:
    """The tracking URI with any user:password in it masked."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _class_union(configs: Sequence[_Config]) -> list[str]:
    names: list[str] = []
    for c in configs:
        names += [n for n in c.class_names if n not in names]
    return names


def _metric_table(configs: Sequence[_Config], metric: str, macro_key: str, macro_label: str) -> _Table:
    classes = _class_union(configs)
    header = ["configuration", "method", "backbone", "labelled fraction", "folds"] + classes + [macro_label]
    rows = []
    for c in configs:
        s = c.summary
        k = s["folds"]
        cells = [_pm(s[metric]["mean"][n], s[metric]["std"][n], s[metric]["n"][n], k)
                 if n in s[metric]["mean"] else "n/a" for n in classes]
        m = s[macro_key]
        rows.append([c.name, c.method or "n/a", c.backbone or "n/a", _fraction_text(c), str(k)] + cells
                    + [_pm(m["mean"], m["std"], m["n"], k)])
    best = _best(configs, macro_key)
    return _Table(header, rows, [False, False, False, True, True] + [True] * (len(classes) + 1),
                  bold_rows={configs.index(best)} if best is not None else set())


def _best(configs: Sequence[_Config], key: str = "macro_tpr") -> _Config | None:
    scored = [c for c in configs if not math.isnan(_nan(c.summary[key]["mean"]))]
    return max(scored, key=lambda c: c.summary[key]["mean"]) if scored else None


def _confusion_table(c: _Config) -> _Table:
    names = c.class_names
    cm = np.asarray(c.summary["confusion_matrix"], dtype=np.int64)
    rows = []
    for i, n in enumerate(names):
        total = int(cm[i].sum())
        recall = cm[i, i] / total if total else math.nan
        rows.append([n] + [str(int(v)) for v in cm[i]] + [str(total), _num(recall)])
    col = cm.sum(axis=0)
    rows.append(["predicted total"] + [str(int(v)) for v in col] + [str(int(cm.sum())), ""])
    return _Table(["true \u2193 / predicted \u2192"] + names + ["total", "TPR"], rows,
                  [False] + [True] * (len(names) + 2))


def _resolve_baseline(configs: Sequence[_Config], baseline: str | None) -> _Config:
    if baseline is None:
        return next((c for c in configs if _is_baseline(c.method)), configs[0])
    for c in configs:
        if baseline in (c.name, c.run_id, c.config_key):
            return c
    hits = [c for c in configs if c.name.startswith(baseline + " [")]   # a disambiguated name
    if len(hits) == 1:
        return hits[0]
    raise ValueError(f"baseline {baseline!r} is none of this experiment's configurations; use a display "
                     f"name, parent run id or ipb.config_key, one of: {[c.name for c in configs]}")


#: A fold run's macro TPR of the network chosen before the fine-tuning stage (runs with one).
PRE_FINETUNE_MACRO_TPR = "pre_finetune_test_macro_tpr"


def _method_text(c: _Config) -> str:
    return f"{c.method} + {c.balancer}" if c.balancer not in ("", "none") else c.method or "?"


def _summary_table(configs: Sequence[_Config], base: _Config) -> _Table:
    """Table 5 in one table: every configuration's macro TPR, worst-class TPR and macro F1
    (mean over folds), before fine-tuning where it had that stage, and its difference from
    the baseline with the paired t-test and Wilcoxon p over the folds both have."""
    rows = []
    for c in configs:
        s = c.summary
        worst = [min(present) for rep in c.reports.values()  # a class absent from a fold's T has no TPR
                 if (present := [x for x in map(_nan, (rep.get("tpr") or {}).values()) if not math.isnan(x)])]
        cells = [c.name, _method_text(c), str(len(c.reports)),
                 _pm(s["macro_tpr"]["mean"], s["macro_tpr"]["std"]), _num(float(np.mean(worst)) if worst else None, ".3f"),
                 _pm(s["macro_f1"]["mean"], s["macro_f1"]["std"]),
                 _num(float(np.mean(c.before_finetune)), ".3f") if c.before_finetune else "-"]
        common = sorted(set(base.reports) & set(c.reports))
        if c is base or len(common) < 2 or c.class_names != base.class_names:
            cells += ["baseline" if c is base else "-", "-", "-"]
        else:
            row = next(r for r in paired_tests([base.reports[f] for f in common], [c.reports[f] for f in common])
                       if r["metric"] == "macro_tpr")
            cells += [f"{row['diff']:+.3f}", _num(row["p_t"], ".3f"), _num(row["p_w"], ".3f")]
        rows.append(cells)
    return _Table(["configuration", "method", "folds", "macro TPR", "worst-class TPR", "macro F1",
                   "macro TPR before fine-tuning", f"Δ macro TPR vs {base.name}", "p (paired t)", "p (Wilcoxon)"],
                  rows, [False, False, True, True, True, True, True, True, True, True])


def _comparisons(configs: Sequence[_Config], base: _Config) -> tuple[list[tuple[_Config, list[int], str]],
                                                                       list[str]]:
    """(configuration, common folds, format_comparison Markdown) per comparable configuration,
    and a note per configuration that could not be compared."""
    done, skipped = [], []
    for c in configs:
        if c is base:
            continue
        common = sorted(set(base.reports) & set(c.reports))
        if len(common) < 2:
            skipped.append(f"{c.name}: {len(common)} fold(s) in common with {base.name} "
                           f"(folds {sorted(c.reports)} vs {sorted(base.reports)}); a paired test needs 2")
            continue
        if c.class_names != base.class_names:
            skipped.append(f"{c.name}: classes {c.class_names} differ from {base.name}'s {base.class_names}")
            continue
        rows = paired_tests([base.reports[f] for f in common], [c.reports[f] for f in common])
        done.append((c, common, format_comparison(rows, base.name, c.name)))
    return done, skipped


# --------------------------------------------------------------------------- figures

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    try:
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def _plot_band(ax: Any, histories: Sequence[dict[int, float]], **style: Any) -> Any:
    x, mean, std = _fold_mean(histories)
    (line,) = ax.plot(x, mean, **style)
    if np.any(~np.isnan(std)):
        s = np.nan_to_num(std)
        ax.fill_between(x, mean - s, mean + s, color=line.get_color(), alpha=0.15, lw=0)
    return line


def _grid(n: int, ncols: int, w: float, h: float) -> tuple[Any, Any]:
    plt = _pyplot()
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def _figure_losses(configs: Sequence[_Config], path: Path) -> Path | None:
    """Figure 2: fold-mean loss curves per configuration (band: ± std over folds)."""
    used = [(c, [(k, label) for k, label in LOSS_SERIES if k in c.histories]) for c in configs]
    used = [(c, s) for c, s in used if s]
    if not used:
        return None
    fig, axes = _grid(len(used), 3, 4.3, 3.3)
    for ax, (c, series) in zip(axes.flat, used):
        for key, label in series:
            _plot_band(ax, c.histories[key], marker="o", ms=2.5, label=label)
        ax.set_title(f"{c.name} ({len(c.child_ids)} fold runs)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("Loss curves, mean over folds (Figure 2)", fontsize=10)
    return _save(fig, path)


def _classes_with(c: _Config, prefix: str) -> list[str]:
    found = [k[len(prefix):] for k in c.histories if k.startswith(prefix)]
    return [n for n in c.class_names if n in found] + sorted(n for n in found if n not in c.class_names)


def _figure_balance(configs: Sequence[_Config], path: Path) -> Path | None:
    """Figures 6-7: the teacher's estimated class proportions against the hidden true class
    mix of U (dashed), and the sampling weights, fold-mean, one row per configuration."""
    used = [c for c in configs if _classes_with(c, "teacher_proportion/") or _classes_with(c, "sampling_weight/")]
    if not used:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(used), 2, figsize=(10, 3.3 * len(used)), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for row, c in zip(axes, used):
        classes = _class_union([c]) + [n for n in _classes_with(c, "teacher_proportion/")
                                       + _classes_with(c, "sampling_weight/") if n not in c.class_names]
        colour = {n: palette[i % len(palette)] for i, n in enumerate(classes)}
        ax = row[0]
        props = _classes_with(c, "teacher_proportion/")
        for n in props:
            _plot_band(ax, c.histories[f"teacher_proportion/{n}"], color=colour[n], marker="o", ms=2.5, label=n)
            truth = c.histories.get(f"unlabelled_true_share/{n}")
            if truth:
                x, mean, _ = _fold_mean(truth)
                ax.plot(x, mean, ls="--", lw=1.2, color=colour[n])
        ax.set_title(f"{c.name}: teacher's class proportions (dashed: true mix of U)", fontsize=9)
        ax = row[1]
        weights = _classes_with(c, "sampling_weight/")
        for n in weights:
            _plot_band(ax, c.histories[f"sampling_weight/{n}"], color=colour[n], marker="o", ms=2.5, label=n)
        ax.set_title(f"{c.name}: sampling weight per class", fontsize=9)
        for ax, have in zip(row, (props, weights)):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if have:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="#888")
    fig.suptitle("Pseudo-balancing, mean over folds (Figures 6-7)", fontsize=10)
    return _save(fig, path)


def _figure_pseudo_labels(configs: Sequence[_Config], path: Path) -> Path | None:
    """Beside Figures 6-7, where U's hidden labels are known (benchmark catalogs): the
    teacher's pseudo-label precision and recall per class over epochs, and what the draw
    fed the student (each pseudo-class's share, dashed: each true class's share) with the
    most copies of one colony; fold-mean, one row per configuration."""
    used = [c for c in configs if _classes_with(c, "pseudo_precision/")]
    if not used:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(used), 3, figsize=(14, 3.3 * len(used)), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for row, c in zip(axes, used):
        classes = _classes_with(c, "pseudo_precision/")
        colour = {n: palette[i % len(palette)] for i, n in enumerate(classes)}
        for ax, prefix, title in ((row[0], "pseudo_precision/", f"{c.name}: pseudo-label precision on U"),
                                  (row[1], "pseudo_tpr/", "pseudo-label recall on U")):
            for n in classes:
                if c.histories.get(f"{prefix}{n}"):
                    _plot_band(ax, c.histories[f"{prefix}{n}"], color=colour[n], marker="o", ms=2.5, label=n)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(title, fontsize=9)
        ax = row[2]
        for n in classes:
            if c.histories.get(f"draw_share/{n}"):
                _plot_band(ax, c.histories[f"draw_share/{n}"], color=colour[n], marker="o", ms=2.5, label=n)
            if c.histories.get(f"draw_true_share/{n}"):
                x, mean, _ = _fold_mean(c.histories[f"draw_true_share/{n}"])
                ax.plot(x, mean, ls="--", lw=1.2, color=colour[n])
        copies = c.histories.get("max_copies")
        most = f", most copies {max(max(h.values()) for h in copies if h):.0f}" if copies else ""
        ax.set_title(f"draw share by pseudo-class (dashed: true class){most}", fontsize=9)
        for ax in row:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("The teacher's pseudo-labels against U's hidden labels, mean over folds", fontsize=10)
    return _save(fig, path)


def _fraction_groups(configs: Sequence[_Config]) -> dict[str, list[_Config]]:
    """Configurations with a labelled fraction, one line per method (split by backbone and
    preset only where one method has several)."""
    with_frac = [c for c in configs if not math.isnan(c.fraction)]
    variants: dict[str, set] = {}
    for c in with_frac:
        variants.setdefault(c.method, set()).add((c.backbone, c.preset))
    groups: dict[str, list[_Config]] = {}
    for c in with_frac:
        label = c.method or "n/a"
        if len(variants[c.method]) > 1:
            label += f" ({', '.join(v for v in (c.backbone, c.preset) if v)})"
        groups.setdefault(label, []).append(c)
    return groups


def _figure_fractions(configs: Sequence[_Config], path: Path) -> Path | None:
    """Figure 8: macro TPR (mean ± std over folds) against the labelled fraction."""
    fractions = {c.fraction for c in configs if not math.isnan(c.fraction)}
    if len(fractions) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, group in _fraction_groups(configs).items():
        pts = sorted((c.fraction, _nan(c.summary["macro_tpr"]["mean"]), _nan(c.summary["macro_tpr"]["std"]))
                     for c in group)
        pts = [p for p in pts if not math.isnan(p[1])]
        if not pts:
            continue
        x, y, e = (np.asarray(v, dtype=np.float64) for v in zip(*pts))
        ax.errorbar(x, y, yerr=np.nan_to_num(e), marker="o", capsize=3, label=label)
    if max(fractions) / max(min(fractions), 1e-12) >= 10:
        ax.set_xscale("log")
    ticks = sorted(fractions)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{100 * f:g}%" for f in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labelled fraction")
    ax.set_ylabel("macro TPR (mean ± std over folds)")
    ax.set_title("Macro TPR against the labelled fraction (Figure 8)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- report

def _runs_table(configs: Sequence[_Config]) -> _Table:
    rows = []
    for c in configs:
        started = (datetime.fromtimestamp(c.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
                   if c.start_time else "n/a")
        rows.append([c.name, c.run_id, c.method or "n/a", c.backbone or "n/a", c.preset or "n/a",
                     _fraction_text(c), c.config_key or "n/a", ", ".join(str(f) for f in c.reports),
                     str(len(c.child_ids)), c.status, started])
    return _Table(["configuration", "parent run", "method", "backbone", "preset", "labelled fraction",
                   "config key", "folds reported", "fold runs", "status", "started (UTC)"], rows,
                  [False] * 5 + [True, False, False, True, False, False])


def render_report(tracking_uri: str, experiment: str, out_dir: str | Path, *,
                  baseline: str | None = None) -> dict[str, Path]:
    """Render an experiment's cross-validation results into ``out_dir``.

    Reads only the MLflow tracking store at ``tracking_uri`` (parent runs tagged
    ``ipb.kind = "cv"`` with a ``fold_reports.json`` artifact and their fold runs). Writes
    ``report.html`` (self-contained, figures embedded), ``report.md`` (figures linked) and
    the figure PNGs that have data. ``baseline`` names the configuration the others are
    compared with (display name, parent run id or ``ipb.config_key``; default: the
    supervised one, else the first). Returns ``{"html": path, "markdown": path}`` plus
    ``"figure2"``, ``"figures6_7"``, ``"figure8"`` for the figures written.

    Raises ValueError when the experiment does not exist, has no usable cross-validation
    runs, or ``baseline`` names none of them.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp, configs, notes = _load(client, tracking_uri, experiment)
    base = _resolve_baseline(configs, baseline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    paths: dict[str, Path] = {}
    figures: list[tuple[str, str, Path]] = []
    for key, title, make in (("figure2", "Loss curves (Figure 2)", _figure_losses),
                             ("figures6_7", "Teacher's class proportions and sampling weights (Figures 6-7)",
                              _figure_balance),
                             ("pseudo_labels", "Pseudo-label precision and recall, and what the draw held",
                              _figure_pseudo_labels),
                             ("figure8", "Macro TPR against the labelled fraction (Figure 8)", _figure_fractions)):
        p = make(configs, out / FIGURE_FILES[key])
        if p is not None:
            paths[key] = p
            figures.append((key, title, p))

    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    uri = _safe_uri(tracking_uri)
    best = _best(configs)
    comparisons, skipped = _comparisons(configs, base)

    md: list[str] = [f"# Cross-validation report: {experiment}", "",
                     f"- tracking URI: `{uri}`", f"- experiment id: {exp.experiment_id}",
                     f"- generated: {generated}", f"- configurations: {len(configs)}", ""]
    hx: list[str] = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                     f"<title>CV report: {html.escape(experiment)}</title>", f"<style>{_CSS}</style>",
                     "</head><body>", f"<h1>Cross-validation report: {html.escape(experiment)}</h1>",
                     "<ul>", f"<li>tracking URI: <code>{html.escape(uri)}</code></li>",
                     f"<li>experiment id: {html.escape(str(exp.experiment_id))}</li>",
                     f"<li>generated: {html.escape(generated)}</li>",
                     f"<li>configurations: {len(configs)}</li>", "</ul>"]

    def section(title: str, intro: str | None = None) -> None:
        md.extend([f"## {title}", ""] + ([intro, ""] if intro else []))
        hx.append(f"<h2>{html.escape(title)}</h2>")
        if intro:
            hx.append(f'<p class="note">{html.escape(intro)}</p>')

    def table(t: _Table) -> None:
        md.extend([t.markdown(), ""])
        hx.append(t.html())

    def note(text: str) -> None:
        md.extend([f"_{text}_", ""])
        hx.append(f'<p class="note">{html.escape(text)}</p>')

    section("Runs")
    table(_runs_table(configs))
    for n in notes:
        note(n)

    section("Per-class TPR (Table 2)",
            "TPR = TP / (TP + FN) per class, mean ± sample std over folds; macro = mean over classes. "
            "(n=k): only k folds had that class in their test set. Bold: highest mean macro TPR.")
    table(_metric_table(configs, "tpr", "macro_tpr", "macro TPR"))
    section("Per-class F1 (Table 3)",
            "F1 = 2TP / (2TP + FP + FN) per class, mean ± sample std over folds. Bold: highest mean macro F1.")
    table(_metric_table(configs, "f1", "macro_f1", "macro F1"))

    if best is not None:
        section(f"Confusion matrix of the best configuration (Table 4): {best.name}",
                f"Summed over its {best.summary['folds']} fold(s); rows are the true class. "
                f"Mean macro TPR {_pm(best.summary['macro_tpr']['mean'], best.summary['macro_tpr']['std'])}.")
        table(_confusion_table(best))

    if len(configs) > 1:
        section(f"Every method against the baseline {base.name} (Table 5)",
                "Mean over folds; worst-class TPR is each fold's lowest class TPR, averaged. Δ and p: macro TPR "
                "paired by fold with the baseline (Student's paired t-test, as in the paper, and Wilcoxon). "
                "Before fine-tuning: the same runs' choice before their fine-tuning stage on L, where they had one.")
        table(_summary_table(configs, base))
    if comparisons or skipped:
        section(f"Paired comparison with the baseline {base.name}, per class",
                "Per-class TPR and macro metrics paired by fold over the folds both configurations have: "
                "Student's paired t-test (as in the paper) and the Wilcoxon signed-rank test.")
        for c, common, text in comparisons:
            title = f"{c.name} vs {base.name} (folds {', '.join(str(f) for f in common)})"
            md.extend([f"### {title}", "", text, ""])
            hx.append(f"<h3>{html.escape(title)}</h3>")
            hx.append(_markdown_to_html(text))
        for s in skipped:
            note(f"not compared: {s}")

    for key, title, p in figures:
        section(title)
        md.extend([f"![{title}]({p.name})", ""])
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        hx.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')

    hx.append("</body></html>")
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    paths["html"] = out / "report.html"
    paths["html"].write_text("\n".join(hx) + "\n", encoding="utf-8")
    return {"html": paths.pop("html"), "markdown": paths.pop("markdown"), **paths}
