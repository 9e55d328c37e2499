"""IPB and MPL on a local Ray cluster: 2 DDP workers, the balanced student stream, reuse,
resume from a checkpoint, and plain MPL."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ipb_ray.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """A small synthetic world (the paper's imbalanced class mix) and its catalog."""
    from ipb_ray.data import synth
    from ipb_ray.distributed.preprocess import build_catalog

    root = tmp_path_factory.mktemp("ipb")
    synth.write_world(synth.SynthConfig(frames=6, frame_size=768, colonies_per_frame=20, colony_scale=0.35,
                                        seed=3, image_format="png"), root / "world")
    build_catalog(_cfg(root))
    return root


def _cfg(root, *extra):
    return load_config(preset="demo", overrides=[
        f"data.frames={root / 'world'}", "data.annotations=null", f"data.catalog={root / 'catalog'}",
        f"tracking.storage_path={root / 'runs'}", "split.folds=3", "split.labelled_fraction=0.3",
        "data.global_patch=48", "data.local_patch=24", "model.backbone=patch_stats", "model.feature_dim=16",
        "method.batch_size=8", "method.unlabelled_batch_size=8", "method.teacher_epochs=3", "method.epochs=3",
        "method.steps_per_epoch=null", "method.finetune_epochs=0", *extra])


def _classes(h):
    return [k.split("/", 1)[1] for k in h if k.startswith("unlabelled_true_share/")]


def test_ipb_two_workers_balance_the_student_stream(world, tmp_path):
    import torch

    from ipb_ray.distributed.training import train_fold
    from ipb_ray.nn.checkpoint import CHECKPOINT_FILE

    cfg = _cfg(world, "name=ipb2", "method.draws_per_epoch=160", "resources.num_workers=2",
               "resources.cpus_per_worker=0.5", "method.mpl.student_init=scratch",
               "method.pseudo_balance.alpha=1", "method.pseudo_balance.max_copies=0")  # the paper's balanced draw
    metrics = train_fold(cfg, 0, digest_dir=str(tmp_path))
    history = metrics["history"]
    assert [h["stage"] for h in history] == ["teacher"] * 3 + ["mpl"] * 3
    names = _classes(history[-1])
    raw = np.array([history[-1][f"unlabelled_true_share/{c}"] for c in names])
    print("raw unlabelled shares by hidden class:", dict(zip(names, raw.round(3))))
    assert raw.max() - 1 / len(names) > 0.15  # the unlabelled set itself is far from balanced
    balanced_epochs = 0
    for h in history[3:]:
        stream = np.array([h[f"stream_share/{c}"] for c in names])
        teacher = np.array([h[f"teacher_proportion/{c}"] for c in names])
        weights = np.array([h[f"sampling_weight/{c}"] for c in names])
        print(f"epoch {h['epoch']}: teacher {teacher.round(3)} weights {weights.round(3)} stream {stream.round(3)}")
        assert teacher.sum() == pytest.approx(1) and weights.sum() == pytest.approx(1)
        present = teacher > 0
        assert np.all(stream[~present] == 0)  # a class nobody was labelled with is never drawn
        assert np.all(np.abs(stream[present] - 1 / present.sum()) < 0.15), (stream, teacher)
        balanced_epochs += present.sum() >= 2
        assert h["label_seconds"] > 0 and h["unlabelled_draws"] == 160 and h["train_steps"] == 10
        assert 0 <= h["val_balanced_accuracy"] <= 1 and 0 <= h["teacher_val_balanced_accuracy"] <= 1
        assert np.isfinite(h["teacher_loss"]) and h["train_loss"] == h["student_loss"]
        assert {f"pseudo_tpr/{c}" for c in names} <= set(h) and 0 <= h["pseudo_accuracy"] <= 1
    assert balanced_epochs >= 1, "the teacher labelled every patch with one class in every epoch"
    # DDP: both ranks end with the same student
    digests = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1] == metrics["param_digest"]
    assert metrics["teacher_param_digest"] != metrics["param_digest"]  # student_init=scratch: its own network
    report = metrics["test_report"]
    assert report["n"] > 0 and sum(map(sum, report["confusion_matrix"])) == report["n"]
    state = torch.load(os.path.join(metrics["checkpoint"], CHECKPOINT_FILE), weights_only=False)
    assert {"networks", "optimizers", "balancer", "global_step", "best_model", "history"} <= set(state)
    assert set(state["networks"]) == set(state["optimizers"]) == {"teacher", "student"}  # method.mpl.ema=0
    assert state["epoch"] == 5 and len(state["balancer"]["table"]["colony_id"]) > 0
    _every_key_is_documented(history, "ipb")
    # one global step count over every stage: the pre-training steps of each worker, then 3 x 10 MPL steps
    assert state["global_step"] == sum(h["train_steps"] for h in history) == 3 * history[0]["train_steps"] + 30


def test_ipb_reuse_labels_survive_a_resume(world):
    from ipb_ray.distributed.training import train_fold

    first = train_fold(_cfg(world, "name=reuse", "method.pseudo_balance.relabel=reuse", "method.teacher_epochs=1",
                            "method.epochs=1", "resources.num_workers=0"), 0)
    assert first["history"][-1]["label_seconds"] > 0  # the first MPL epoch runs the labelling pass
    # one more epoch on the same run: it resumes from the checkpoint and reuses the stored labels
    more = train_fold(_cfg(world, "name=reuse", "method.pseudo_balance.relabel=reuse", "method.teacher_epochs=1",
                           "method.epochs=2", "resources.num_workers=0"), 0)
    assert more["resumed_from_epoch"] == 1
    h = more["history"]
    assert [x["epoch"] for x in h] == [0, 1, 2]
    assert h[2]["label_seconds"] == 0 and h[2]["stage"] == "mpl" and h[2]["stage_epoch"] == 1
    names = _classes(h[2])
    assert sum(h[2][f"stream_share/{c}"] for c in names) == pytest.approx(1)


def test_plain_mpl_streams_the_unlabelled_set_as_it_is_and_the_student_can_start_as_the_teacher(world):
    from ipb_ray.distributed.training import train_fold

    # lr 0 in the MPL phase: both networks end as they started it, so equal digests mean
    # the student was copied from the pre-trained teacher (method.mpl.student_init=teacher)
    metrics = train_fold(_cfg(world, "name=mpl", "method.name=mpl", "method.teacher_epochs=1",
                              "method.epochs=1", "method.mpl.student_init=teacher", "method.mpl.teacher_lr=0",
                              "method.mpl.student_lr=0", "method.mpl.student_warmup_lr=0", "resources.num_workers=0"), 0)
    assert metrics["param_digest"] == metrics["teacher_param_digest"]
    h = metrics["history"][-1]
    names = _classes(h)
    assert "label_seconds" not in h and not any(k.startswith(("stream_share/", "teacher_proportion/")) for k in h)
    for c in names:  # every colony once (up to the last partial batch): the raw class mix
        assert abs(h[f"stream_true_share/{c}"] - h[f"unlabelled_true_share/{c}"]) < 0.1
    assert sum(h[f"step_pseudo_share/{c}"] for c in names) == pytest.approx(1)
    assert metrics["test_report"]["n"] > 0


def test_finetuning_stage_trains_the_selected_student_on_l_keeps_both_results_and_resumes(world):
    import torch

    from ipb_ray.distributed.training import train_fold
    from ipb_ray.nn.checkpoint import CHECKPOINT_FILE

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    base = ("name=ft", "method.name=ipb", "method.teacher_epochs=1", "method.epochs=1", "method.finetune_lr=0.01",
            "method.steps_per_epoch=3", "resources.num_workers=0",
            "method.keep_start=false")  # the restart itself; the guard across it: test_training.py
    first = train_fold(_cfg(world, *base, "method.finetune_epochs=2"), 0)
    assert [h["stage"] for h in first["history"]] == ["teacher", "mpl", "finetune", "finetune"]
    for h in first["history"][2:]:
        assert h["train_steps"] == 3 and np.isfinite(h["train_loss"])
        assert 0 < h["lr"] <= 0.01 and 0 <= h["val_balanced_accuracy"] <= 1
        assert "teacher_proportion/" not in " ".join(h)  # no labelling pass while fine-tuning
    for key in ("test_report", "pre_finetune_test_report"):
        assert first[key]["n"] == first["test_report"]["n"] > 0
    state = torch.load(os.path.join(first["checkpoint"], CHECKPOINT_FILE), weights_only=False)
    assert state["stage"] == "finetune" and "finetune" in state["optimizers"]
    # the fine-tuned choice is not the MPL stage's student any more
    assert not same(state["best_model"], state["earlier_best"]["finetune"])
    # one fine-tuning epoch more: the run resumes inside the stage, from the same MPL student
    more = train_fold(_cfg(world, *base, "method.finetune_epochs=3"), 0)
    assert more["resumed_from_epoch"] == 3
    assert [h["stage"] for h in more["history"]] == ["teacher", "mpl", "finetune", "finetune", "finetune"]
    again = torch.load(os.path.join(more["checkpoint"], CHECKPOINT_FILE), weights_only=False)
    assert same(again["earlier_best"]["finetune"], state["earlier_best"]["finetune"])
    assert more["pre_finetune_test_report"]["confusion_matrix"] == first["pre_finetune_test_report"]["confusion_matrix"]
    # the same command again finds the finished run and tests the same students
    again = train_fold(_cfg(world, *base, "method.finetune_epochs=3"), 0)
    assert again["resumed_from_epoch"] == 4 and again["param_digest"] == more["param_digest"]
    for key in ("test_report", "pre_finetune_test_report"):
        assert again[key]["confusion_matrix"] == more[key]["confusion_matrix"]


def test_too_few_unlabelled_colonies_for_a_batch_is_refused_with_the_fix(world):
    from ipb_ray.distributed.training import train_fold

    with pytest.raises(ValueError, match="lower method.unlabelled_batch_size or raise method.draws_per_epoch"):
        train_fold(_cfg(world, "name=small", "method.unlabelled_batch_size=4096"), 0)


def test_multi_label_switch_keeps_multi_label_colonies_out_of_u(world):
    from ipb_ray.data import catalog
    from ipb_ray.engine.fold import fold_inputs

    with_ml = fold_inputs(_cfg(world), 0)
    without = fold_inputs(_cfg(world, "data.multi_label=false"), 0)
    table = catalog.read_catalog(str(world / "catalog"), columns=["colony_id", "multi_label"])
    multi = {c for c, f in zip(table.column("colony_id").to_pylist(), table.column("multi_label").to_pylist()) if f}
    assert multi & set(with_ml.unlabelled)  # the synthetic world has multi-label colonies, in U by default
    assert not multi & set(without.unlabelled)
    assert set(without.unlabelled) == set(with_ml.unlabelled) - multi
    assert without.labelled == with_ml.labelled and without.test == with_ml.test


def test_fold_inputs_hand_workers_an_absolute_catalog_path(world, monkeypatch):
    from ipb_ray.engine.fold import fold_inputs

    monkeypatch.chdir(world)
    inputs = fold_inputs(_cfg(world, "data.catalog=catalog"), 0)  # relative, as in the demo
    assert os.path.isabs(inputs.catalog) and inputs.catalog == str(world / "catalog")


def test_a_checkpoint_of_the_old_layout_is_refused_with_a_message(world):
    import torch

    from ipb_ray.distributed.training import train_fold
    from ipb_ray.engine.fold import local_run_storage
    from ipb_ray.nn.checkpoint import CHECKPOINT_FILE

    cfg = _cfg(world, "name=oldlayout", "method.teacher_epochs=1", "method.epochs=1", "resources.num_workers=0")
    old = os.path.join(local_run_storage(cfg, 0), "checkpoint_000000")
    os.makedirs(old)
    torch.save({"epoch": 0, "teacher": {}, "student": {}, "t_opt": {}, "s_opt": {}, "global_step": 3},
               os.path.join(old, CHECKPOINT_FILE))
    with pytest.raises(ValueError, match="written by an older ipb-ray.*another run name"):
        train_fold(cfg, 0)


def _every_key_is_documented(history, method):
    """docs/methods.md lists the history schema; a key a run records but the page does not
    name is drift."""
    import re
    from pathlib import Path

    from ipb_ray.methods import get_method

    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    named = set(re.findall(r"`([a-z_<>/]+)`", text))
    own = set(get_method(method).step_metrics)
    missing = sorted({k for row in history for k in row
                      if (k.split("/")[0] + "/<c>" if "/" in k else k) not in named and k not in own})
    assert not missing, f"history keys not in docs/methods.md: {missing}"
