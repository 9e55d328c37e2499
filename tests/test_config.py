"""Config tree: paper defaults, presets, YAML round trip, overrides and error messages."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from ipb_ray.config import (ConfigError, ExperimentConfig, dump_yaml, flatten, from_dict,
                            list_presets, load_config, parse_override, to_dict, validate_all)

PAPER_PRESETS = ["vgg19", "hrnet", "ms_hrnet", "ipb_vgg", "ms_ipb_vgg", "ml_ipb_vgg", "ml_ms_ipb_vgg",
                 "ms_ipb_hrnet", "ml_ipb_hrnet", "ml_ms_ipb_hrnet", "mpl_imbalanced", "mpl_balanced"]


def test_defaults_are_the_papers_values():
    c = ExperimentConfig()
    assert (c.method.lr, c.method.weight_decay, c.method.momentum) == (0.005, 1e-4, 0.9)
    assert (c.method.batch_size, c.method.epochs, c.method.teacher_epochs) == (32, 200, 200)
    assert c.method.mpl.threshold == 0.65 and c.method.mpl.student_warmup_epochs == 10
    assert (c.split.folds, c.split.labelled_fraction) == (10, 0.1)
    assert (c.data.patch_size, c.data.global_patch, c.data.local_patch) == (128, 224, 112)
    assert c.data.min_foreground == 0.25
    s = c.data.segmentation
    assert (s.blur_ksize, s.entropy_radius, s.opening_radius, s.min_object_px) == (3, 3, 3, 2000)
    assert c.tracking.tracking_uri == "sqlite:///mlflow.db"


def test_every_paper_configuration_and_demo_is_shipped():
    assert set(PAPER_PRESETS + ["demo"]) <= set(list_presets())


def test_every_registered_method_and_balancer_has_a_preset_row():
    """Table 5's rows and the methods beyond it: a preset per method (and per composed balancer)."""
    from ipb_ray.methods import list_balancers, list_methods

    shipped = {(c.method.name, c.method.balancer) for c in (load_config(preset=n) for n in list_presets())}
    assert {name for name, _ in shipped} >= set(list_methods())
    assert {bal for _, bal in shipped} >= set(list_balancers()) - {"none"}


@pytest.mark.parametrize("name", list_presets())
def test_preset_round_trips_through_yaml(name, tmp_path):
    cfg = load_config(preset=name)
    assert cfg.preset == name
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("name, method, backbone, ms, ml", [
    ("vgg19", "supervised", "vgg19_bn", False, False),
    ("ms_hrnet", "supervised", "hrnet", True, False),
    ("ml_ipb_vgg", "ipb", "vgg19_bn", False, True),
    ("ml_ms_ipb_hrnet", "ipb", "hrnet", True, True),
    ("mpl_imbalanced", "mpl", "hrnet", True, True),
    ("simclr", "simclr", "hrnet", True, True),
    ("fixmatch_pseudo_balance", "fixmatch", "hrnet", True, True),
])
def test_presets_state_the_papers_rows(name, method, backbone, ms, ml):
    c = load_config(preset=name)
    assert (c.method.name, c.model.backbone, c.data.multi_scale, c.data.multi_label) == \
        (method, backbone, ms, ml)


def test_mpl_presets_differ_only_in_labelled_balancing():
    a, b = to_dict(load_config(preset="mpl_imbalanced")), to_dict(load_config(preset="mpl_balanced"))
    diff = {k for k, v in flatten(a).items() if flatten(b)[k] != v}
    assert diff == {"preset", "method.balance_labelled"}


def test_overrides_are_typed_and_applied():
    c = load_config(preset="demo", overrides=["method.mpl.threshold=0.7", "split.folds=3",
                                              "data.class_names=[a, b]", "method.draws_per_epoch=null"])
    assert c.method.mpl.threshold == 0.7 and c.split.folds == 3
    assert c.data.class_names == ("a", "b") and c.method.draws_per_epoch is None
    assert c.replace("seed=5").seed == 5 and c.seed == 0


def test_file_extends_a_preset_and_a_relative_file(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: demo\nmethod: {mpl: {threshold: 0.8}}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "run.yaml").write_text("extends: ../base.yaml\nsplit: {folds: 4}\n")
    c = load_config(sub / "run.yaml")
    assert c.preset == "demo" and c.method.mpl.threshold == 0.8 and c.split.folds == 4
    assert c.model.backbone == "cnn_small"  # the demo preset's


def test_config_is_frozen():
    c = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.method.mpl.threshold = 0.1  # type: ignore[misc]


def test_flatten_gives_dotted_keys():
    flat = flatten(ExperimentConfig())
    assert flat["method.mpl.threshold"] == 0.65
    assert flat["data.segmentation.entropy_radius"] == 3
    assert not any(k.startswith("method.sections") for k in flat)


def test_method_sections_are_every_registered_ones_and_round_trip():
    from ipb_ray.config import dump_yaml, from_dict, to_dict
    from ipb_ray.methods import param_sections

    c = load_config(preset="demo", overrides=["method.pseudo_label.weight=2", "method.mpl.ema=0.5"])
    assert [name for name, _ in c.method.sections] == list(param_sections())
    assert c.method.pseudo_label.weight == 2 and c.method.mpl.ema == 0.5 and c.method.mpl.uda_steps == 25
    assert ExperimentConfig().method.pseudo_label.weight == 1.0  # sections not given take their defaults
    again = from_dict(yaml.safe_load(dump_yaml(c)))
    assert again == c and hash(again) == hash(c) and to_dict(again)["method"]["mpl"]["ema"] == 0.5
    with pytest.raises(AttributeError, match="no key or section 'nothing'"):
        c.method.nothing  # noqa: B018


@pytest.mark.parametrize("override, needles", [
    ("method.mpl.threshold=1.5", ["method.mpl.threshold", "1.5", "[0, 1]"]),
    ("method.mpl.treshold=0.5", ["method.mpl.treshold", "did you mean 'method.mpl.threshold'"]),
    ("method.batch_size=abc", ["method.batch_size", "'abc'", "whole number"]),
    ("data.multi_scale=maybe", ["data.multi_scale", "true or false"]),
    ("model.backbone=resnet50", ["model.backbone", "resnet50", "hrnet"]),
    ("data.segmentation.blur_ksize=4", ["data.segmentation.blur_ksize", "odd"]),
    ("data.local_patch=300", ["data.local_patch", "global_patch"]),
    ("split.labelled_fraction=0.95", ["split.labelled_fraction", "no unlabelled"]),
    ("split.fold=10", ["split.fold", "[0, 9]"]),
    ("method.name=null", ["method.name", "null is not allowed"]),
    ("method.mpl.threshold", ["section.key=value"]),
    # a key that moved from the flat method section into a method's own one names its new home
    ("method.threshold=0.7", ["method.threshold", "'method.mpl.threshold' or 'method.pseudo_label.threshold'"]),
    ("method.relabel=reuse", ["method.relabel", "'method.pseudo_balance.relabel'"]),
    ("method.mlp.threshold=0.7", ["method.mlp", "did you mean 'method.mpl'"]),
    ("method.pseudo_label.weight=-1", ["method.pseudo_label.weight", "[0, 100]"]),
    ("method.pseudo_balance.relabel=sometimes", ["method.pseudo_balance.relabel", "pass, reuse"]),
    # a retired key says what replaced it
    ("method.shuffle_buffer=512", ["method.shuffle_buffer", "shuffled over the whole epoch", "method.shuffle: false"]),
])
def test_bad_override_messages_name_key_value_and_range(override, needles):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    for needle in needles:
        assert needle in str(err.value)


def test_bad_file_messages_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: method\.lr: -1"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        load_config("demmo")


def test_extends_loop_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "a.yaml")


def test_parse_override_parses_yaml_scalars():
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_dump_yaml_is_plain_yaml():
    data = yaml.safe_load(dump_yaml(load_config(preset="ml_ms_ipb_hrnet")))
    assert set(data) == {"name", "preset", "seed", "data", "split", "model", "method", "augment", "eval", "resources",
                         "tracking"}


def test_a_folder_named_like_a_preset_does_not_shadow_it(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config("demo").preset == "demo"
    assert load_config(preset="demo").preset == "demo"


def test_validate_all_lists_every_error_of_every_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: demo\nmethod:\n  mpl: {threshold: 7}\n  batch_size: abc\nsplit:\n  foldz: 5\n")
    errors = validate_all(bad)
    by_key = {e.key: e for e in errors}
    assert len(errors) == 3 and set(by_key) == {"method.mpl.threshold", "method.batch_size", "split.foldz"}
    assert all(e.source == str(bad) for e in errors)
    assert "[0, 1]" in by_key["method.mpl.threshold"].detail
    assert "whole number" in by_key["method.batch_size"].detail
    assert "unknown key; did you mean 'split.fold" in by_key["split.foldz"].detail
    with pytest.raises(ConfigError) as err:  # load_config still stops at the first
        load_config(bad)
    assert str(err.value) == str(errors[0])


def test_validate_all_runs_cross_field_checks_only_on_valid_values(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("split: {folds: 5, fold: 7}\ndata: {global_patch: abc, local_patch: 300}\n")
    errors = validate_all(cfg)
    assert [e.key for e in errors] == ["split.fold", "data.global_patch"]
    assert "[0, 4]" in errors[0].detail  # needs both split values; local_patch is not blamed


def test_validate_all_is_empty_exactly_when_load_config_loads(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("extends: demo\nmethod: {mpl: {threshold: 0.7}}\n")
    assert validate_all(good) == [] and validate_all(good, ["split.folds=5"]) == []
    for override in ("method.mpl.threshold=1.5", "method.mpl.treshold=0.5", "data.local_patch=300",
                     "split.fold=10", "method.name=null", "method.mpl.threshold"):
        with pytest.raises(ConfigError) as err:
            load_config(overrides=[override])
        errors = validate_all(overrides=[override])
        assert [str(e) for e in errors] == [str(err.value)], override


def test_validate_all_collects_bad_overrides_and_stops_at_an_unreadable_file(tmp_path):
    errors = validate_all(overrides=["method.mpl.threshold", "method.lr=-1", "seed=x"])
    assert [(e.source, e.key) for e in errors] == [
        ("override", ""), ("override 'method.lr=-1'", "method.lr"), ("override 'seed=x'", "seed")]
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: [unclosed\n")
    (only,) = validate_all(broken, ["method.lr=-1"])
    assert "not valid YAML" in str(only) and only.source == str(broken)


def test_settings_that_reach_the_streams_and_removed_keys():
    from ipb_ray.engine.fold import stream_specs

    cfg = load_config(preset="demo", overrides=["eval.tta=3", "augment.flip_p=0.1"])
    specs = stream_specs(cfg, ("a", "b"), semi=True)
    assert specs.eval.tta == 3 and specs.eval.mode == "test"
    assert specs.train.augment.flip_p == 0.1 and specs.uda.augment is cfg.augment
    assert specs.plain.mode == "plain" and specs.label is not None and specs.label.mode == "label"
    supervised = stream_specs(cfg, ("a", "b"), semi=False)
    assert supervised.uda is None and supervised.label is None
    with pytest.raises(ConfigError, match="method.finetune_epochs: -1 is out of range; allowed"):
        load_config(overrides=["method.finetune_epochs=-1"])
    with pytest.raises(ConfigError, match="augment.strong_ops.*unknown ops"):
        load_config(overrides=["augment.strong_ops=[rotate, invert]"])


def test_docs_config_md_is_the_generated_reference_of_every_key():
    from pathlib import Path

    from ipb_ray.config import ExperimentConfig, flatten, reference_markdown

    text = reference_markdown()
    on_disk = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert on_disk == text, "docs/config.md is stale: run `ipb config reference > docs/config.md`"
    for key in flatten(ExperimentConfig()):
        assert f"| `{key}` |" in text, key
