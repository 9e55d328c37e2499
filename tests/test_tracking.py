"""MLflow tracking of a cross-validation experiment, against a real SQLite tracking store.

No Ray: two folds' results are faked with real classification reports, a short history
and a real checkpoint of the configured network; the model is logged for one fold only
(the slow part).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

mlflow = pytest.importorskip("mlflow")
torch = pytest.importorskip("torch")

from ipb_ray.tracking import runs as tracking  # noqa: E402
from ipb_ray.config import flatten, load_config  # noqa: E402
from ipb_ray.evaluation.metrics import classification_report  # noqa: E402
from ipb_ray.evaluation.stats import aggregate_folds  # noqa: E402
from ipb_ray.nn.checkpoint import CHECKPOINT_FILE  # noqa: E402
from ipb_ray.nn.models import build_model  # noqa: E402

# MLflow's SQLAlchemy store trips a SQLAlchemy deprecation (not ours to fix)
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

CLASSES = ["Debris", "Dense", "Diff", "Spread"]
EXPERIMENT = "ipb-test"


def _cfg(tmp_path: Path, *extra: str):
    return load_config(preset="demo", overrides=[
        "model.backbone=patch_stats", "model.feature_dim=8", "data.global_patch=32", "data.local_patch=16",
        f"data.catalog={tmp_path / 'cat'}", *extra])


def _fold_metrics(cfg, fold: int, ckpt_dir: Path | None) -> dict:
    rng = np.random.default_rng(fold)
    y = rng.integers(0, 4, 60)
    p = np.where(rng.random(60) < 0.7, y, rng.integers(0, 4, 60))
    if fold == 1:
        y[y == 3] = 2  # a class absent from this fold's truth: NaN TPR
    report = classification_report(y.tolist(), p.tolist(), CLASSES)
    history = [{"epoch": e, "teacher_loss": 1.0 / (e + 1) + fold, "student_loss": 2.0 - 0.1 * e,
                "teacher_proportion/Dense": 0.25 + 0.01 * e, "val_balanced_accuracy": None,
                "note": "text", "flag:odd": 0.5 * e, "nan_metric": float("nan")} for e in range(3)]
    checkpoint = None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True)
        torch.manual_seed(fold)
        net = build_model(cfg, len(CLASSES))
        with torch.no_grad():  # a data set's pixel statistics, as training leaves them
            net.normalise.mean.fill_(0.3)
            net.normalise.std.fill_(0.2)
        torch.save({"best_model": net.state_dict(), "epoch": 2, "history": history},
                   ckpt_dir / CHECKPOINT_FILE)
        checkpoint = str(ckpt_dir)
    out = {"test_report": report, "history": history, "checkpoint": checkpoint,
           "test_balanced_accuracy": report["balanced_accuracy"], "test_macro_f1": report["macro_f1"],
           "param_digest": f"digest{fold}", "resumed_from_epoch": -1}
    if fold == 1:  # a fine-tuned student: the MPL stage's own result rides along
        out["pre_finetune_test_report"] = classification_report(y.tolist(), y[::-1].tolist(), CLASSES)
    return out


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """open_parent -> log_fold x2 (model in fold 0 only) -> log_summary, once per module."""
    tmp_path = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg(tmp_path)
    parent = tracking.open_parent(uri, EXPERIMENT, cfg)
    folds = {k: _fold_metrics(cfg, k, tmp_path / f"ckpt{k}") for k in range(2)}
    children = {k: tracking.log_fold(uri, parent, k, folds[k], cfg, log_model=(k == 0)) for k in range(2)}
    summary = tracking.log_summary(uri, parent, {k: m["test_report"] for k, m in folds.items()})
    return {"uri": uri, "cfg": cfg, "parent": parent, "folds": folds, "children": children,
            "summary": summary, "tmp": tmp_path, "client": mlflow.MlflowClient(uri)}


def test_parent_run_tags_params_and_status(logged):
    client, cfg = logged["client"], logged["cfg"]
    run = client.get_run(logged["parent"])
    assert run.info.run_name == f"{cfg.name}-{cfg.method.name}" == "demo-ipb"
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["ipb.kind"] == "cv"
    assert tags["ipb.config_key"] == tracking.config_key(cfg) and len(tags["ipb.config_key"]) == 12
    assert tags["ipb.method"] == "ipb" and tags["ipb.preset"] == "demo"
    assert tags["ipb.backbone"] == "patch_stats"
    assert tags["ipb.labelled_fraction"] == str(cfg.split.labelled_fraction) == "0.1"  # the demo preset's
    assert tags["ipb.data_fingerprint"] == "unknown"  # the catalog dir does not exist
    assert tags["ipb.git_commit"] == "unknown" or len(tags["ipb.git_commit"]) == 40
    assert run.data.params == {k: str(v) for k, v in flatten(cfg).items()}
    # the artifacts sit next to the SQLite database, not in the working directory
    assert Path(run.info.artifact_uri.replace("file://", "")).is_relative_to(logged["tmp"])


def test_child_runs_metrics_and_artifacts(logged):
    client, parent = logged["client"], logged["parent"]
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_id for r in runs) == sorted(logged["children"].values())
    for k, rid in logged["children"].items():
        run = client.get_run(rid)
        assert run.info.run_name == f"demo-ipb-fold{k}"
        assert run.info.status == "FINISHED"
        t = run.data.tags
        assert (t["ipb.kind"], t["ipb.fold"], t["mlflow.parentRunId"]) == ("fold", str(k), parent)
        assert t["ipb.config_key"] == client.get_run(parent).data.tags["ipb.config_key"]
        assert t["ipb.param_digest"] == f"digest{k}"
        hist = client.get_metric_history(rid, "teacher_loss")
        assert sorted((m.step, m.value) for m in hist) == [(e, pytest.approx(1.0 / (e + 1) + k)) for e in range(3)]
        assert [m.step for m in client.get_metric_history(rid, "teacher_proportion/Dense")] == [0, 1, 2]
        metrics = run.data.metrics
        assert "flag_odd" in metrics                       # ':' replaced
        assert not {"val_balanced_accuracy", "note", "nan_metric", "epoch"} & set(metrics)
        report = logged["folds"][k]["test_report"]
        for key in ("macro_tpr", "macro_f1", "balanced_accuracy", "accuracy"):
            assert metrics[f"test_{key}"] == pytest.approx(report[key])
        for c in CLASSES:
            for m in ("tpr", "f1", "precision"):
                if math.isnan(report[m][c]):
                    assert f"test_{m}/{c}" not in metrics
                else:
                    assert metrics[f"test_{m}/{c}"] == pytest.approx(report[m][c])
        names = {a.path for a in client.list_artifacts(rid)}
        assert {"test_report.json", "confusion_matrix.json", "confusion_matrix.png", "history.json"} <= names
        d = logged["tmp"] / f"dl{k}"
        d.mkdir()
        cm = json.loads(Path(client.download_artifacts(rid, "confusion_matrix.json", str(d))).read_text())
        assert cm == {"class_names": CLASSES, "matrix": report["confusion_matrix"]}
        hist_art = json.loads(Path(client.download_artifacts(rid, "history.json", str(d))).read_text())
        assert [h["epoch"] for h in hist_art] == [0, 1, 2]
    assert "test_tpr/Spread" not in client.get_run(logged["children"][1]).data.metrics  # NaN skipped
    # fold 1 was fine-tuned: the result before fine-tuning is kept as its own metrics and report
    before = logged["folds"][1]["pre_finetune_test_report"]
    assert before["macro_tpr"] != logged["folds"][1]["test_report"]["macro_tpr"]
    child1 = client.get_run(logged["children"][1]).data.metrics
    assert child1["pre_finetune_test_macro_tpr"] == pytest.approx(before["macro_tpr"])
    assert child1["test_macro_tpr"] == pytest.approx(logged["folds"][1]["test_report"]["macro_tpr"])
    assert "pre_finetune_test_report.json" in {a.path for a in client.list_artifacts(logged["children"][1])}
    assert not any(k.startswith("pre_finetune") for k in client.get_run(logged["children"][0]).data.metrics)
    assert client.get_run(logged["children"][1]).data.tags["ipb.model_uri"] == ""


def test_logged_model_predicts_probabilities(logged):
    rid = logged["children"][0]
    tags = logged["client"].get_run(rid).data.tags
    assert tags["ipb.model_uri"].startswith("models:/")
    # log_fold left MLflow's process-wide state as it found it
    assert mlflow.active_run() is None
    assert mlflow.get_tracking_uri() != logged["uri"] or os.environ.get("MLFLOW_TRACKING_URI") == logged["uri"]
    x = np.random.default_rng(1).random((5, 1, 32, 32), dtype=np.float32)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(logged["uri"])  # runs:/ and models:/ URIs resolve through it
    try:
        model = mlflow.pytorch.load_model(f"runs:/{rid}/model", dst_path=str(logged["tmp"] / "m"))
        info = mlflow.models.get_model_info(tags["ipb.model_uri"])
        pyfunc = mlflow.pyfunc.load_model(tags["ipb.model_uri"])
    finally:
        mlflow.set_tracking_uri(previous)
    with torch.no_grad():
        probs = model(torch.from_numpy(x)).numpy()
    assert probs.shape == (5, 4)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5) and (probs >= 0).all()
    # the same as the checkpointed network fed the batch and its exact 16 px centre
    net = build_model(logged["cfg"], 4)
    net.load_state_dict(torch.load(Path(logged["folds"][0]["checkpoint"]) / CHECKPOINT_FILE)["best_model"])
    with torch.no_grad():
        logits, _ = net.eval()(torch.from_numpy(x), torch.from_numpy(x[..., 8:24, 8:24]))
    assert np.allclose(probs, torch.softmax(logits, -1).numpy(), atol=1e-5)
    # the logged model normalises its input itself, with the statistics it was trained with
    buffers = dict(model.named_buffers())
    mean_key = next(k for k in buffers if k.endswith("normalise.mean"))
    assert float(buffers[mean_key]) == pytest.approx(0.3)
    assert float(buffers[mean_key.replace("mean", "std")]) == pytest.approx(0.2)
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 32, 32]
    assert np.allclose(pyfunc.predict(x), probs, atol=1e-5)


def test_parent_cv_metrics_and_artifacts(logged):
    client, parent = logged["client"], logged["parent"]
    reports = [logged["folds"][k]["test_report"] for k in range(2)]
    agg = aggregate_folds(reports)
    assert json.dumps(logged["summary"], sort_keys=True) == json.dumps(agg, sort_keys=True)
    m = client.get_run(parent).data.metrics
    for key in ("macro_tpr", "macro_f1", "balanced_accuracy"):
        assert m[f"cv_{key}_mean"] == pytest.approx(agg[key]["mean"])
        assert m[f"cv_{key}_std"] == pytest.approx(agg[key]["std"])
    for c in CLASSES:
        for metric in ("tpr", "f1"):
            for stat in ("mean", "std"):
                value = agg[metric][stat][c]
                if math.isnan(value):
                    assert f"cv_{metric}_{stat}/{c}" not in m
                else:
                    assert m[f"cv_{metric}_{stat}/{c}"] == pytest.approx(value)
    assert "cv_tpr_std/Spread" not in m  # one fold only has Spread: NaN std
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"cv_summary.json", "fold_reports.json", "cv_confusion_matrix.png"} <= names
    d = logged["tmp"] / "dl_parent"
    d.mkdir()
    entries = json.loads(Path(client.download_artifacts(parent, "fold_reports.json", str(d))).read_text())
    assert [e["fold"] for e in entries] == [0, 1]
    assert entries[0]["report"]["confusion_matrix"] == reports[0]["confusion_matrix"]


def test_load_cv(logged):  # before test_resume_lookup adds a newer 'demo-ipb'
    uri, parent = logged["uri"], logged["parent"]
    rid, reports = tracking.load_cv(uri, EXPERIMENT, "demo-ipb")
    assert rid == parent and sorted(reports) == [0, 1]
    assert reports[0]["tpr"] == logged["folds"][0]["test_report"]["tpr"]
    assert tracking.load_cv(uri, EXPERIMENT, parent)[0] == parent
    with pytest.raises(ValueError, match=r"available parent runs.*'demo-ipb'") as err:
        tracking.load_cv(uri, EXPERIMENT, "nope")
    assert EXPERIMENT in str(err.value)
    with pytest.raises(ValueError, match="not a cross-validation parent run"):
        tracking.load_cv(uri, EXPERIMENT, logged["children"][0])
    with pytest.raises(ValueError, match="does not exist"):
        tracking.load_cv(uri, "missing-experiment", "demo-ipb")


def test_resume_lookup(logged):
    uri, cfg, parent = logged["uri"], logged["cfg"], logged["parent"]
    assert tracking.find_parent(uri, EXPERIMENT, cfg) == parent
    assert tracking.open_parent(uri, EXPERIMENT, cfg) == parent
    # resources, tracking and split.fold do not change the configuration
    assert tracking.open_parent(uri, EXPERIMENT, cfg.replace("resources.num_workers=2", "split.fold=3")) == parent
    assert tracking.find_parent(uri, "no-such-experiment", cfg) is None
    done = tracking.finished_folds(uri, parent)
    assert sorted(done) == [0, 1]
    assert done[1]["confusion_matrix"] == logged["folds"][1]["test_report"]["confusion_matrix"]
    other = tracking.open_parent(uri, EXPERIMENT, cfg.replace("method.mpl.threshold=0.7"))
    assert other != parent
    assert tracking.finished_folds(uri, other) == {}
    # the same run name now has two configurations: load_cv by name takes the newest
    assert tracking.load_cv(uri, EXPERIMENT, "demo-ipb") == (other, {})
    assert tracking.load_cv(uri, EXPERIMENT, parent)[0] == parent


def test_refold_supersedes_and_unfinished_parent_reads_children(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg(tmp_path, "name=refold")
    parent = tracking.open_parent(uri, EXPERIMENT, cfg, run_name="custom")
    assert mlflow.MlflowClient(uri).get_run(parent).info.run_name == "custom"
    assert tracking.find_parent(uri, EXPERIMENT, cfg) is None          # default name differs
    assert tracking.open_parent(uri, EXPERIMENT, cfg, run_name="custom") == parent
    client = mlflow.MlflowClient(uri)
    # a fold run left RUNNING by a killed driver
    stale = client.create_run(client.get_run(parent).info.experiment_id, run_name="custom-fold0",
                              tags={"mlflow.parentRunId": parent, "ipb.kind": "fold", "ipb.fold": "0"}).info.run_id
    assert tracking.finished_folds(uri, parent) == {}
    metrics = _fold_metrics(cfg, 0, None)
    child = tracking.log_fold(uri, parent, 0, metrics, cfg, log_model=True)  # no checkpoint: no model
    assert client.get_run(stale).info.status == "KILLED"
    assert client.get_run(stale).data.tags["ipb.superseded_by"] == child
    again = tracking.log_fold(uri, parent, 0, metrics, cfg, log_model=False)
    assert client.get_run(child).data.tags["ipb.superseded_by"] == again
    assert list(tracking.finished_folds(uri, parent)) == [0]
    # no summary yet: load_cv reads the finished children
    rid, reports = tracking.load_cv(uri, EXPERIMENT, "custom")
    assert rid == parent and reports[0]["tpr"] == metrics["test_report"]["tpr"]
    with pytest.raises(ValueError, match="not found"):
        tracking.log_fold(uri, "0" * 32, 0, metrics, cfg)
    with pytest.raises(ValueError, match="no fold reports"):
        tracking.log_summary(uri, parent, {})


def test_names_and_identities(tmp_path):
    assert tracking.sanitize_metric_name("teacher_proportion/Dense") == "teacher_proportion/Dense"
    assert tracking.sanitize_metric_name("a:b(c)") == "a_b_c_"
    assert tracking.sanitize_metric_name("/x//y/../z/") == "x/y/_/z"
    assert tracking.sanitize_metric_name("") == "_"
    cat = tmp_path / "cat"
    assert tracking.data_fingerprint(cat) == "unknown"
    cat.mkdir()
    (cat / "catalog.json").write_text("{}")
    first = tracking.data_fingerprint(cat)
    (cat / "folds.json").write_text("{\"k\": 5}")
    assert first != tracking.data_fingerprint(cat) != "unknown"
    cfg = _cfg(tmp_path)
    assert tracking.config_key(cfg) == tracking.config_key(cfg.replace("tracking.experiment=x"))
    assert tracking.config_key(cfg) != tracking.config_key(cfg.replace("seed=1"))
    assert tracking.git_commit(tmp_path) == "unknown"


def test_single_scale_model(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg(tmp_path, "data.multi_scale=false", "data.patch_size=24", "name=single")
    parent = tracking.open_parent(uri, EXPERIMENT, cfg)
    metrics = _fold_metrics(cfg, 0, tmp_path / "ckpt")
    child = tracking.log_fold(uri, parent, 0, metrics, cfg)
    model_uri = mlflow.MlflowClient(uri).get_run(child).data.tags["ipb.model_uri"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    x = np.random.default_rng(2).random((3, 1, 24, 24), dtype=np.float32)
    probs = model.predict(x)
    net = build_model(cfg, 4)
    net.load_state_dict(torch.load(Path(metrics["checkpoint"]) / CHECKPOINT_FILE)["best_model"])
    with torch.no_grad():
        logits, _ = net.eval()(torch.from_numpy(x))
    assert probs.shape == (3, 4) and np.allclose(probs, torch.softmax(logits, -1).numpy(), atol=1e-5)
