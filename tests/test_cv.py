"""Cross-validation on a local Ray cluster, tracked in a real MLflow store; resume; fold views."""

from __future__ import annotations

import json

import pytest

from ipb_ray.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cv_catalog(tmp_path_factory, ray_local):
    from worlds import make_frames

    from ipb_ray.distributed.preprocess import build_catalog

    root = make_frames(tmp_path_factory.mktemp("cv"), n_frames=8, seed=7)
    build_catalog(_cfg(root))
    return root


def _cfg(root, *extra):
    return load_config(preset="demo", overrides=[
        f"data.frames={root / 'frames'}", f"data.annotations={root / 'ann.csv'}",
        f"data.catalog={root / 'catalog'}", f"tracking.storage_path={root / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}", "tracking.experiment=cv-test",
        "split.folds=2", "split.labelled_fraction=0.4", "method.name=supervised", "method.epochs=1", "method.steps_per_epoch=4",
        "model.backbone=patch_stats", "model.feature_dim=8", "data.global_patch=48", "data.local_patch=24",
        "method.batch_size=4", *extra])


def test_cv_logs_parent_and_fold_runs_and_resumes_by_skipping_finished_folds(cv_catalog):
    from mlflow import MlflowClient

    from ipb_ray.distributed.cv import run_cv
    from ipb_ray.evaluation.stats import aggregate_folds

    cfg = _cfg(cv_catalog, "name=cvtest", "resources.num_workers=0")  # local mode: what is tested is the driver
    events = []
    first = run_cv(cfg, [0], log_model=False, on_event=lambda kind, fold, info: events.append((kind, fold)))
    assert sorted(first.reports) == [0] and first.skipped == []
    assert events == [("started", 0), ("finished", 0)]
    events.clear()
    # the same command for all folds: fold 0 is found finished in MLflow, fold 1 trains
    full = run_cv(cfg, log_model=True, on_event=lambda kind, fold, info: events.append((kind, fold)))
    assert full.parent_run_id == first.parent_run_id and full.skipped == [0]
    assert events == [("skipped", 0), ("started", 1), ("finished", 1)]
    assert json.dumps(full.reports[0], sort_keys=True) == json.dumps(first.reports[0], sort_keys=True)

    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name("cv-test")
    parent = client.get_run(full.parent_run_id)
    assert parent.data.tags["ipb.kind"] == "cv" and parent.data.tags["ipb.method"] == "supervised"
    assert parent.data.params["method.epochs"] == "1"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{full.parent_run_id}'")
    assert sorted(c.data.tags["ipb.fold"] for c in children) == ["0", "1"]
    want = aggregate_folds([full.reports[0], full.reports[1]])
    assert parent.data.metrics["cv_macro_tpr_mean"] == pytest.approx(want["macro_tpr"]["mean"])
    for child in children:
        assert "test_macro_tpr" in child.data.metrics
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == [0]
    fold1 = next(c for c in children if c.data.tags["ipb.fold"] == "1")
    names = {a.path for a in client.list_artifacts(fold1.info.run_id)}
    assert {"test_report.json", "confusion_matrix.png"} <= names
    assert fold1.data.tags["ipb.model_uri"]  # the best student, an MLflow model (MLflow 3 keeps it apart)
    # everything finished: a third run trains nothing
    again = run_cv(cfg, log_model=False)
    assert again.skipped == [0, 1] and again.summary["folds"] == 2


def test_another_labelled_fraction_draws_folds_in_a_catalog_view(cv_catalog):
    from ipb_ray.data.fold_views import fold_catalog
    from ipb_ray.data.folds import read_folds

    same = fold_catalog(_cfg(cv_catalog))
    assert same == str(cv_catalog / "catalog")
    view = fold_catalog(_cfg(cv_catalog, "split.labelled_fraction=0.2"))
    assert "views" in view and read_folds(view).labelled_fraction == pytest.approx(0.2)
    assert read_folds(cv_catalog / "catalog").labelled_fraction == pytest.approx(0.4)  # untouched
    assert fold_catalog(_cfg(cv_catalog, "split.labelled_fraction=0.2")) == view  # reused


def test_unknown_fold_is_refused(cv_catalog):
    from ipb_ray.distributed.cv import run_cv

    with pytest.raises(ValueError, match=r"folds \[5\] do not exist"):
        run_cv(_cfg(cv_catalog, "name=bad"), [5])


def test_two_folds_in_parallel_share_a_two_cpu_cluster(cv_catalog):
    from ipb_ray.distributed.cv import default_parallel, run_cv

    cfg = _cfg(cv_catalog, "name=par", "resources.cpus_per_worker=0.5")
    assert default_parallel(cfg, 2) == 1  # 0.5 + 1 CPU per fold on 2 CPUs: the safe default is one at a time
    events = []
    result = run_cv(cfg, parallel=2, log_model=False, on_event=lambda kind, fold, info: events.append((kind, fold)))
    assert sorted(result.reports) == [0, 1] and result.summary["folds"] == 2
    starts = [i for i, e in enumerate(events) if e[0] == "started"]
    assert starts[:2] == [0, 1]  # both folds started before either finished: they ran side by side


def test_pseudo_label_with_the_pseudo_balancer_runs_through_cv_and_mlflow(cv_catalog):
    """A method added on the registry runs through `ipb cv` unchanged, with IPB's balancer."""
    from mlflow import MlflowClient

    from ipb_ray.distributed.cv import run_cv

    cfg = _cfg(cv_catalog, "name=plcv", "resources.num_workers=0", "method.name=pseudo_label",
               "method.balancer=pseudo_balance", "method.teacher_epochs=1", "method.epochs=1",
               "method.unlabelled_batch_size=4", "method.pseudo_label.threshold=0.0", "method.pseudo_label.ramp_steps=1",
               "method.finetune_epochs=0")
    result = run_cv(cfg, [0], log_model=False)
    report = result.reports[0]
    assert report["n"] > 0 and sum(map(sum, report["confusion_matrix"])) == report["n"]
    client = MlflowClient(cfg.tracking.tracking_uri)
    child = client.search_runs([client.get_experiment_by_name("cv-test").experiment_id],
                               f"tags.mlflow.parentRunId = '{result.parent_run_id}'")[0]
    assert client.get_run(result.parent_run_id).data.tags["ipb.method"] == "pseudo_label"
    metrics = child.data.metrics
    names = [k.split("/", 1)[1] for k in metrics if k.startswith("teacher_proportion/")]
    assert names, sorted(metrics)  # the balancer's labelling pass ran and was logged
    assert sum(metrics[f"teacher_proportion/{c}"] for c in names) == pytest.approx(1)
    assert sum(metrics[f"stream_share/{c}"] for c in names) == pytest.approx(1)
    assert 0 <= metrics["mask_rate"] <= 1 and metrics["label_seconds"] > 0
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_balanced_accuracy")]
    assert steps == [0, 1]  # warm-up epoch, then the pseudo-labelling epoch


@pytest.mark.parametrize("method, balancer, key, stages", [
    ("fixmatch", "logit_adjust", "prior_estimate/", ["warmup", "fixmatch", "finetune"]),
    ("simclr", "none", "contrastive_loss", ["contrastive", "supervised"]),
])
def test_issue_17_methods_run_through_cv_and_mlflow(cv_catalog, method, balancer, key, stages):
    """FixMatch with the logit-adjusting balancer, and SimCLR, through the real `ipb cv`:
    every stage logged per epoch to the fold run, the balancer's figures and the fold's
    report (with fine-tuning, also the choice before it) in MLflow."""
    from mlflow import MlflowClient

    from ipb_ray.distributed.cv import run_cv

    cfg = _cfg(cv_catalog, f"name=cv-{method}", "resources.num_workers=0", f"method.name={method}",
               f"method.balancer={balancer}", "method.teacher_epochs=1", "method.epochs=1",
               "method.unlabelled_batch_size=4", "method.fixmatch.threshold=0.0", "method.simclr.supervised_epochs=1",
               f"method.finetune_epochs={int('finetune' in stages)}")
    result = run_cv(cfg, [0], log_model=False)
    assert result.reports[0]["n"] > 0
    client = MlflowClient(cfg.tracking.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert (parent.data.tags["ipb.method"], parent.data.tags["ipb.balancer"]) == (method, balancer)
    child = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")[0]
    metrics = child.data.metrics
    assert any(k.startswith(key) for k in metrics), sorted(metrics)
    if key == "prior_estimate/":
        assert sum(v for k, v in metrics.items() if k.startswith(key)) == pytest.approx(1, abs=1e-4)
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_balanced_accuracy")]
    assert steps == list(range(len(stages)))
    if "finetune" in stages:
        assert 0 <= metrics["pre_finetune_test_macro_tpr"] <= 1  # both results: before and after fine-tuning


def test_epochs_reach_the_fold_run_while_it_trains_and_a_resumed_fold_keeps_its_run(cv_catalog):
    from mlflow import MlflowClient

    from ipb_ray.tracking import runs as tracking
    from ipb_ray.distributed.training import train_fold

    cfg = _cfg(cv_catalog, "name=live", "resources.num_workers=0", "method.epochs=2")
    uri = cfg.tracking.tracking_uri
    parent = tracking.open_parent(uri, "cv-test", cfg)
    child = tracking.open_fold(uri, parent, 0, cfg)
    client = MlflowClient(uri)
    first = train_fold(cfg, 0, mlflow_run=(tracking.absolute_uri(uri), child))
    # before the driver logs the fold, the run already holds every epoch, and is still running
    run = client.get_run(child)
    assert run.info.status == "RUNNING" and "test_macro_tpr" not in run.data.metrics
    assert [m.step for m in client.get_metric_history(child, "val_balanced_accuracy")] == [0, 1]
    assert tracking.open_fold(uri, parent, 0, cfg) == child  # a resumed fold logs into the same run
    # two more epochs on the same run: it resumes at epoch 2 and logs epochs 2 and 3 only
    more = train_fold(cfg.replace("method.epochs=4"), 0, mlflow_run=(tracking.absolute_uri(uri), child))
    assert more["resumed_from_epoch"] == 1 and len(more["history"]) == 4
    tracking.log_fold(uri, parent, 0, more, cfg, log_model=False, child_id=child)
    assert [m.step for m in client.get_metric_history(child, "train_loss")] == [0, 1, 2, 3]  # none twice
    run = client.get_run(child)
    assert run.info.status == "FINISHED" and "test_macro_tpr" in run.data.metrics
    assert tracking.open_fold(uri, parent, 0, cfg) != child  # a finished fold is never reopened
    assert first["history"] == more["history"][:2]


def test_absolute_uri_pins_a_relative_sqlite_store_to_this_directory(tmp_path, monkeypatch):
    from ipb_ray.tracking.runs import absolute_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_two_cv_commands_at_once_on_one_sqlite_store_both_finish_with_every_fold(cv_catalog, ray_local, tmp_path):
    """Two users (or a cv beside a tune) writing to the default SQLite store at the same
    time, from a fresh database: both commands end well, every fold with its run and model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    gcs = ray_local.get_runtime_context().gcs_address
    bin_ipb = str(Path(sys.executable).parent / "ipb")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    procs = []
    for name in ("alice", "bob"):
        args = [bin_ipb, "cv", "--preset", "demo", f"data.catalog={cv_catalog / 'catalog'}",
                f"tracking.storage_path={tmp_path / name}", f"tracking.tracking_uri={uri}",
                "tracking.experiment=shared", f"name={name}", f"resources.address={gcs}", "resources.num_workers=0",
                "split.folds=2", "split.labelled_fraction=0.4", "method.name=supervised", "method.epochs=1",
                "method.steps_per_epoch=4", "model.backbone=patch_stats", "model.feature_dim=8",
                "data.global_patch=48", "data.local_patch=24", "method.batch_size=4"]
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("shared")
    runs = client.search_runs([exp.experiment_id])
    for name in ("alice", "bob"):
        parent = next(r for r in runs if r.info.run_name == f"{name}-supervised")
        folds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.tags["ipb.fold"] for r in folds) == ["0", "1"], name
        assert all(r.info.status == "FINISHED" and r.data.tags.get("ipb.model_uri") for r in folds), name
