"""Hyperparameter search: space checks (pure), and a real Tune + Optuna + ASHA search on a
local Ray cluster with MLflow tracking and a resumed study."""

from __future__ import annotations

import pytest
import yaml

from ipb_ray.config import ConfigError, load_config
from ipb_ray.distributed.search import load_space, trial_config


def _space(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def test_shipped_space_is_valid_for_the_ipb_presets():
    from pathlib import Path

    space = load_space(Path(__file__).resolve().parents[1] / "tune" / "spaces" / "ipb.yaml",
                       load_config(preset="ml_ms_ipb_hrnet"))
    assert space["method.mpl.threshold"] == {"type": "uniform", "low": 0.5, "high": 0.95}
    assert space["method.batch_size"]["values"] == [16, 32, 64]


@pytest.mark.parametrize("space, preset", [("fixmatch", "fixmatch"), ("fixmatch_logit_adjust", "fixmatch_logit_adjust"),
                                           ("pseudo_label", "pseudo_label"), ("simclr", "simclr")])
def test_each_methods_shipped_space_is_checked_against_that_methods_own_keys(space, preset):
    """Every shipped space loads for its method, and is refused for a method that does not read it."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tune" / "spaces" / f"{space}.yaml"
    cfg = load_config(preset=preset)
    loaded = load_space(path, cfg)
    own = [k for k in loaded if k.startswith(f"method.{cfg.method.name}.")]
    assert own, loaded  # the space searches the method's own section
    with pytest.raises(ConfigError, match="does not read this key"):
        load_space(path, load_config(preset="hrnet"))  # the supervised baseline reads none of them


@pytest.mark.parametrize("text, message", [
    ("method.mpl.treshold: {type: uniform, low: 0.5, high: 0.9}", "did you mean 'method.mpl.threshold'"),
    ("method.mpl.threshold: {type: normal, low: 0.5, high: 0.9}", "type one of loguniform"),
    ("method.mpl.threshold: {type: uniform, low: 0.9, high: 0.5}", "low < high"),
    ("method.lr: {type: loguniform, low: 0, high: 0.1}", "loguniform needs low > 0"),
    ("method.mpl.threshold: {type: uniform, low: 0.5, high: 1.5}", "value 1.5 is not allowed"),
    ("method.batch_size: {type: choice, values: []}", "non-empty list"),
    ("model.backbone: {type: choice, values: [hrnet, resnet]}", "value 'resnet' is not allowed"),
])
def test_bad_spaces_name_the_file_key_and_fix(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_space(_space(tmp_path, text), load_config(preset="demo"))
    assert "space.yaml" in str(err.value)


@pytest.mark.parametrize("method, key, ok", [
    ("supervised", "method.mpl.threshold", False),    # supervised has no pseudo-labels
    ("supervised", "method.lr", True),
    ("pseudo_label", "method.pseudo_label.threshold", True),
    ("mpl", "method.pseudo_label.threshold", False),  # Pseudo-Label's, not MPL's
    ("pseudo_label", "method.mpl.teacher_lr", False),  # MPL's, not Pseudo-Label's
    ("mpl", "method.pseudo_balance.relabel", False),  # the pseudo-balancer's key; mpl streams U as it is
    ("ipb", "method.pseudo_balance.relabel", True),
])
def test_a_space_may_only_search_keys_the_method_reads(tmp_path, method, key, ok):
    text = f"{key}: {{type: choice, values: [{'pass' if key.endswith('relabel') else 0.7}]}}"
    cfg = load_config(preset="demo", overrides=[f"method.name={method}"])
    if ok:
        assert list(load_space(_space(tmp_path, text), cfg)) == [key]
        return
    with pytest.raises(ConfigError, match=f"method '{method}' does not read this key") as err:
        load_space(_space(tmp_path, text), cfg)
    assert key in str(err.value) and "space.yaml" in str(err.value)


def test_every_method_key_is_read_by_the_loop_or_some_method():
    import dataclasses

    from ipb_ray.config import MethodConfig
    from ipb_ray.methods import get_method, list_balancers, list_methods, param_sections

    read = set()
    for name in list_methods():
        cls = get_method(name)
        for balancer in [None, *list_balancers()] if cls.semi_supervised and cls.pseudo_labelling else (None,):
            overrides = [f"method.name={name}"] + ([f"method.balancer={balancer}"] if balancer else [])
            read |= set(get_method(name).keys(load_config(preset="demo", overrides=overrides)))
    own = {f"{section}.{f.name}" for section, cls in param_sections().items() for f in dataclasses.fields(cls)}
    assert read == {f.name for f in dataclasses.fields(MethodConfig) if f.name != "sections"} | own
    assert {"mpl.threshold", "pseudo_label.threshold", "pseudo_balance.relabel"} <= own


def test_trial_config_applies_numpy_samples_and_names_the_trial():
    import numpy as np

    cfg = trial_config(load_config(preset="demo"), {"method.mpl.threshold": np.float64(0.7),
                                                    "method.batch_size": np.int64(32)}, "t-00001")
    assert cfg.method.mpl.threshold == 0.7 and cfg.method.batch_size == 32 and cfg.name == "demo-t-00001"


# --------------------------------------------------------------------------- on Ray

@pytest.mark.ray
@pytest.mark.slow
def test_search_stops_a_bad_trial_writes_best_yaml_and_resumes_the_study(tmp_path, ray_local):
    import optuna
    from mlflow import MlflowClient

    from ipb_ray.data import synth
    from ipb_ray.distributed.preprocess import build_catalog
    from ipb_ray.distributed.search import run_search

    root = tmp_path / "w"
    synth.write_world(synth.SynthConfig(frames=6, frame_size=768, colonies_per_frame=20, colony_scale=0.35,
                                        seed=3, image_format="png"), root / "world")
    cfg = load_config(preset="demo", overrides=[
        f"data.frames={root / 'world'}", "data.annotations=null",
        f"data.catalog={root / 'catalog'}", f"tracking.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=search-test",
        "split.folds=3", "split.labelled_fraction=0.6", "split.val_fraction=0.5", "method.name=supervised", "method.steps_per_epoch=4",
        "method.epochs=4", "method.optimizer=sgd", "model.backbone=patch_stats", "model.feature_dim=16",
        "data.global_patch=48",
        "data.local_patch=24", "method.batch_size=8", "name=s"])
    build_catalog(cfg)
    from conftest import wait_for_free_cpus

    wait_for_free_cpus(ray_local)  # a trial that cannot get a CPU would wait forever
    # a value that learns, then one that blows the weights up (NaN, one class for all): a
    # clearly bad trial, which ASHA must stop after its first epoch
    space = _space(tmp_path, "method.lr: {type: choice, values: [0.05, 10.0]}\n"
                             "method.momentum: {type: uniform, low: 0.0, high: 0.9}\n")
    points = [{"method.lr": 0.05, "method.momentum": 0.9}, {"method.lr": 10.0, "method.momentum": 0.9}]
    out = tmp_path / "search"
    result = run_search(cfg, space, 2, out=out, max_concurrent=1, points_to_evaluate=points, grace_period=3)
    print(result.trials)
    assert len(result.trials) == 2
    assert any(r["iterations"] < 4 for r in result.trials), "ASHA stopped no trial early"
    best = load_config(result.best_yaml)  # the YAML `ipb cv --config` takes
    assert best.method.lr == result.best_params["method.lr"] and best.method.name == "supervised"
    assert yaml.safe_load(result.best_yaml.read_text())["data"]["catalog"] == str(root / "catalog")
    assert result.best_params["method.lr"] == 0.05
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name("search-test")
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["ipb.kind"] == "search" and "best_objective" in parent.data.metrics
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 2 and all("method.lr" in c.data.params for c in children)
    # --resume: one more trial in the same study and under the same parent
    with pytest.raises(FileExistsError, match="--resume"):
        run_search(cfg, space, 1, out=out)
    more = run_search(cfg, space, 1, out=out, resume=True, max_concurrent=1, grace_period=3)
    assert more.parent_run_id == result.parent_run_id
    study = optuna.load_study(study_name="ipb-search", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3 and study.trials[-1].value is not None and len(more.trials) == 1
    assert more.trials[0]["iterations"] >= 3  # reports reached Tune
