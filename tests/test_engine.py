"""The training engine without Ray: every stage of every registered method and balancer
in a process where `import ray` fails, and the in-process runner against Ray Train's
local mode on the same fold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ipb_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]

TINY = ["model.backbone=vgg_tiny", "data.global_patch=48", "data.local_patch=24", "method.batch_size=4",
        "method.unlabelled_batch_size=4", "method.steps_per_epoch=2", "method.epochs=1", "method.teacher_epochs=1",
        "method.finetune_epochs=1", "eval.bn_batches=2", "resources.num_workers=0", "resources.torch_threads=1"]


def _cfg(catalog: str, runs: Path, *extra: str):
    return load_config(preset="demo", overrides=[f"data.catalog={catalog}", f"tracking.storage_path={runs}",
                                                 *TINY, *extra])


def _runs() -> list[tuple[str, list[str]]]:
    """Every registered method with its own balancer, and every balancer on a method that
    can take it (pseudo-labelling ones for the label-reading balancers)."""
    from ipb_ray.methods import get_method, list_balancers, list_methods

    runs = [(m, [f"method.name={m}"]) for m in list_methods()]
    for b in list_balancers():
        host = "fixmatch" if b != "none" else "mpl"
        assert get_method(host).semi_supervised
        runs.append((f"{host}+{b}", [f"method.name={host}", f"method.balancer={b}"]))
    return runs


SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["ray"] = None  # `import ray` (and any ray.*) now raises ImportError
    from ipb_ray.config import load_config
    from ipb_ray.engine.inprocess import train_fold_in_process
    from ipb_ray.methods import get_method

    out = {}
    for name, overrides in json.loads(sys.argv[1]):
        cfg = load_config(preset="demo", overrides=overrides + [f"name=eng-{name.replace('+', '-')}"])
        metrics = train_fold_in_process(cfg, 0)
        out[name] = {"stages": sorted({h["stage"] for h in metrics["history"]}),
                     "planned": sorted(s.name for s in get_method(cfg.method.name).stages(cfg) if s.epochs),
                     "test": metrics["test_balanced_accuracy"], "epochs": len(metrics["history"]),
                     "pseudo": any("pseudo_tpr_" + n in h for h in metrics["history"] for n in cfg.data.class_names or [])}
    out["ray_loaded"] = sorted(k for k, v in sys.modules.items() if v is not None and k.split(".")[0] == "ray")
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_every_stage_of_every_method_and_balancer_runs_in_process_without_ray(tiny_catalog, tmp_path):
    base = [f"data.catalog={tiny_catalog}", f"tracking.storage_path={tmp_path / 'runs'}", *TINY]
    runs = [(name, base + extra) for name, extra in _runs()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(runs)], capture_output=True, text=True,
                          env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert out.pop("ray_loaded") == []
    assert set(out) == {name for name, _ in runs}
    for name, res in out.items():
        assert res["stages"] == res["planned"], (name, res)  # every planned stage ran
        assert 0.0 <= res["test"] <= 1.0, (name, res)
    assert {"teacher", "mpl", "finetune"} <= set(out["ipb"]["stages"])


@pytest.mark.ray
@pytest.mark.slow
def test_in_process_runner_matches_ray_train_local_mode_on_the_same_fold(tiny_catalog, tmp_path):
    """The same fold, the same patches, the same steps: Ray Train's local mode (patches cut
    by Ray Data tasks, the labelling pass on Ray Data) and the in-process runner end with
    the same weights and the same test figures, for a supervised run and for IPB."""
    from ipb_ray.distributed.training import train_fold
    from ipb_ray.engine.inprocess import train_fold_in_process

    for method in ("supervised", "ipb"):
        extra = (f"method.name={method}", "method.epochs=2")
        ray_run = train_fold(_cfg(tiny_catalog, tmp_path / "ray", *extra, "resources.runner=ray_train"), 0)
        mine = train_fold_in_process(_cfg(tiny_catalog, tmp_path / "mine", *extra), 0)
        assert mine["param_digest"] == ray_run["param_digest"], method
        assert mine["test_report"]["confusion_matrix"] == ray_run["test_report"]["confusion_matrix"], method
        assert [h["stage"] for h in mine["history"]] == [h["stage"] for h in ray_run["history"]]
        assert Path(mine["checkpoint"]).parent == tmp_path / "mine" / f"demo-{method}-fold0"


@pytest.mark.ray
def test_in_process_runner_resumes_and_refuses_remote_storage(tiny_catalog, tmp_path):
    from ipb_ray.engine.inprocess import train_fold_in_process

    first = train_fold_in_process(_cfg(tiny_catalog, tmp_path, "method.epochs=1", "name=res"), 0)
    more = train_fold_in_process(_cfg(tiny_catalog, tmp_path, "method.epochs=2", "name=res"), 0)
    n = len(first["history"])
    assert first["resumed_from_epoch"] == -1 and more["resumed_from_epoch"] == n - 1  # resumed, not retrained
    assert [h["epoch"] for h in more["history"]] == list(range(n + 1))
    assert more["history"][:n] == first["history"]
    with pytest.raises(ValueError, match="tracking.storage_path='s3://b/x' is remote"):
        train_fold_in_process(_cfg(tiny_catalog, tmp_path, "tracking.storage_path=s3://b/x"), 0)


def test_the_engine_reads_in_small_pieces_and_the_old_loop_is_gone():
    """No class in the engine over 150 lines, no function over 60; no `_Loop`, no dict of
    `spec_*` keys anywhere in the package."""
    import ast

    too_long = []
    for path in sorted((ROOT / "ipb_ray" / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = 150 if isinstance(node, ast.ClassDef) else 60 if isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not too_long, too_long
    for path in (ROOT / "ipb_ray").rglob("*.py"):
        text = path.read_text()
        assert "class _Loop" not in text, path
        assert not any(f'"spec_{s}"' in text for s in ("train", "eval", "plain", "uda", "label")), path


def test_who_runs_a_fold_and_whether_it_starts_ray(monkeypatch):
    from ipb_ray.config import ConfigError
    from ipb_ray.distributed.training import needs_ray, runs_in_process

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = load_config(preset="demo", overrides=["resources.num_workers=0"])
    assert runs_in_process(local) and not needs_ray(local)  # a laptop fold starts no cluster
    assert not runs_in_process(local, callbacks=[object()])  # a Tune trial reports through Ray Train
    assert needs_ray(local.replace("resources.address=ray://head:10001"))  # a named cluster: paths checked there
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # inside a Ray job
    assert needs_ray(local)
    assert not runs_in_process(local.replace("resources.runner=ray_train"))
    with pytest.raises(ValueError, match="resources.runner=in_process cannot report to Ray Tune"):
        runs_in_process(local.replace("resources.runner=in_process"), callbacks=[object()])
    assert not runs_in_process(load_config(preset="demo", overrides=["resources.num_workers=2"]))
    with pytest.raises(ConfigError, match="resources.runner: in_process runs one rank in this process; "
                                          "resources.num_workers=2"):
        load_config(preset="demo", overrides=["resources.num_workers=2", "resources.runner=in_process"])


@pytest.mark.ray
def test_validation_test_and_labelling_predict_in_eval_batches_with_the_same_answers(tiny_catalog, tmp_path,
                                                                                    monkeypatch):
    """``eval.batch_size`` sets the forward passes of V, T and the labelling pass (the BN
    stream keeps the training batch); eval mode makes the predictions independent of it."""
    from ipb_ray.engine import inprocess

    sizes: dict[str, set[int]] = {}

    class Recording(inprocess.MemoryPatches):
        def rows(self, spec, plan, epoch, batch_size, drop_last=True):
            sizes.setdefault(spec.mode, set()).add(batch_size)
            return super().rows(spec, plan, epoch, batch_size, drop_last)

    monkeypatch.setattr(inprocess, "MemoryPatches", Recording)
    out = {}
    for bs in (3, 64):
        sizes.clear()
        cfg = _cfg(tiny_catalog, tmp_path / f"b{bs}", "method.name=ipb", f"eval.batch_size={bs}", "method.epochs=1")
        out[bs] = inprocess.train_fold_in_process(cfg, 0)
        assert sizes["test"] == {bs} and sizes["label"] == {bs}, sizes
        assert 4 in sizes["plain"], sizes  # the BN stream: method.batch_size
    assert out[3]["test_report"]["confusion_matrix"] == out[64]["test_report"]["confusion_matrix"]
    assert out[3]["param_digest"] == out[64]["param_digest"]


@pytest.mark.ray
def test_crops_decoded_on_threads_are_the_crops_decoded_one_group_at_a_time(tiny_catalog):
    import numpy as np

    from ipb_ray.patches.crops import read_crops

    one, three = read_crops(tiny_catalog, threads=1), read_crops(tiny_catalog, threads=3)
    assert list(one.ids) == list(three.ids) and len(one.ids) > 3
    for cid in one.ids:
        (a, ma), (b, mb) = one.crop(cid), three.crop(cid)
        assert np.array_equal(a, b) and np.array_equal(ma, mb)
        assert one.labels[cid] == three.labels[cid]


def test_eval_batch_zero_is_the_training_batch():
    from ipb_ray.engine.fold import eval_batch

    assert eval_batch(load_config(preset="demo", overrides=["method.batch_size=12"])) == 12  # the default, 0
    assert eval_batch(load_config(preset="demo", overrides=["method.batch_size=12", "eval.batch_size=96"])) == 96
