"""Learning-rate schedule, optimizer factory and BatchNorm handling (pure torch, milliseconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ipb_ray.nn.models import create_model
from ipb_ray.nn.optim import frozen_bn_stats, lr_factor, make_optimizer, recalibrate_bn, warmup_steps


def test_cosine_warms_up_then_decays_to_near_zero():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert f[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(f[:warm], f[1:warm + 1]))  # rising during the warm-up
    assert f[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))  # then never rising
    assert 0 < f[-1] < 0.01
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_constant_and_step_schedules():
    assert [lr_factor(s, 10, 0, "constant") for s in range(10)] == [1.0] * 10
    assert [lr_factor(s, 10, 0, "step") for s in range(10)] == [1.0] * 5 + [0.1] * 5
    assert warmup_steps(200, 0.05) == 10


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="method.schedule"):
        lr_factor(0, 10, 0, "linear")
    with pytest.raises(ValueError, match="at least one step"):
        lr_factor(0, 0)


def test_make_optimizer_kinds():
    p = [nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer(p, "sgd", 0.1, momentum=0.9), torch.optim.SGD)
    assert isinstance(make_optimizer(p, "adamw", 0.1), torch.optim.AdamW)
    with pytest.raises(ValueError, match="method.optimizer"):
        make_optimizer(p, "lbfgs", 0.1)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_recalibration_makes_eval_mode_agree_with_train_mode_statistics():
    net = _bn_net()
    # running statistics learnt on inputs of another scale (as after strong augmentation)
    net.train()
    with torch.no_grad():
        for _ in range(20):
            net(torch.rand(8, 1, 12, 12) * 10 + 5)
    clean = [torch.rand(16, 1, 12, 12) for _ in range(4)]
    x = torch.cat(clean)
    net.train()
    with frozen_bn_stats(net), torch.no_grad():
        train_out = net(x)
    net.eval()
    with torch.no_grad():
        before = net(x)
    used = recalibrate_bn(net, clean, lambda m, b: m(b))
    with torch.no_grad():
        after = net(x)
    assert used == 4 and not net.training
    assert (before - train_out).abs().max() > 10 * (after - train_out).abs().max()
    assert (after.argmax(1) == train_out.argmax(1)).float().mean() >= 0.95
    bn = net[1]
    assert torch.allclose(bn.running_mean, net[0](x).mean((0, 2, 3)), atol=1e-4)
    assert bn.momentum == 0.1  # restored


def test_recalibration_with_no_batches_keeps_statistics():
    net = _bn_net()
    mean = net[1].running_mean.clone()
    assert recalibrate_bn(net, [], lambda m, b: m(b)) == 0
    assert torch.equal(net[1].running_mean, mean)


def test_frozen_bn_stats_keeps_running_statistics_in_train_mode():
    net = create_model("cnn_small", 3, width=0.25, feature_dim=8)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    with torch.no_grad(), frozen_bn_stats(net):
        net(torch.rand(4, 1, 32, 32))
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with torch.no_grad():
        net(torch.rand(4, 1, 32, 32))  # outside the block the statistics move again
    assert not torch.equal(before["backbone.features.0.1.running_mean"],
                           net.state_dict()["backbone.features.0.1.running_mean"])


def test_one_calibration_pass_serves_several_networks():
    a, b = _bn_net(), _bn_net()
    seen = []
    clean = [torch.rand(8, 1, 12, 12) for _ in range(3)]
    used = recalibrate_bn([a, b], clean, lambda m, x: (seen.append(id(m)), m(x)))
    assert used == 3 and seen.count(id(a)) == 3 and seen.count(id(b)) == 3
    assert not a.training and not b.training
    assert torch.allclose(a[1].running_mean, b[1].running_mean)


def test_calibration_draws_l_in_the_balanced_training_mix_seeded():
    """BatchNorm is re-estimated on L as the networks train on it: class-balanced (BCCD's
    L is 85 % RBC; statistics of that mix moved RBC predictions to the rare classes)."""
    from ipb_ray.config import load_config
    from ipb_ray.engine.fold import FoldInputs, calibration_counts

    labels = (0,) * 80 + (1,) * 10 + (2,) * 10
    ids = tuple(f"c{i}" for i in range(len(labels)))
    inputs = FoldInputs("cat", ("a", "b", "c"), ids, labels, (), (), ())
    cfg = load_config(preset="demo", overrides=["eval.bn_batches=30", "method.batch_size=16"])
    counts = calibration_counts(cfg, inputs)
    assert sum(counts.values()) == 30 * 16
    per_class = np.bincount([labels[ids.index(c)] for c, n in counts.items() for _ in range(n)], minlength=3)
    assert np.all(np.abs(per_class / per_class.sum() - 1 / 3) < 0.06), per_class
    assert calibration_counts(cfg, inputs) == counts  # seeded
    natural = calibration_counts(cfg.replace("method.balance_labelled=false"), inputs)
    nat = np.bincount([labels[ids.index(c)] for c, n in natural.items() for _ in range(n)], minlength=3)
    assert nat[0] / nat.sum() > 0.7  # without balancing, L's own mix
