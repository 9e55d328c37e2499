"""The method and balancer registries (ipb_ray.methods): every registered method, one real
torch step on a tiny batch, no Ray. A method added with @register_method is covered here
without a new test of its own."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ipb_ray.config import ConfigError, load_config
from ipb_ray.methods import (
    Method,
    Stage,
    get_balancer,
    get_method,
    list_balancers,
    list_methods,
    register_method,
    total_epochs,
)

NAMES = ("Debris", "Dense", "Diff", "Spread")


def _cfg(method: str, *extra: str):
    return load_config(preset="demo", overrides=[
        f"method.name={method}", "data.global_patch=32", "data.local_patch=16", "model.backbone=patch_stats",
        "model.feature_dim=8", "method.batch_size=6", "method.unlabelled_batch_size=8", "method.teacher_epochs=1",
        "method.epochs=2", "method.mpl.uda_steps=1", "method.mpl.threshold=0.0",
        "method.pseudo_label.ramp_steps=1", "method.pseudo_label.threshold=0.0", *extra])


def _ctx(cfg, device="cpu", amp=False):
    """The loop's context on this process: rank 0 of 1, networks not DDP-wrapped."""
    import torch

    from ipb_ray.config import to_dict
    from ipb_ray.engine.context import LoopContext
    from ipb_ray.engine.fold import FoldInputs, FoldRun, Streams
    from ipb_ray.engine.ports import SingleProcess
    from ipb_ray.patches.core import StreamSpec
    from ipb_ray.patches.geometry import PatchGeometry

    inputs = FoldInputs(catalog="unused", class_names=NAMES, labelled=("a",), labelled_labels=(0,), validation=(),
                        test=(), unlabelled=("u",), pixel_mean=0.4, pixel_std=0.2)
    geometry = PatchGeometry(cfg.data.global_patch, (cfg.data.global_patch, cfg.data.local_patch))
    specs = Streams(train=StreamSpec(geometry, NAMES, mode="train"), eval=StreamSpec(geometry, NAMES, mode="test"),
                    plain=StreamSpec(geometry, NAMES, mode="plain"), uda=StreamSpec(geometry, NAMES, mode="uda"))
    dev = torch.device(device)
    return LoopContext(cfg, FoldRun(to_dict(cfg), inputs, specs), SingleProcess(), dev, amp,
                       prepare=lambda net: net.to(dev))


def _batch(columns, n, seed, labels=True):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {c: torch.rand(n, 1, int(c.lstrip("xweakstrong")), int(c.lstrip("xweakstrong")), generator=g)
           for c in columns}
    if labels:
        out["label"] = torch.arange(n) % len(NAMES)
    out["colony_id"] = [f"c{seed}-{i}" for i in range(n)]
    return out


def _weights(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}


def test_the_shipped_methods_and_balancers_are_registered_in_order():
    assert list_methods()[:4] == ["supervised", "mpl", "ipb", "pseudo_label"]
    assert list_balancers()[:2] == ["none", "pseudo_balance"]
    assert get_method("ipb").default_balancer == "pseudo_balance" and get_method("mpl").default_balancer == "none"
    assert [get_method(n).baseline for n in list_methods()].count(True) == 1


@pytest.mark.parametrize("name", list_methods())
def test_every_method_plans_its_stages_builds_and_one_step_of_each_stage_learns(name):
    _one_step_of_each_stage(name)


def test_the_method_added_in_docs_methods_md_registers_and_learns():
    import re

    from ipb_ray.methods import METHODS

    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    code = re.search(r"## Adding a method.*?```python\n(.*?)```", text, re.S).group(1)
    try:
        exec(compile(code, "docs/methods.md", "exec"), {})
        assert "entropy_min" in list_methods()
        cfg = load_config(preset="demo", overrides=["method.name=entropy_min", "method.balancer=pseudo_balance",
                                                    "method.entropy_min.weight=0.5"])
        assert cfg.method.name == "entropy_min" and cfg.method.entropy_min.weight == 0.5
        assert "entropy_min.weight" in METHODS.get("entropy_min").keys(cfg)  # so `ipb tune` may search it
        with pytest.raises(ConfigError, match=r"method\.entropy_min\.weight: -1.0 is out of range"):
            load_config(preset="demo", overrides=["method.name=entropy_min", "method.entropy_min.weight=-1"])
        _one_step_of_each_stage("entropy_min")
    finally:
        METHODS.remove("entropy_min")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list_methods())
def test_every_method_steps_on_a_gpu_under_bf16_autocast(name):
    _one_step_of_each_stage(name, device="cuda", amp=True)


def _one_step_of_each_stage(name, device="cpu", amp=False):
    import torch

    cls = get_method(name)
    cfg = _cfg(name, "method.finetune_epochs=1" if cls.semi_supervised else "method.finetune_epochs=0")
    stages = cls.stages(cfg)
    assert stages and len({s.name for s in stages}) == len(stages)
    assert sum(s.epochs for s in stages) == total_epochs(cfg)
    assert any(s.unlabelled for s in stages) == cls.semi_supervised
    assert all(isinstance(s, Stage) and s.epochs > 0 for s in stages)
    ctx = _ctx(cfg, device, amp)
    method = cls(cfg, ctx)
    method.build()
    for s in stages:
        assert s.net in method.nets, (name, s)
        assert s.unlabelled or s.optimizer in method.opts, (name, s)
        assert all(v in method.nets for v in s.also_validate)
    if cls.semi_supervised:
        assert cls.labeller in method.nets and cls.loss_metric in cls.step_metrics
    for s in stages:
        method.begin_stage(s)
        net = method.nets[s.net]
        before = _weights(net)
        if s.unlabelled:
            torch.manual_seed(0)
            out = method.train_step(s, _batch(ctx.columns, 6, 1), _batch(ctx.weak_columns + ctx.strong_columns, 8, 2,
                                                                        labels=False),
                                    step=5, lr_factor=1.0, stage_epoch=1)
            assert set(cls.step_metrics) <= set(out), (name, sorted(out))
            assert all(math.isfinite(out[k]) for k in cls.step_metrics), out
            labels = out.get("pseudo_labels", [])
            assert len(labels) in (0, 8) and all(0 <= p < len(NAMES) for p in labels)
            assert all(math.isfinite(v) for v in method.epoch_metrics(s).values() if isinstance(v, float))
        else:  # a labelled stage: the loop's supervised epoch steps s.optimizer; here one step of it
            batch = _batch(ctx.columns, 6, 3)
            opt = method.opts[s.optimizer]
            for group in opt.param_groups:
                group["lr"] = s.lr
            with ctx.autocast():
                logits = net(*ctx.tensors(batch, ctx.columns))
            loss = torch.nn.functional.cross_entropy((logits[0] if isinstance(logits, tuple) else logits).float(),
                                                     ctx.labels(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = _weights(net)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed, f"{name}: stage {s.name!r} left {s.net} unchanged"
        assert all(torch.isfinite(v).all() for v in after.values()), f"{name}: NaN in {s.net} after {s.name!r}"
    method.load_state_dict(method.state_dict())


def test_register_method_refuses_a_taken_name_and_a_non_method():
    with pytest.raises(ValueError, match="already registered"):
        @register_method("ipb")
        class Again(Method):
            pass
    with pytest.raises(TypeError, match="subclass of ipb_ray.methods.base.Method"):
        register_method("thing")(object)
    assert "thing" not in list_methods()


def test_unknown_method_and_balancer_names_say_what_exists():
    with pytest.raises(ValueError, match=r"did you mean 'pseudo_label'.*registered: supervised, mpl, ipb"):
        get_method("pseudolabel")
    with pytest.raises(ValueError, match="registered: none, pseudo_balance"):
        get_balancer("crest")
    with pytest.raises(ValueError, match="did you mean 'pseudo_balance'"):
        get_balancer("pseudo_balanced")


@pytest.mark.parametrize("overrides, words", [
    (["method.name=mean_teacher"], ["method.name", "registered", "supervised"]),
    (["method.name=ipbb"], ["did you mean 'ipb'"]),
    (["method.name=supervised", "method.balancer=pseudo_balance"], ["method.balancer", "semi-supervised"]),
    (["method.name=mpl", "method.balancer=darp"], ["method.balancer", "pseudo_balance"]),
])
def test_config_refuses_bad_method_and_balancer_names_with_the_choices(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(preset="demo", overrides=overrides)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_any_pseudo_labelling_method_composes_with_the_pseudo_balancer():
    cfg = load_config(preset="demo", overrides=["method.name=pseudo_label", "method.balancer=pseudo_balance"])
    assert get_method("pseudo_label").balancer_name(cfg) == "pseudo_balance"
    assert get_method("mpl").balancer_name(load_config(preset="demo", overrides=["method.name=mpl"])) == "none"


def test_the_methods_package_imports_without_torch_or_ray():
    import subprocess
    import sys

    code = ("import sys, ipb_ray.methods, ipb_ray.config; "
            "bad = [m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_uniform_draw_plans_every_unlabelled_colony_once_per_epoch():
    from types import SimpleNamespace

    cfg = load_config(preset="demo", overrides=["method.name=mpl"])
    ids = tuple(f"u{i}" for i in range(50))
    ctx = SimpleNamespace(cfg=cfg, inputs=SimpleNamespace(unlabelled=ids, class_names=NAMES), rank=0, world=1)
    draw = get_balancer("none")(cfg, ctx)
    plan, figures = draw.plan(0, 40, None)
    again, _ = draw.plan(0, 40, None)
    assert sum(plan.counts.values()) >= 40 and set(plan.counts) <= set(ids)
    assert plan.counts == again.counts  # seeded by (seed, epoch)
    assert np.isfinite(list(figures.values())).all() if figures else True


def test_ipb_config_methods_lists_every_method_with_its_stages_under_the_config():
    from typer.testing import CliRunner

    from ipb_ray.cli import app

    out = CliRunner().invoke(app, ["config", "methods", "method.teacher_epochs=0", "method.finetune_epochs=2"],
                             env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    for name in list_methods():
        assert name in out.output
    assert "teacher (" not in out.output  # teacher_epochs=0: no pre-training stage
    assert "finetune (2)" in out.output and "balancer pseudo_balance" in out.output
    bad = CliRunner().invoke(app, ["config", "methods", "method.name=nope"])
    assert bad.exit_code == 2 and "not a registered method" in bad.output


def test_an_unlabelled_stream_without_a_full_batch_is_refused_with_the_keys_to_change():
    from ipb_ray.engine.fold import unlabelled_steps

    m = load_config(preset="demo", overrides=["method.steps_per_epoch=null", "method.unlabelled_batch_size=16"]).method
    assert unlabelled_steps(100, 2, m) == 3  # 100 draws: 3 full batches of 16 for each of 2 workers
    with pytest.raises(ValueError, match="20 unlabelled patches.*less than one batch.*unlabelled_batch_size=16.*"
                                         "2 worker.*draws_per_epoch"):
        unlabelled_steps(20, 2, m)


@pytest.mark.parametrize("name", [n for n in list_methods()
                                  if get_method(n).semi_supervised and get_method(n).pseudo_labelling])
def test_every_pseudo_labelling_method_takes_its_labels_through_the_balancers_adjustment(name):
    """logit_adjust composes with every method that makes pseudo-labels: one step moves its prior."""
    import torch

    cfg = _cfg(name, "method.balancer=logit_adjust", "method.logit_adjust.momentum=0.5")
    ctx = _ctx(cfg)
    method = get_method(name)(cfg, ctx)
    method.build()
    method.balancer = get_balancer("logit_adjust")(cfg, ctx)  # what the loop does on every rank
    stage = next(s for s in method.stages(cfg) if s.unlabelled)
    method.begin_stage(stage)
    torch.manual_seed(0)
    out = method.train_step(stage, _batch(ctx.columns, 6, 1), _batch(ctx.weak_columns + ctx.strong_columns, 8, 2,
                                                                     labels=False), step=1, lr_factor=1.0, stage_epoch=0)
    prior = method.balancer.prior
    assert prior is not None and prior.sum().item() == pytest.approx(1.0)
    assert not torch.allclose(prior, torch.full_like(prior, 1 / len(NAMES))), "the method never called adjust"
    assert len(out["pseudo_labels"]) == 8


def test_a_method_without_pseudo_labels_refuses_a_balancer():
    with pytest.raises(ConfigError, match="simclr.*without pseudo-labels.*'pseudo_balance'"):
        load_config(preset="demo", overrides=["method.name=simclr", "method.balancer=pseudo_balance"])
    assert load_config(preset="demo", overrides=["method.name=simclr", "method.balancer=none"]).method.name == "simclr"


@pytest.mark.parametrize("stage_lr, expected", [(0.0, 0.005), (0.001, 0.001)])
def test_the_fixmatch_stage_steps_at_its_own_peak_lr_when_set(stage_lr, expected):
    """`method.fixmatch.lr`: after a supervised warm-up the stage need not re-heat to method.lr."""
    cfg = _cfg("fixmatch", "method.lr=0.005", f"method.fixmatch.lr={stage_lr}")
    ctx = _ctx(cfg)
    method = get_method("fixmatch")(cfg, ctx)
    method.build()
    stage = next(s for s in method.stages(cfg) if s.unlabelled)
    method.begin_stage(stage)
    method.train_step(stage, _batch(ctx.columns, 6, 1), _batch(ctx.weak_columns + ctx.strong_columns, 8, 2,
                                                              labels=False), step=3, lr_factor=0.5, stage_epoch=0)
    assert [g["lr"] for g in method.opts["model"].param_groups] == pytest.approx([expected * 0.5] *
                                                                                 len(method.opts["model"].param_groups))
