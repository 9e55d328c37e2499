"""Supervised training of a fold on Ray Train: DDP on 2 CPU workers, and surviving a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ipb_ray.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def train_catalog(tmp_path_factory, ray_local):
    from worlds import make_frames

    from ipb_ray.distributed.preprocess import build_catalog

    root = make_frames(tmp_path_factory.mktemp("train"), n_frames=8, seed=21)
    cfg = _cfg(root)
    build_catalog(cfg)
    return root


def _overrides(root):
    return [f"data.frames={root / 'frames'}", f"data.annotations={root / 'ann.csv'}",
            f"data.catalog={root / 'catalog'}", f"tracking.storage_path={root / 'runs'}",
            "split.folds=3", "split.labelled_fraction=0.4", "method.name=supervised", "method.steps_per_epoch=4",
            "model.backbone=vgg_tiny", "data.global_patch=48", "data.local_patch=24", "method.batch_size=4",
            "resources.num_workers=1"]


def _cfg(root, *extra):
    return load_config(preset="demo", overrides=[*_overrides(root), *extra])


def test_two_worker_ddp_keeps_ranks_identical(train_catalog, tmp_path):
    from ipb_ray.distributed.training import train_fold

    cfg = _cfg(train_catalog, "name=ddp", "method.epochs=2", "resources.num_workers=2",
               "resources.cpus_per_worker=0.5", "method.steps_per_epoch=6")
    metrics = train_fold(cfg, 0, digest_dir=str(tmp_path))
    history = metrics["history"]
    # method.steps_per_epoch: exactly that many steps on every rank, whatever |L| is
    assert [h["train_steps"] for h in history] == [6, 6]
    assert history[1]["lr"] < history[0]["lr"] <= cfg.method.lr  # cosine decay per step
    # where a fold's time goes (benchmarks/fold_cost.py): every part of an epoch is timed
    assert history[0]["setup_seconds"] > 0 and "setup_seconds" not in history[1]
    assert all(h["bn_seconds"] > 0 and h["val_seconds"] > 0 for h in history)
    assert history[0]["report_seconds"] == 0 < history[1]["report_seconds"] and metrics["test_seconds"] > 0
    import torch

    from ipb_ray.data.catalog import normalisation

    state = torch.load(os.path.join(metrics["checkpoint"], "state.pt"), map_location="cpu", weights_only=False)
    mean, std = normalisation(cfg.data.catalog)
    assert 0 < std < 1 and float(state["best_model"]["normalise.mean"]) == pytest.approx(mean)
    assert float(state["best_model"]["normalise.std"]) == pytest.approx(std)
    digests = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    print("parameter digests per rank:", digests)
    assert digests[0] == digests[1] == metrics["param_digest"]
    assert metrics["world_size"] == 2 and metrics["epoch"] == 1
    report = metrics["test_report"]
    assert report["n"] > 0 and sum(map(sum, report["confusion_matrix"])) == report["n"]
    assert 0.0 <= metrics["test_balanced_accuracy"] <= 1.0
    assert os.path.exists(os.path.join(metrics["checkpoint"], "state.pt"))


def test_killed_worker_restarts_from_checkpoint(train_catalog):
    psutil = pytest.importorskip("psutil")
    args = [sys.executable, "-m", "ipb_ray.cli", "train", "--preset", "demo", "--fold", "1",
            *_overrides(train_catalog),
            "name=killed", "method.epochs=10", "resources.object_store_mb=100"]  # a window wide enough to kill in
    env = dict(os.environ, RAY_ADDRESS="", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="120")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    run_dir = train_catalog / "runs" / "killed-supervised-fold1"
    killed = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and killed is None and proc.poll() is None:
            # the snapshot is written once the controller has registered a checkpoint; a
            # checkpoint_* folder alone may still be on its way and not count yet
            if (run_dir / "checkpoint_manager_snapshot.json").exists():
                for child in psutil.Process(proc.pid).children(recursive=True):
                    if "RayTrainWorker" in " ".join(child.cmdline()):
                        child.send_signal(signal.SIGKILL)
                        killed = child.pid
                        break
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed is not None, "no training worker was found to kill"
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from the checkpoint of epoch" in out, out[-4000:]
    assert "confusion matrix" in out


def test_local_mode_keeps_its_own_checkpoints_and_resumes(train_catalog):
    """resources.num_workers=0 (Ray Train's local mode, the demo's): no controller persists
    checkpoints, so the loop writes them under the run's storage directory itself."""
    from ipb_ray.distributed.training import train_fold

    cfg = _cfg(train_catalog, "name=local", "method.epochs=2", "resources.num_workers=0")
    run = train_catalog / "runs" / "local-supervised-fold0"
    first = train_fold(cfg, 0)
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_000000", "checkpoint_000001"]
    assert first["checkpoint"] == str(run / "checkpoint_000001") and first["resumed_from_epoch"] == -1
    assert [h["epoch"] for h in first["history"]] == [0, 1] and first["test_report"]["n"] > 0
    more = train_fold(cfg.replace("method.epochs=3"), 0)  # the same run, one epoch more: resumes
    assert more["resumed_from_epoch"] == 1 and [h["epoch"] for h in more["history"]] == [0, 1, 2]
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_000001", "checkpoint_000002"]
    # the same seed under another run name: the same batches, so the same network
    # (Ray Data keeps block order: streams.patch_dataset sets preserve_order)
    twin = train_fold(_cfg(train_catalog, "name=local-twin", "method.epochs=2", "resources.num_workers=0"), 0)
    assert twin["param_digest"] == first["param_digest"]
    # eval.cache_mb: V and the BatchNorm stream are cut once (epoch 0) and kept; cutting them
    # again every epoch (cache_mb=0) gives the very same validations, network and test
    assert [h["eval_cuts"] for h in first["history"]] == [2, 0]
    cut = train_fold(_cfg(train_catalog, "name=local-cut", "method.epochs=2", "resources.num_workers=0",
                          "eval.cache_mb=0"), 0)
    assert [h["eval_cuts"] for h in cut["history"]] == [2, 2]
    assert [h["val_balanced_accuracy"] for h in cut["history"]] == [h["val_balanced_accuracy"]
                                                                    for h in first["history"]]
    assert cut["param_digest"] == first["param_digest"]
    assert cut["test_report"]["confusion_matrix"] == first["test_report"]["confusion_matrix"]
    with pytest.raises(ValueError, match="num_workers=0 .* local"):
        train_fold(cfg.replace("tracking.storage_path=s3://bucket/runs"), 0)


def test_eval_every_validates_every_nth_epoch_and_each_stages_last(train_catalog):
    """eval.every=2 on a 5-epoch run: V (and the BatchNorm re-estimate for it) at stage
    epochs 1, 3 and 4 (the last) only; the epochs between report the last objective (Tune's
    schedulers need one every epoch) and the best-on-V choice is among the validated ones."""
    from ipb_ray.distributed.training import train_fold

    out = train_fold(_cfg(train_catalog, "name=every", "method.epochs=5", "resources.num_workers=0",
                          "eval.every=2"), 0)
    hist = out["history"]
    assert [h["epoch"] for h in hist if "val_balanced_accuracy" in h] == [1, 3, 4]
    assert "objective" not in hist[0] and hist[2]["objective"] == hist[1]["val_balanced_accuracy"]
    assert all(h["objective"] == h["val_balanced_accuracy"] for h in hist if "val_balanced_accuracy" in h)
    assert {h["best_epoch"] for h in hist if "best_epoch" in h} <= {1, 3, 4}
    # epoch 0 cut nothing (no re-estimate, no V); epoch 1 cut the BatchNorm stream and V once
    assert [h["eval_cuts"] for h in hist] == [0, 2, 0, 0, 0]
    assert out["test_report"]["n"] > 0


def test_a_semi_supervised_run_never_returns_a_network_worse_on_v_than_its_supervised_start(train_catalog):
    """method.keep_start: the pre-trained teacher competes on V with the students. A student
    wrecked by an absurd learning rate is then not what the run returns; without the
    guard it is (the old behaviour, kept as keep_start=false)."""
    from ipb_ray.distributed.training import train_fold

    common = ("method.name=ipb", "method.teacher_epochs=4", "method.epochs=2", "method.finetune_epochs=0",
              "method.steps_per_epoch=10", "resources.num_workers=0", "method.mpl.student_lr=10",
              "method.mpl.student_init=scratch", "method.mpl.student_warmup_epochs=0")
    runs = {keep: train_fold(_cfg(train_catalog, f"name=guard-{keep}", f"method.keep_start={keep}",
                                  "method.mpl.select_teacher=false", *common), 0)
            for keep in ("true", "false")}
    for keep, out in runs.items():
        hist = out["history"]
        stage = {h["epoch"]: h["stage"] for h in hist}
        allowed = [h for h in hist if keep == "true" or h["stage"] == "mpl"]
        best = max(h["val_balanced_accuracy"] for h in allowed)
        chosen = [h["epoch"] for h in hist if "best_epoch" in h][-1]
        # the choice is the last epoch with the best V score among the epochs allowed to compete
        assert chosen == max(h["epoch"] for h in allowed if h["val_balanced_accuracy"] == best), (keep, hist)
        if keep == "false":
            assert stage[chosen] == "mpl"
    # both runs trained the same networks (same seeds); only the choice differs
    assert runs["true"]["param_digest"] == runs["false"]["param_digest"]

    # method.mpl.select_teacher: in the MPL stage the teacher competes too; the choice is the
    # best V score of either network there (ties go to the student, offered second)
    both = train_fold(_cfg(train_catalog, "name=guard-teacher", "method.keep_start=false", *common), 0)
    mpl = [h for h in both["history"] if h["stage"] == "mpl"]
    best = max(max(h["val_balanced_accuracy"], h["teacher_val_balanced_accuracy"]) for h in mpl)
    last = [h for h in mpl if "best_epoch" in h][-1]
    assert last["best_net"] in ("teacher", "student")
    score = last["val_balanced_accuracy"] if last["best_net"] == "student" else last["teacher_val_balanced_accuracy"]
    assert score == best

    # fine-tuning restarts selection from the choice so far; under the guard its networks
    # must beat that choice on V: the choice stays the last best V over every stage
    ft = train_fold(_cfg(train_catalog, "name=guard-ft", "method.keep_start=true", "method.mpl.select_teacher=false",
                         *common[:3], "method.finetune_epochs=1", "method.finetune_lr=10", *common[4:]), 0)
    hist = ft["history"]
    top = max(h["val_balanced_accuracy"] for h in hist)
    chosen = [h for h in hist if "best_epoch" in h][-1]
    assert chosen["epoch"] == max(h["epoch"] for h in hist if h["val_balanced_accuracy"] == top), hist
    kept = chosen["stage"] != "finetune"
    assert (ft["test_report"]["confusion_matrix"] == ft["pre_finetune_test_report"]["confusion_matrix"]) or not kept


def test_guard_posthoc_reads_the_guarded_choice_from_a_history():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "guard_posthoc", Path(__file__).resolve().parents[1] / "benchmarks" / "guard_posthoc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    h = [{"stage": "teacher", "val_balanced_accuracy": 0.4, "best_epoch": 0},
         {"stage": "mpl", "val_balanced_accuracy": 0.3, "teacher_val_balanced_accuracy": 0.5, "best_epoch": 1,
          "best_net": "teacher"},
         {"stage": "finetune", "val_balanced_accuracy": 0.45, "best_epoch": 2}]
    assert mod.fixed_choice(h) == "before"          # 0.45 < the MPL-stage teacher's 0.5
    h[2]["val_balanced_accuracy"] = 0.5
    assert mod.fixed_choice(h) == "finetune"        # ties go to the later network, as in the loop


def test_fold_cost_splits_a_fold_by_its_history_and_leaves_the_rest_to_train_startup():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "fold_cost", Path(__file__).resolve().parents[1] / "benchmarks" / "fold_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    history = [{"setup_seconds": 2.0, "train_seconds": 10.0, "data_wait_fraction": 0.1, "train_steps": 25,
                "bn_seconds": 0.5, "val_seconds": 1.0, "report_seconds": 0.0},
               {"train_seconds": 20.0, "data_wait_fraction": 0.5, "train_steps": 25, "mask_rate": 0.2, "global_step": 50,
                "plan_seconds": 3.0, "prefetch_seconds": 1.0, "bn_seconds": 0.5, "val_seconds": 1.0,
                "report_seconds": 0.4}]
    parts = mod.split_fold(history, {"test_seconds": 1.5}, wall=50.0)
    assert parts["data_wait"] == pytest.approx(11.0) and parts["optimizer_steps"] == pytest.approx(19.0)
    assert parts["labelling"] == 4.0 and parts["validation"] == 2.0 and parts["bn_recalibration"] == 1.0
    assert parts["reports"] == pytest.approx(0.8)  # the earlier report, and the last one at their mean
    assert parts["train_startup"] == pytest.approx(50.0 - 19.0 - 11.0 - 4.0 - 2.0 - 1.0 - 1.5 - 0.8 - 2.0)
    assert sum(parts.values()) == pytest.approx(50.0)
    assert mod.steps_per_second(history) == pytest.approx(2.5)  # the labelled epoch only
    assert mod.steps_per_second(history, labelled_only=False) == pytest.approx(50 / 30)
