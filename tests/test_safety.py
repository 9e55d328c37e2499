"""Nothing lost, nothing leaked: literal paths, no silent deletes, row-level rejects, safe
uploads, weights-only checkpoints, output folders checked first, label surprises named.

Pure parts here (milliseconds); the Ray and CLI ends at the bottom use the session's
shared local cluster, and the job upload is checked on a real cluster in test_jobs.py.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ipb_ray.cli import app, interrupt_hint
from ipb_ray.cluster.paths import check_output_dir
from ipb_ray.cluster.submit import pack_upload, plan_upload
from ipb_ray.config import ConfigError, DataConfig, load_config, parse_override, validate_all
from ipb_ray.data import catalog, importers
from ipb_ray.nn.checkpoint import UnsafeCheckpointError, load_state

runner = CliRunner()
PROJECT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- 1. literal paths

@pytest.mark.parametrize("raw", ["H/plate #2", "*.tif", "2024", "plates/[AB]?.png", "a: b", "&anchor", "{x}"])
def test_string_settings_from_the_command_line_are_taken_literally(raw):
    assert parse_override(f"data.frames={raw}") == ("data.frames", raw)
    assert load_config(preset="demo", overrides=[f"data.frames={raw}", f"name={raw}"]).data.frames == raw


def test_null_clears_an_optional_path_and_quotes_keep_a_literal_null():
    assert parse_override("data.annotations=null") == ("data.annotations", None)
    assert parse_override("data.annotations=") == ("data.annotations", None)
    assert parse_override("data.catalog='null'") == ("data.catalog", "null")
    assert parse_override("method.lr=0.5") == ("method.lr", 0.5)  # numbers stay numbers
    assert parse_override("method.pseudo_balance.prior=em") == ("method.pseudo_balance.prior", "em")


def test_a_number_where_a_string_belongs_in_a_yaml_file_says_to_quote_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  frames: 2024\n")
    with pytest.raises(ConfigError, match=r"write it in quotes: '2024'"):
        load_config(str(cfg))


@pytest.mark.parametrize("key", ["method.lr", "split.labelled_fraction", "method.mpl.threshold"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_inf_are_refused_for_every_number(key, value):
    with pytest.raises(ConfigError, match="not a finite number"):
        load_config(preset="demo", overrides=[f"{key}={value}"])


def test_config_validate_lists_nan_settings(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method:\n  lr: .nan\nsplit:\n  labelled_fraction: .nan\n")
    keys = {e.key for e in validate_all(str(cfg))}
    assert {"method.lr", "split.labelled_fraction"} <= keys


# --------------------------------------------------------------------------- 2. no silent deletes

def _parts(root, *keys):
    for k in keys:
        catalog.write_shard(root, k, [], [])


def test_a_catalog_of_other_inputs_is_refused_untouched_and_replaced_only_with_overwrite(tmp_path):
    root = tmp_path / "cat"
    old = {"importer": "frames", "inputs": "/data/plate1", "segmentation": {"blur_ksize": 3}, "point_box": 0}
    catalog.begin_build(root, ["a", "b"], old)
    _parts(root, "a", "b")
    (root / catalog.MANIFEST).write_text('{"colonies": 238}')
    new = {**old, "inputs": "/data/plate2"}
    with pytest.raises(catalog.CatalogExistsError) as err:
        catalog.begin_build(root, ["c"], new)
    text = str(err.value)
    assert "238 colonies" in text and "/data/plate1" in text and "/data/plate2" in text
    assert "--overwrite" in text and "Nothing was changed" in text
    assert sorted(p.stem for p in (root / "parts").glob("*.parquet")) == ["a", "b"]
    assert (root / catalog.MANIFEST).exists()  # still a finished catalog
    assert catalog.begin_build(root, ["c"], new, overwrite=True) == ["c"]
    assert not list((root / "parts").glob("*.parquet"))


def test_the_same_inputs_again_resume_and_keep_every_finished_part(tmp_path):
    root = tmp_path / "cat"
    record = {"importer": "frames", "inputs": "x"}
    catalog.begin_build(root, ["a", "b", "c"], record)
    _parts(root, "a")  # a crash after one shard
    assert catalog.begin_build(root, ["a", "b", "c"], record) == ["b", "c"]
    assert (root / "parts" / "a.parquet").exists()


# --------------------------------------------------------------------------- 3. row-level rejects

def _frame_file(folder):
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "a.png"), np.random.default_rng(0).integers(0, 255, (120, 120), dtype=np.uint8))


def _plan_rows(tmp_path, *rows):
    """Plan an annotation table of ``rows`` (after its header) on one frame: (table, kept rows,
    reject reasons by row)."""
    _frame_file(tmp_path / "f")
    table = tmp_path / "ann.csv"
    table.write_text("frame,x0,y0,x1,y1,label\n" + "".join(f"f/a.png,{r}\n" for r in rows))
    plan = importers.plan_frames(None, str(table), DataConfig())
    kept = [(a["row"], a["labels"]) for t in plan.tasks for item in t.items for a in item["annotations"]]
    return table, kept, {r["item"]: r["reason"] for r in plan.rejects}


def test_bad_numbers_in_annotation_rows_reject_that_row_only_with_file_and_row(tmp_path):
    table, kept, reasons = _plan_rows(tmp_path, "1,1,20,20,A", "inf,1,20,20,A", "30,nan,50,50,A",
                                      "30,30,lots,50,A", "60,60,90,90,B")
    assert reasons == {f"{table} row 3": "bad coordinate: x0='inf' is not a finite number",
                       f"{table} row 4": "bad coordinate: y0='nan' is not a finite number",
                       f"{table} row 5": "bad coordinate: x1='lots' is not a number"}
    assert [row for row, _ in kept] == [f"{table} row 2", f"{table} row 6"]


def test_an_excel_byte_order_mark_is_read_as_utf8_sig(tmp_path):
    _frame_file(tmp_path / "f")
    table = tmp_path / "ann.csv"
    table.write_bytes("frame,x0,y0,x1,y1,label\nf/a.png,1,1,20,20,Dénse\n".encode("utf-8-sig"))
    rows = importers.read_annotation_table(table)
    assert list(rows[0])[0] == "frame" and rows[0]["label"] == "Dénse"


def test_a_box_given_twice_with_other_labels_is_reported_not_turned_multi_label(tmp_path):
    table, kept, reasons = _plan_rows(tmp_path, "1,1,20,20,A", "1,1,20,20,B", "30,30,50,50,A", "30,30,50,50,A")
    assert f"same box as {table} row 3" in reasons[f"{table} row 2"]
    assert f"same box as {table} row 2" in reasons[f"{table} row 3"] and "'A;B'" in reasons[f"{table} row 3"]
    assert reasons[f"{table} row 5"].startswith(f"duplicate of {table} row 4")
    assert kept == [(f"{table} row 4", ["A"])]


def test_a_multi_label_image_without_a_class_folder_is_rejected(tmp_path):
    for sub in ("Dense", "multi_label", "multi_label/Dense+Spread"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / sub / "c.png"), np.full((40, 40), 100, np.uint8))
    plan = importers.plan_imagefolder(str(tmp_path), DataConfig())
    assert [(r["item"], "needs a folder naming its classes" in r["reason"]) for r in plan.rejects] == \
        [("multi_label/c.png", True)]
    labels = sorted(tuple(i["labels"]) for t in plan.tasks for i in t.items)
    assert labels == [("Dense",), ("Dense", "Spread")]


# --------------------------------------------------------------------------- 4. safe uploads

def _project(tmp_path):
    root = tmp_path / "proj"
    for rel, text in {"jobs/__init__.py": "", "jobs/cv.py": "print('cv')\n", "ipb_ray/data/catalog.py": "# code\n",
                      "README.md": "hi\n", ".env": "AWS_SECRET_ACCESS_KEY=abc\n", ".aws/credentials": "[default]\n",
                      "id_rsa.pem": "-----BEGIN-----\n", "keys/server.key": "k\n", "catalog/parts/a.parquet": "x",
                      "predictions/colonies.parquet": "x", "notes/secrets.yaml": "pw: 1\n",
                      "scratch/big.tmp": "x", ".gitignore": "scratch/\n*.log\n!keep.log\n",
                      "run.log": "x", "keep.log": "kept\n", "mlflow.db": "x"}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_upload_leaves_out_secrets_data_results_and_gitignored_files(tmp_path):
    root = _project(tmp_path)
    upload = plan_upload(root)
    files = {rel for rel, _ in upload.files}
    assert files == {"jobs/__init__.py", "jobs/cv.py", "ipb_ray/data/catalog.py", "README.md", "keep.log"}
    left = {p for paths in upload.left_out.values() for p in paths}
    assert {".env", ".aws/", "id_rsa.pem", "keys/server.key", "catalog/", "predictions/", "notes/secrets.yaml",
            "scratch/", "run.log", "mlflow.db"} <= left
    assert "uploading 5 files" in upload.summary() and ".env" in upload.summary()
    # --include brings back what a rule left out, nothing else
    more = plan_upload(root, includes=["catalog", "scratch/*"])
    files = {rel for rel, _ in more.files}
    assert {"catalog/parts/a.parquet", "scratch/big.tmp"} <= files and ".env" not in files


def test_the_packed_upload_holds_exactly_the_listed_files(tmp_path):
    root = _project(tmp_path)
    upload = plan_upload(root)
    with zipfile.ZipFile(pack_upload(upload, tmp_path / "w.zip")) as zf:
        assert sorted(zf.namelist()) == sorted(rel for rel, _ in upload.files)


def test_submit_dry_run_lists_the_upload_and_submits_nothing(tmp_path):
    root = _project(tmp_path)
    result = runner.invoke(app, ["submit", "--working-dir", str(root), "--dry-run", "--address",
                                 "http://127.0.0.1:9", "--", "cv", "--preset", "demo"])
    assert result.exit_code == 0, result.output
    assert "jobs/cv.py" in result.output and "uploading 5 files" in result.output
    assert "AWS_SECRET" not in result.output and "submitted job" not in result.output


# --------------------------------------------------------------------------- 5. weights-only checkpoints

class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoints_load_weights_only_and_refuse_pickled_code(tmp_path):
    good = tmp_path / "state.pt"
    torch.save({"best_model": {"w": torch.ones(2)}, "config": {"name": "x"}, "history": [{"epoch": 1}]}, good)
    assert torch.equal(load_state(good)["best_model"]["w"], torch.ones(2))
    bad = tmp_path / "evil.pt"
    torch.save({"best_model": {}, "config": _Payload()}, bad, pickle_module=pickle)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        load_state(bad)


def test_predict_refuses_a_checkpoint_that_would_run_code(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"config": _Payload(), "class_names": ["A"]}, ckpt / "state.pt")
    frames = tmp_path / "frames"
    frames.mkdir()
    result = runner.invoke(app, ["predict", "--model", str(ckpt), "--frames", str(frames),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "holds more than weights and plain data" in result.output


# --------------------------------------------------------------------------- 6. output folders

def test_output_folders_are_checked_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_dir(afile)
    with pytest.raises(ValueError, match=f"{afile} is a file"):
        check_output_dir(afile / "sub", "--out")
    with pytest.raises(ValueError, match="is not writable here"):
        check_output_dir("/proc/ipb-cannot-write-here")
    assert check_output_dir(tmp_path / "new" / "deep").is_dir()


@pytest.mark.parametrize("command", [["predict", "--model", "nowhere", "--frames", "."], ["report", "x"]])
def test_commands_name_a_bad_out_instead_of_a_traceback(tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = runner.invoke(app, [*command, "--out", str(afile)])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output
    result = runner.invoke(app, [*command, "--out", "/proc/ipb-out"])
    assert result.exit_code == 2 and "is not writable here" in result.output


# --------------------------------------------------------------------------- 8. label surprises

def test_label_warnings_name_typos_and_classes_rarer_than_folds():
    got = catalog.label_warnings({"Spread": 120, "Sprad": 3, "Dense": 50, "multi_label": 4, "unlabelled": 9}, 10)
    assert len(got) == 2
    assert "'Spread' (120 colonies) and 'Sprad' (3)" in got[0] and "--overwrite" in got[0]
    assert "'Sprad' has 3 labelled colonies, fewer than split.folds=10" in got[1]
    # real classes one letter apart and of a size, or clearly different names: no warning
    assert catalog.label_warnings({"microcyte": 700, "macrocyte": 900, "normal": 50, "abnormal": 60}, 5) == []
    assert len(catalog.label_warnings({"Dense": 50, "dense": 40}, 5)) == 1  # case alone always


@pytest.mark.parametrize("argv,hint", [(["preprocess", "--frames", "x"], "rerun the same command to resume"),
                                       (["tune", "--trials", "3"], "--resume"), (["--help"], None),
                                       (["config", "show"], None)])
def test_the_interrupt_hint_says_how_to_resume(argv, hint):
    got = interrupt_hint(argv)
    assert (got is None) if hint is None else (hint in got)


# --------------------------------------------------------------------------- on Ray, through the CLI

@pytest.mark.ray
def test_preprocess_takes_a_folder_with_a_hash_and_refuses_to_replace_a_catalog(tmp_path, ray_local):
    from worlds import make_frames

    a = make_frames(tmp_path / "plate #2", n_frames=2, seed=1)
    b = make_frames(tmp_path / "2024", n_frames=3, seed=2)
    out = tmp_path / "cat"
    common = ["--preset", "demo", "--out", str(out), "split.folds=2", "split.labelled_fraction=0.3"]
    first = runner.invoke(app, ["preprocess", *common, "--frames", str(a / "frames"),
                                "--annotations", str(a / "ann.csv")])
    assert first.exit_code == 0, first.output
    manifest = catalog.read_manifest(out)
    assert manifest["colonies"] == 8 and str(a / "frames") == manifest["inputs"]
    parts = sorted(p.name for p in (out / "parts").iterdir())
    again = runner.invoke(app, ["preprocess", *common, "--frames", str(b / "frames"),
                                "--annotations", str(b / "ann.csv")])
    assert again.exit_code == 2 and "--overwrite" in again.output and "Nothing was changed" in again.output
    assert sorted(p.name for p in (out / "parts").iterdir()) == parts
    assert catalog.read_manifest(out)["colonies"] == 8
    replaced = runner.invoke(app, ["preprocess", *common, "--frames", str(b / "frames"),
                                   "--annotations", str(b / "ann.csv"), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert catalog.read_manifest(out)["colonies"] == 12


def _ray_processes(temp_root: Path) -> list:
    """Processes of a Ray cluster whose temp root is ``temp_root`` (its own RAY_TMPDIR)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(temp_root) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _start_preprocess(tmp_path: Path, data: Path, name: str) -> tuple[subprocess.Popen, Path]:
    temp_root = Path(f"/tmp/ipb-{name}-{os.getpid()}")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_TMPDIR=str(temp_root))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ipb"), "preprocess", "--preset", "demo",
                             "--frames", str(data / "frames"), "--annotations", str(data / "ann.csv"),
                             "--out", str(tmp_path / name)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    return proc, temp_root


def _wait_for(check, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return False


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_a_killed_command_leaves_no_ray_behind(tmp_path):
    """Real signals to the console script, each run with a Ray cluster of its own (as a
    user runs it): Ctrl-C prints how to resume; after a SIGKILL of the command alone (the
    out-of-memory killer, `kill -9`), its Ray processes go away by themselves."""
    import signal

    from worlds import make_frames

    data = make_frames(tmp_path / "w", n_frames=40, seed=4)
    proc, first_root = _start_preprocess(tmp_path, data, "int")
    assert _wait_for(lambda: (tmp_path / "int" / catalog.BUILD_RECORD).exists(), 120)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted; rerun the same command to resume" in err, err[-2000:]

    proc, temp_root = _start_preprocess(tmp_path, data, "kill")
    assert _wait_for(lambda: len(_ray_processes(temp_root)) >= 3, 120), "its Ray cluster never came up"
    proc.kill()
    proc.wait(timeout=30)
    assert _wait_for(lambda: not _ray_processes(temp_root), 45), \
        f"left running: {sorted(p.name() for p in _ray_processes(temp_root))}"
    for root in (first_root, temp_root):
        shutil.rmtree(root, ignore_errors=True)
