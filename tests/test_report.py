"""The CV report (ipb_ray.tracking.report) rendered from a real SQLite MLflow store written here by
hand in the layout ``ipb cv`` logs (no Ray, no training)."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest
from scipy import stats as sps

from ipb_ray.evaluation.metrics import classification_report
from ipb_ray.tracking.report import render_report

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric  # noqa: E402

CLASSES = ["Debris", "Dense", "Diff", "Spread"]
EXPERIMENT = "report-test"
FOLDS = 3
EPOCHS = 6
# display name -> (method, labelled fraction, accuracy of the synthetic predictions)
CONFIGS = {
    "VGG19 supervised": ("supervised", "0.1", 0.70),
    "MPL HRNet": ("mpl", "0.1", 0.78),
    "IPB HRNet 10%": ("ipb", "0.1", 0.86),
    "IPB HRNet 30%": ("ipb", "0.3", 0.90),
}


def _predictions(seed: int, acc: float, fold: int, drop_spread: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 * fold + 17)           # the same test fold for every config
    y = rng.integers(0, len(CLASSES), size=60)
    if drop_spread:
        y[y == 3] = 0                                       # class absent from this fold: TPR NaN
    rng = np.random.default_rng(seed)
    wrong = rng.random(y.size) > acc
    pred = np.where(wrong, (y + rng.integers(1, len(CLASSES), size=y.size)) % len(CLASSES), y)
    return y, pred


def _metrics(keys_values: dict[str, list[float]]) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, vs in keys_values.items() for step, v in enumerate(vs)]


def _histories(method: str, fold: int) -> dict[str, list[float]]:
    e = np.arange(EPOCHS, dtype=float)
    h: dict[str, list[float]] = {}
    if method == "supervised":
        h["train_loss"] = list(1.4 * np.exp(-e / 3) + 0.05 * fold)
        h["val_balanced_accuracy"] = list(0.5 + 0.05 * e)
        return h
    h["train_loss"] = list(1.3 * np.exp(-e / 5) + 0.04 * fold)
    h["teacher_loss"] = list(1.1 * np.exp(-e / 4) + 0.02 * fold)
    h["student_loss"] = list(1.3 * np.exp(-e / 5) + 0.04 * fold)
    h["val_balanced_accuracy"] = list(0.55 + 0.05 * e)
    h["teacher_val_balanced_accuracy"] = list(0.6 + 0.04 * e)
    h["pseudo_accuracy"] = list(0.6 + 0.05 * e)
    if method == "ipb":
        true = np.array([0.4, 0.3, 0.2, 0.1])
        for i, c in enumerate(CLASSES):
            est = true[i] + (0.25 - true[i]) * np.exp(-e / 2)      # converges to the truth
            h[f"teacher_proportion/{c}"] = list(est + 0.01 * fold)
            h[f"sampling_weight/{c}"] = list(1.0 / (len(CLASSES) * est))
            h[f"stream_share/{c}"] = [0.25] * EPOCHS
            h[f"unlabelled_true_share/{c}"] = [float(true[i])] * EPOCHS
            h[f"pseudo_precision/{c}"] = list(0.5 + 0.05 * e + 0.02 * i)
            h[f"pseudo_tpr/{c}"] = list(0.4 + 0.06 * e)
            h[f"draw_share/{c}"] = [0.25] * EPOCHS
            h[f"draw_true_share/{c}"] = list(0.25 + 0.02 * (i - 1.5) * np.exp(-e))
        h["max_copies"] = [3.0 + fold] * EPOCHS
    return h


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store holding four CV configurations, three folds each."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    reports: dict[str, list[dict]] = {}
    for ci, (name, (method, frac, acc)) in enumerate(CONFIGS.items()):
        parent = client.create_run(exp_id, run_name=name, tags={
            "ipb.kind": "cv", "ipb.method": method, "ipb.backbone": "vgg19" if method == "supervised" else "hrnet",
            "ipb.preset": "paper", "ipb.labelled_fraction": frac, "ipb.config_key": f"key-{ci}",
            "ipb.balancer": {"ipb": "pseudo_balance", "mpl": "none"}.get(method, "")})
        pid = parent.info.run_id
        reports[name] = []
        for fold in range(FOLDS):
            child = client.create_run(exp_id, run_name=f"{name}-fold{fold}", tags={
                "mlflow.parentRunId": pid, "ipb.kind": "fold", "ipb.fold": str(fold)})
            client.log_batch(child.info.run_id, metrics=_metrics(_histories(method, fold)))
            if method == "ipb":  # a run with a fine-tuning stage also logs its choice before it
                client.log_metric(child.info.run_id, "pre_finetune_test_macro_tpr", 0.5 + 0.1 * fold)
            client.set_terminated(child.info.run_id)
            y, p = _predictions(100 * ci + fold, acc, fold, drop_spread=(method == "mpl" and fold == 2))
            reports[name].append(classification_report(y, p, CLASSES))
        client.log_text(pid, json.dumps([{"fold": k, "report": r} for k, r in enumerate(reports[name])]),
                        "fold_reports.json")
        client.set_terminated(pid)
    # a CV parent without fold reports (e.g. still running) is left out, not fatal
    client.create_run(exp_id, run_name="unfinished", tags={"ipb.kind": "cv", "ipb.method": "ipb"})
    client.create_experiment("empty-experiment", artifact_location=(root / "empty").as_uri())
    # one fold, no histories, NaN written as JSON null by a strict writer
    single = client.create_experiment("single-fold", artifact_location=(root / "single").as_uri())
    run = client.create_run(single, run_name="lonely", tags={"ipb.kind": "cv", "ipb.method": "ipb"})
    rep = classification_report([0, 0, 1, 2], [0, 1, 1, 2], CLASSES)       # no Spread: TPR NaN
    rep["tpr"]["Spread"] = None
    client.log_text(run.info.run_id, json.dumps([{"fold": 0, "report": rep}]), "fold_reports.json")
    return uri, reports


@pytest.fixture(scope="module")
def rendered(store, tmp_path_factory):
    uri, reports = store
    out = tmp_path_factory.mktemp("report")
    paths = render_report(uri, EXPERIMENT, out)
    return paths, paths["html"].read_text(encoding="utf-8"), paths["markdown"].read_text(encoding="utf-8"), reports


def _row(text: str, first_cell: str, section: str = "Per-class TPR") -> str:
    """The table row (HTML or Markdown line) whose first cell is ``first_cell``, in the
    first table after the heading that starts with ``section``."""
    for line in text.split(section, 1)[1].splitlines():
        if line.startswith((f"<tr><td>{first_cell}</td>", f'<tr class="best"><td>{first_cell}</td>',
                            f"| {first_cell} |", f"| **{first_cell}** |")):
            return line
    raise AssertionError(f"no row for {first_cell!r}")


def test_files_and_figures(rendered):
    paths, html_text, md, _ = rendered
    assert {"html", "markdown", "figure2", "figures6_7", "pseudo_labels", "figure8"} <= set(paths)
    for key in ("figure2", "figures6_7", "pseudo_labels", "figure8"):
        assert paths[key].is_file() and paths[key].stat().st_size > 5_000, key
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({paths[key].name})" in md                      # linked relatively
    assert html_text.count("data:image/png;base64,") == 4
    assert "file://" not in html_text.split("<h2>")[-1]            # figures embedded, not linked


def test_header_and_names(rendered, store):
    _, html_text, md, _ = rendered
    uri, _ = store
    assert EXPERIMENT in html_text and uri in html_text and "generated:" in html_text
    for name in CONFIGS:
        assert name in html_text and name in md
    assert "unfinished" in html_text and "left out" in html_text   # noted, not a row


def test_tpr_and_f1_cells_match_independent_computation(rendered):
    _, html_text, md, reports = rendered
    name = "IPB HRNet 10%"
    for metric, section in (("tpr", "Per-class TPR"), ("f1", "Per-class F1")):
        vals = np.array([r[metric]["Dense"] for r in reports[name]])
        cell = f"{vals.mean():.4f} ± {vals.std(ddof=1):.4f}"
        assert cell in _row(html_text, name, section) and cell in _row(md, name, section)
    macro = np.array([r["macro_tpr"] for r in reports[name]])
    assert f"{macro.mean():.4f} ± {macro.std(ddof=1):.4f}" in _row(html_text, name)
    # NaN-safe: MPL's fold 2 has no Spread, so that cell uses two folds and says so
    spread = np.array([reports["MPL HRNet"][k]["tpr"]["Spread"] for k in (0, 1)])
    assert math.isnan(reports["MPL HRNet"][2]["tpr"]["Spread"])
    assert f"{spread.mean():.4f} ± {spread.std(ddof=1):.4f} (n=2)" in _row(md, "MPL HRNet")
    assert "nan" not in md.lower().replace("n/a", "")


def test_confusion_matrix_of_best(rendered):
    _, html_text, md, reports = rendered
    macro = {n: np.mean([r["macro_tpr"] for r in reps]) for n, reps in reports.items()}
    best = max(macro, key=macro.get)
    assert f"Confusion matrix of the best configuration (Table 4): {best}" in md
    cm = np.sum([r["confusion_matrix"] for r in reports[best]], axis=0)
    row = "| Debris | " + " | ".join(str(v) for v in cm[0]) + f" | {cm[0].sum()} |"
    assert row in md


def test_paired_comparison_p_values(rendered):
    _, html_text, md, reports = rendered
    a = [r["macro_tpr"] for r in reports["VGG19 supervised"]]
    b = [r["macro_tpr"] for r in reports["IPB HRNet 10%"]]
    p = sps.ttest_rel(b, a).pvalue
    assert "IPB HRNet 10% vs VGG19 supervised" in md and "IPB HRNet 10% vs VGG19 supervised" in html_text
    section = html_text.split("IPB HRNet 10% vs VGG19 supervised")[1].split("</table>")[0]
    assert re.search(r"<td>macro TPR</td>.*?<td class=\"num\">" + re.escape(format(p, ".3g")), section)
    md_section = md.split("### IPB HRNet 10% vs VGG19 supervised")[1].split("###")[0]
    assert re.search(r"\| macro TPR \|[^\n]*\| " + re.escape(format(p, ".3g")), md_section)
    # the baseline is not compared with itself; every other configuration is
    assert "VGG19 supervised vs VGG19 supervised" not in md
    assert md.count("### ") == len(CONFIGS) - 1


def test_table_5_lists_every_configuration_against_the_baseline(rendered):
    _, html_text, md, reports = rendered
    section = "Every method against the baseline VGG19 supervised (Table 5)"
    assert section in md and section in html_text
    base = [r["macro_tpr"] for r in reports["VGG19 supervised"]]
    assert "| baseline |" in _row(md, "VGG19 supervised", section)
    for name in ("MPL HRNet", "IPB HRNet 10%", "IPB HRNet 30%"):
        row = _row(md, name, section)
        mine = [r["macro_tpr"] for r in reports[name]]
        worst = np.mean([np.nanmin(list(r["tpr"].values())) for r in reports[name]])
        assert f"| {np.mean(mine) - np.mean(base):+.3f} | {sps.ttest_rel(mine, base).pvalue:.3f} |" in row
        assert f"| {worst:.3f} |" in row and f"| {FOLDS} |" in row
    ipb = _row(md, "IPB HRNet 10%", section)
    assert "| ipb + pseudo_balance |" in ipb and "| 0.600 |" in ipb  # before fine-tuning: mean of 0.5, 0.6, 0.7
    assert "| mpl |" in _row(md, "MPL HRNet", section)  # balancer none: the method alone
    assert "| - |" in _row(md, "MPL HRNet", section)  # no fine-tuning stage


def test_baseline_choice_and_errors(store, tmp_path):
    uri, _ = store
    paths = render_report(uri, EXPERIMENT, tmp_path / "b", baseline="MPL HRNet")
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "### VGG19 supervised vs MPL HRNet" in md
    with pytest.raises(ValueError, match="no-such-config"):
        render_report(uri, EXPERIMENT, tmp_path / "c", baseline="no-such-config")
    with pytest.raises(ValueError, match="no-such-experiment") as err:
        render_report(uri, "no-such-experiment", tmp_path / "d")
    assert "ipb cv" in str(err.value) and uri in str(err.value)
    with pytest.raises(ValueError, match="empty-experiment.*ipb cv"):
        render_report(uri, "empty-experiment", tmp_path / "e")


def test_single_fold_without_histories(store, tmp_path):
    uri, _ = store
    paths = render_report(uri, "single-fold", tmp_path / "s")
    assert set(paths) == {"html", "markdown"}                     # no figure without data
    md = paths["markdown"].read_text(encoding="utf-8")
    row = _row(md, "**lonely**")
    assert "| **1.0000 ± n/a** |" in row                          # one fold: no std
    assert "| **n/a** | **0.8333 ± n/a** |" in row                # Spread absent: n/a, then macro
    assert "Table 4" in md and "Table 5" not in md and "Figure" not in md
