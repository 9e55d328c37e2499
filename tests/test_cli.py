"""The `ipb` command line: help everywhere, config commands, error exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from ipb_ray.cli import app

runner = CliRunner()

COMMANDS = [[], ["config"], ["config", "show"], ["config", "validate"], ["config", "presets"],
            ["synth"], ["demo"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "ipb")
def test_help_everywhere(cmd):
    result = runner.invoke(app, cmd + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "ipb_ray.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in ("synth", "demo", "config"):
        assert name in out


def test_config_show_prints_the_full_resolved_preset():
    result = runner.invoke(app, ["config", "show", "--preset", "ml_ms_ipb_hrnet"])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert data["preset"] == "ml_ms_ipb_hrnet"
    assert data["method"]["mpl"]["threshold"] == 0.65 and data["model"]["backbone"] == "hrnet"
    assert data["data"]["segmentation"]["min_object_px"] == 2000


def test_config_show_applies_overrides_and_flat():
    result = runner.invoke(app, ["config", "show", "--preset", "demo", "--flat", "method.mpl.threshold=0.9"])
    assert result.exit_code == 0, result.output
    assert "method.mpl.threshold = 0.9" in result.output


def test_config_validate_ok_and_bad(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("extends: demo\nmethod: {mpl: {threshold: 0.7}}\n")
    result = runner.invoke(app, ["config", "validate", str(good)])
    assert result.exit_code == 0 and "ok" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: demo\nmethod: {mpl: {threshold: 7}}\n")
    result = runner.invoke(app, ["config", "validate", str(bad)])
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "method.mpl.threshold" in result.output


def test_config_validate_lists_every_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: demo\nmethod: {mpl: {threshold: 7}, batch_size: abc}\nsplit: {foldz: 5}\n")
    result = runner.invoke(app, ["config", "validate", str(bad), "seed=-1"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 4, result.output
    for key in ("method.mpl.threshold", "method.batch_size", "split.foldz"):
        assert sum(f"bad.yaml: {key}: " in line for line in lines[:3]) == 1, key
    assert "override 'seed=-1': seed: " in lines[3]
    assert f"4 errors in {bad}" in " ".join(result.output.split())


def test_unknown_preset_exits_2_with_suggestion():
    result = runner.invoke(app, ["config", "show", "--preset", "ml_ms_ipb_hrnt"])
    assert result.exit_code == 2
    assert "did you mean 'ml_ms_ipb_hrnet'" in result.output


def test_config_presets_lists_all():
    result = runner.invoke(app, ["config", "presets"])
    assert result.exit_code == 0
    for name in ("vgg19", "ml_ms_ipb_hrnet", "mpl_balanced", "demo"):
        assert name in result.output


def test_synth_command_writes_frames_masks_and_annotations(tmp_path):
    out = tmp_path / "world"
    result = runner.invoke(app, ["synth", "--out", str(out), "--frames", "2", "--size", "512",
                                 "--colonies", "6", "--scale", "0.3", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["frame_0000.tif", "frame_0001.tif"]
    assert len(list((out / "masks").glob("*.png"))) == 2
    header = (out / "annotations.csv").read_text().splitlines()[0]
    assert header.startswith("frame,instance,x0,y0,x1,y1,label,labels")
    assert "total" in result.output


def test_synth_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "thesis.docx").write_text("precious")
    result = runner.invoke(app, ["synth", "--out", str(tmp_path), "--frames", "1", "--size", "512"])
    assert result.exit_code == 2 and str(tmp_path) in result.output
    assert (tmp_path / "thesis.docx").read_text() == "precious"


TINY_TRAINING = ("method.epochs=2", "method.teacher_epochs=1", "method.steps_per_epoch=3", "eval.bn_batches=2",
                 "method.finetune_epochs=1")


def test_demo_refuses_overrides_of_its_own_paths(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "data.catalog=/elsewhere"])
    assert result.exit_code == 2
    assert "data.catalog=/elsewhere" in result.output and "--out" in result.output
    assert not (tmp_path / "demo").exists()  # refused before anything is written


def test_demo_rejects_an_unknown_override_before_writing(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "method.epoch=2"])
    assert result.exit_code == 2 and "method.epoch" in result.output
    assert not (tmp_path / "demo").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_demo_runs_end_to_end(ray_local, tmp_path):
    from mlflow import MlflowClient

    # the pipeline end to end at a few optimizer steps; how well the demo preset learns is
    # measured by benchmarks/accuracy.py (RESULTS.md), not here
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--folds", "2", *TINY_TRAINING])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "catalog" / "catalog.json").exists()
    assert (tmp_path / "demo" / "catalog" / "folds.parquet").exists()
    assert (tmp_path / "demo" / "patches.png").stat().st_size > 1000
    assert "labelled patches of fold 0" in result.output
    for method in ("supervised", "mpl", "ipb"):  # steps 4-6: two folds each, with curves
        for fold in (0, 1):
            run = tmp_path / "demo" / "ray_results" / f"demo-seed0-{method}-fold{fold}"
            assert list(run.glob("checkpoint_*")) and (run / "curves.png").stat().st_size > 1000
    history = json.loads(sorted((tmp_path / "demo" / "ray_results" / "demo-seed0-supervised-fold0")
                                .glob("checkpoint_*/history.json"))[-1].read_text())
    assert [row["train_steps"] for row in history] == [3, 3]  # the overrides reached the workers
    assert "the three methods" in result.output and "worst-class TPR" in result.output
    assert "paired over folds" in result.output  # the paired comparisons against the baseline
    # MLflow: one parent per method with two fold children
    client = MlflowClient(f"sqlite:///{(tmp_path / 'demo' / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("ipb-demo")
    parents = client.search_runs([exp.experiment_id], "tags.`ipb.kind` = 'cv'")
    assert sorted(p.data.tags["ipb.method"] for p in parents) == ["ipb", "mpl", "supervised"]
    children = client.search_runs([exp.experiment_id], "tags.`ipb.kind` = 'fold'")
    assert len(children) == 6
    html = (tmp_path / "demo" / "report" / "report.html").read_text()
    assert "demo-seed0-ipb" in html and "data:image/png;base64" in html


def test_history_table_curves_and_comparison_render(tmp_path, capsys):
    from ipb_ray.cli import print_history
    from ipb_ray.tracking.viz import save_training_curves

    names = ["A", "B"]
    history = [{"epoch": 0, "stage": "teacher", "train_loss": 1.2, "val_balanced_accuracy": 0.5,
                "epoch_seconds": 2.0},
               {"epoch": 1, "stage": "mpl", "teacher_loss": 1.0, "train_loss": 0.9, "val_balanced_accuracy": 0.6,
                "teacher_val_balanced_accuracy": 0.55,
                "teacher_proportion/A": 0.8, "teacher_proportion/B": 0.2, "sampling_weight/A": 0.2,
                "sampling_weight/B": 0.8, "stream_share/A": 0.52, "stream_share/B": 0.48,
                "unlabelled_true_share/A": 0.7, "unlabelled_true_share/B": 0.3, "epoch_seconds": 3.0}]
    print_history(history, names)
    out = capsys.readouterr().out
    assert "0.80->0.52" in out and "0.20->0.48" in out and "teacher" in out and "mpl" in out
    assert "0.900" in out and "0.550" in out  # the student's loss, the teacher's validation
    png = save_training_curves(history, names, tmp_path / "c.png", title="t")
    assert png.stat().st_size > 5000


def test_cv_compare_report_bad_input_messages(tmp_path):
    result = runner.invoke(app, ["cv", "--preset", "demo", "--labelled-fraction", "0.1,lots"])
    assert result.exit_code == 2 and "numbers separated by commas" in result.output
    result = runner.invoke(app, ["cv", "--preset", "demo", "--labelled-fraction", "0.1,1.5"])
    assert result.exit_code == 2 and "must lie in (0, 1)" in result.output
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(app, ["report", "nowhere", "--tracking-uri", uri, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "nowhere" in result.output and "ipb cv" in result.output
    result = runner.invoke(app, ["compare", "a-ipb", "b-ipb", "--experiment", "nowhere", "--tracking-uri", uri])
    assert result.exit_code == 2 and "nowhere" in result.output


def test_register_and_predict_bad_input_messages(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(app, ["register", "--name", "colonies", "--tracking-uri", uri])
    assert result.exit_code == 2 and "name the cross-validation run" in result.output
    result = runner.invoke(app, ["register", "nothing-ipb", "--name", "colonies", "--experiment", "nowhere",
                                 "--tracking-uri", uri])
    assert result.exit_code == 2 and "nowhere" in result.output and "ipb cv" in result.output
    result = runner.invoke(app, ["predict", "--model", str(tmp_path / "none"), "--frames", str(tmp_path),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "neither an MLflow model URI" in result.output
    result = runner.invoke(app, ["predict", "--model", "models:/nothing@champion", "--frames", str(tmp_path),
                                 "--out", str(tmp_path / "out"), "--tracking-uri", uri])
    assert result.exit_code == 2 and "cannot load model 'models:/nothing@champion'" in result.output


def test_tune_bad_input_messages(tmp_path):
    result = runner.invoke(app, ["tune", "--preset", "demo", "--space", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "none.yaml not found" in result.output
    space = tmp_path / "s.yaml"
    space.write_text("method.mpl.threshold: {type: uniform, low: 0.5, high: 0.9}\n")
    result = runner.invoke(app, ["tune", "--preset", "demo", "--space", str(space), "--resume",
                                 "--out", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no study in" in result.output
    result = runner.invoke(app, ["tune", "--preset", "demo", "--space", str(space), "--objective", "best"])
    assert result.exit_code == 2 and "objective 'best'" in result.output
    result = runner.invoke(app, ["tune", "--preset", "demo", "--space", str(space), "resources.num_workers=0"])
    assert result.exit_code == 2 and "cannot run inside a Tune trial" in result.output


def test_submit_and_jobs_bad_input_messages():
    result = runner.invoke(app, ["submit", "--", "demo"])
    assert result.exit_code == 2 and "`demo` cannot be submitted as a Ray job" in result.output
    result = runner.invoke(app, ["submit", "--address", "10.0.0.1:6379", "--", "cv"])
    assert result.exit_code == 2 and "is the GCS port" in result.output
    # nothing listens on port 1: the message says what to check
    result = runner.invoke(app, ["jobs", "status", "raysubmit_x", "--address", "http://127.0.0.1:1"])
    assert result.exit_code == 2 and "no Ray job API at http://127.0.0.1:1" in result.output
    assert "port-forward" in result.output


def test_report_in_a_ray_job_refuses_an_output_inside_the_jobs_working_dir(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://p.zip"}}))
    result = runner.invoke(app, ["report", "x", "--tracking-uri", "http://127.0.0.1:1", "--out", "report"])
    assert result.exit_code == 2 and "--out=report lies inside the Ray job's temporary working directory" \
        in result.output
    assert not (tmp_path / "report").exists()


def test_demo_trains_in_local_mode_unless_told_otherwise(tmp_path):
    from ipb_ray.cli import _demo_overrides
    from ipb_ray.config import load_config

    world, out = tmp_path / "world", tmp_path / "demo"
    assert load_config(preset="demo", overrides=_demo_overrides(0, world, out)).resources.num_workers == 0
    chosen = load_config(preset="demo", overrides=_demo_overrides(0, world, out, ["resources.num_workers=1"]))
    assert chosen.resources.num_workers == 1 and chosen.data.catalog == str(out / "catalog")
