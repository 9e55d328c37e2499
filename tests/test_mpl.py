"""Meta Pseudo Labels losses and step (ipb_ray.nn.mpl): pure torch, tiny models, no Ray."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ipb_ray.methods.mpl import MPL_FEEDBACK
from ipb_ray.methods.mpl import MPLParams
from ipb_ray.nn.models import create_model
from ipb_ray.nn.mpl import (
    ema_update,
    mpl_feedback,
    mpl_step,
    pseudo_labels,
    student_loss,
    student_lr_at,
    uda_loss,
    uda_weight,
)


def _sgd(model: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)  # no momentum/decay: zero grad = no change


def _mlp(seed: int, d: int = 8, c: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, c))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------- UDA


def test_uda_loss_is_zero_when_views_agree_and_mask_follows_threshold():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    loss, mask = uda_loss(logits, logits.clone(), temperature=1.0, threshold=0.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert mask.tolist() == [1.0] * 6

    weak = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # confidence ~1 and 1/3
    strong = torch.zeros(2, 3, requires_grad=True)
    loss, mask = uda_loss(weak, strong, temperature=1.0, threshold=0.5)
    assert mask.tolist() == [1.0, 0.0]
    p = F.softmax(weak[0], -1)
    kl_row0 = (p * (p.log() - F.log_softmax(strong[0].detach(), -1))).sum()
    assert loss.item() == pytest.approx(kl_row0.item() / 2, rel=1e-5)  # divided by B, not by mask
    loss.backward()
    assert strong.grad[1].abs().sum() == 0 and strong.grad[0].abs().sum() > 0


def test_uda_temperature_sharpens_targets():
    torch.manual_seed(1)
    weak = torch.randn(5, 4)
    strong = weak.clone()
    at_1, _ = uda_loss(weak, strong, 1.0, 0.0)
    at_half, _ = uda_loss(weak, strong, 0.5, 0.0)
    p = F.softmax(weak / 0.5, -1)
    expected = (p * (p.log() - F.log_softmax(strong, -1))).sum(-1).mean()
    assert at_1.item() == pytest.approx(0.0, abs=1e-6)
    assert at_half.item() == pytest.approx(expected.item(), rel=1e-5) and at_half.item() > 0
    # a near-zero temperature turns the targets one-hot: KL -> CE against argmax(weak)
    cold, _ = uda_loss(weak, strong, 1e-3, 0.0)
    assert cold.item() == pytest.approx(F.cross_entropy(strong, weak.argmax(-1)).item(), rel=1e-4)


def test_uda_weight_ramps_linearly_then_stays():
    assert uda_weight(0, 8.0, 100) == 0.0
    assert uda_weight(25, 8.0, 100) == pytest.approx(2.0)
    assert uda_weight(100, 8.0, 100) == pytest.approx(8.0)
    assert uda_weight(10_000, 8.0, 100) == pytest.approx(8.0)


# --------------------------------------------------------------------------- pseudo-labels, losses


def test_pseudo_labels_mask_by_confidence():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 5.0]])
    hard, conf, mask = pseudo_labels(logits, threshold=0.65)
    assert hard.tolist() == [0, 1, 2]
    assert conf.tolist() == pytest.approx(F.softmax(logits, -1).amax(-1).tolist())
    assert mask.tolist() == [1.0, 0.0, 1.0]


def test_student_loss_masked_mean_and_all_masked_zero_keeps_graph():
    torch.manual_seed(2)
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0])
    per = F.cross_entropy(logits, labels, reduction="none")
    assert student_loss(logits, labels).item() == pytest.approx(per.mean().item())
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert student_loss(logits, labels, mask).item() == pytest.approx((per[0] + per[2]).item() / 2)

    zero = student_loss(logits, labels, torch.zeros(4))
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_mpl_feedback_signs_and_bad_mode():
    assert mpl_feedback(2.0, 1.5, "old_minus_new") == pytest.approx(0.5)
    assert mpl_feedback(2.0, 1.5, "new_minus_old") == pytest.approx(-0.5)
    assert set(MPL_FEEDBACK) == {"old_minus_new", "new_minus_old"}
    with pytest.raises(ValueError, match="choose old_minus_new or new_minus_old"):
        mpl_feedback(2.0, 1.5, "old-new")


# --------------------------------------------------------------------------- one MPL step


def _sign_case() -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """Teacher (no bias) whose labelled data lives in input dims 0-1 and unlabelled data in
    dims 2-3: its labelled CE cannot move T(x_us), so only the h-weighted MPL term does.
    The student (zero init, with bias) learns 'class 0' from x_us, which helps on x_l
    (all class 0) through its bias, so the student's labelled loss falls."""
    torch.manual_seed(3)
    teacher = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[0.3, -0.2, 0.5, 0.5], [-0.1, 0.4, -0.5, -0.5]]))
    student = nn.Linear(4, 2)
    nn.init.zeros_(student.weight)
    nn.init.zeros_(student.bias)
    x_l = torch.cat([torch.randn(8, 2), torch.zeros(8, 2)], 1)
    x_u = torch.cat([torch.zeros(8, 2), torch.rand(8, 2) + 0.5], 1)
    return teacher, student, {"x_l": x_l, "y_l": torch.zeros(8, dtype=torch.long),
                              "x_uw": x_u, "x_us": x_u.clone()}


@pytest.mark.parametrize("mode", MPL_FEEDBACK)
def test_teacher_gradient_follows_h(mode):
    teacher, student, data = _sign_case()
    cfg = MPLParams(threshold=0.5, uda_weight=0.0, mpl_feedback=mode, student_labelled=0.0)
    with torch.no_grad():
        hard = teacher(data["x_us"]).argmax(-1)
        assert hard.tolist() == [0] * 8
        before = F.softmax(teacher(data["x_us"]), -1)[:, 0]
    out = mpl_step(teacher, student, _sgd(teacher, 0.5), _sgd(student, 0.5), data["x_l"], data["y_l"],
                   data["x_uw"], data["x_us"], step=0, cfg=cfg)
    with torch.no_grad():
        after = F.softmax(teacher(data["x_us"]), -1)[:, 0]
    assert out["student_loss_l_new"] < out["student_loss_l_old"]  # the student improved
    assert out["pseudo_label_counts"] == [8, 0]
    if mode == "old_minus_new":
        assert out["mpl_h"] > 0
        assert (after > before).all()  # rewarded: the teacher trusts its pseudo-label more
    else:
        assert out["mpl_h"] < 0
        assert (after < before).all()


def _harmful_label_case(seed: int) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``_sign_case`` (L in input dims 0-1, all class 0; U in dims 2-3, so only the MPL
    term moves T(x_u)), but the teacher starts out labelling all of U class 1, which makes
    the student worse on L."""
    gen = torch.Generator().manual_seed(seed)
    teacher = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.cat([torch.randn(2, 2, generator=gen),
                                        torch.tensor([[-0.2, -0.2], [0.2, 0.2]])], 1))
    student = nn.Linear(4, 2)
    nn.init.zeros_(student.weight)
    nn.init.zeros_(student.bias)
    x_l = torch.cat([torch.randn(8, 2, generator=gen), torch.zeros(8, 2)], 1)
    x_u = torch.cat([torch.zeros(16, 2), torch.rand(16, 2, generator=gen) + 0.5], 1)
    return teacher, student, x_l, torch.zeros(8, dtype=torch.long), x_u


@pytest.mark.parametrize("mode", MPL_FEEDBACK)
def test_feedback_sign_decides_whether_the_teacher_learns_helpful_labels(mode):
    # benchmarks/mpl_sign.py: where the MPL term is the teacher's only signal on U, the
    # derivation's sign (old - new) turns a harmful pseudo-label into a helpful one within
    # tens of steps; the authors' sign (new - old) entrenches the harmful one
    for seed in (0, 1):
        teacher, student, x_l, y_l, x_u = _harmful_label_case(seed)
        with torch.no_grad():
            assert teacher(x_u).argmax(-1).tolist() == [1] * 16
            start = F.cross_entropy(student(x_l), y_l).item()
        cfg = MPLParams(threshold=0.0, uda_weight=0.0, mpl_feedback=mode, student_labelled=0.0)
        t_opt, s_opt = _sgd(teacher, 1.0), _sgd(student, 0.1)
        for step in range(60):
            mpl_step(teacher, student, t_opt, s_opt, x_l, y_l, x_u, x_u, step=step, cfg=cfg)
        with torch.no_grad():
            labels = teacher(x_u).argmax(-1).tolist()
            end = F.cross_entropy(student(x_l), y_l).item()
        if mode == "old_minus_new":
            assert labels == [0] * 16 and end < start - 0.2, (seed, labels, start, end)
        else:
            assert labels == [1] * 16 and end > start + 0.2, (seed, labels, start, end)


def test_mpl_step_changes_both_models_and_reports_consistent_parts():
    teacher, student = _mlp(4), _mlp(5)
    torch.manual_seed(6)
    x_l, y_l = torch.randn(6, 8), torch.randint(0, 3, (6,))
    x_uw = torch.randn(10, 8)
    x_us = x_uw + 0.1 * torch.randn(10, 8)
    cfg = MPLParams(threshold=0.0, uda_steps=10)
    t0, s0 = _params(teacher), _params(student)
    out = mpl_step(teacher, student, _sgd(teacher), _sgd(student), (x_l,), y_l, (x_uw,), (x_us,),
                   step=5, cfg=cfg, grad_clip=1.0)
    for name, p in teacher.named_parameters():
        assert not torch.equal(p, t0[name]), f"teacher {name} did not change"
    for name, p in student.named_parameters():
        assert not torch.equal(p, s0[name]), f"student {name} did not change"
    assert out["uda_weight"] == pytest.approx(4.0)  # 8 * 5/10
    assert out["mask_rate"] == 1.0 and sum(out["pseudo_label_counts"]) == 10
    total = out["teacher_loss_l"] + out["uda_weight"] * out["uda_loss"] + out["mpl_h"] * out["teacher_loss_mpl"]
    assert out["teacher_loss"] == pytest.approx(total, rel=1e-5)
    assert out["mpl_h"] == pytest.approx(out["student_loss_l_old"] - out["student_loss_l_new"], abs=1e-6)
    assert all(math.isfinite(v) for k, v in out.items() if not isinstance(v, list))


def test_nothing_passes_threshold_student_unchanged():
    teacher, student = _mlp(7), _mlp(8)
    torch.manual_seed(9)
    x_l, y_l = torch.randn(4, 8), torch.randint(0, 3, (4,))
    x_u = torch.randn(6, 8)
    # 1.0 is the highest threshold MPLParams allows; a random net's softmax stays below it
    cfg = MPLParams(threshold=1.0, threshold_student=True, student_labelled=0.0)
    t0, s0 = _params(teacher), _params(student)
    out = mpl_step(teacher, student, _sgd(teacher), _sgd(student), [x_l], y_l, [x_u], [x_u.clone()],
                   step=100, cfg=cfg)
    assert out["mask_rate"] == 0.0 and out["uda_mask_rate"] == 0.0
    assert out["student_loss"] == 0.0 and out["mpl_h"] == 0.0
    for name, p in student.named_parameters():
        assert torch.equal(p, s0[name]), f"student {name} moved without pseudo-labels"
    assert any(not torch.equal(p, t0[n]) for n, p in teacher.named_parameters())  # labelled CE still
    # without the student threshold the same batch does train the student
    mpl_step(teacher, student, _sgd(teacher), _sgd(student), [x_l], y_l, [x_u], [x_u.clone()],
             step=100, cfg=MPLParams(threshold=1.0, threshold_student=False, student_labelled=0.0))
    assert any(not torch.equal(p, s0[n]) for n, p in student.named_parameters())


def test_mpl_step_multi_scale_hrnet():
    torch.manual_seed(10)
    teacher = create_model("hrnet_tiny", 3, multi_scale=True, width=0.5, feature_dim=16)
    student = create_model("hrnet_tiny", 3, multi_scale=True, width=0.5, feature_dim=16)
    teacher.train(), student.train()

    def views() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(4, 1, 32, 32), torch.rand(4, 1, 16, 16)

    t0 = _params(teacher)
    out = mpl_step(teacher, student, _sgd(teacher, 0.01), _sgd(student, 0.01), views(),
                   torch.tensor([0, 1, 2, 0]), views(), views(), step=1,
                   cfg=MPLParams(threshold=0.0))
    assert all(math.isfinite(v) for k, v in out.items() if not isinstance(v, list))
    assert len(out["pseudo_label_counts"]) == 3 and sum(out["pseudo_label_counts"]) == 4
    assert len(out["pseudo_labels"]) == 4 and set(out["pseudo_labels"]) <= {0, 1, 2}
    assert all(torch.isfinite(p).all() for p in teacher.parameters())
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert any(not torch.equal(p, t0[n]) for n, p in teacher.named_parameters())


def test_mpl_step_rejects_mismatched_scales():
    teacher, student = _mlp(11), _mlp(12)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="one batch per scale"):
        mpl_step(teacher, student, _sgd(teacher), _sgd(student), (x,), torch.tensor([0, 1]),
                 (x, x), (x,), step=0, cfg=MPLParams())


# --------------------------------------------------------------------------- schedule, EMA


def test_student_lr_warmup_boundary():
    cfg = MPLParams(student_warmup_epochs=10, student_warmup_lr=5e-4, student_lr=5e-3)
    assert student_lr_at(0, cfg) == 5e-4
    assert student_lr_at(9, cfg) == 5e-4
    assert student_lr_at(10, cfg) == 5e-3
    assert student_lr_at(3, MPLParams(student_warmup_epochs=0, student_lr=0.02)) == 0.02


def test_ema_update_math_and_buffers():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()
    model(torch.randn(5, 3))  # moves the BN running statistics
    old = _params(ema)
    ema_update(ema, model, decay=0.9)
    for name, p in model.named_parameters():
        expected = 0.9 * old[name] + 0.1 * p.detach()
        assert torch.allclose(dict(ema.named_parameters())[name], expected, atol=1e-6)
    for (name, b), (_, eb) in zip(model.named_buffers(), ema.named_buffers()):
        assert torch.equal(b, eb), f"buffer {name} not copied"
    ema_update(ema, model, decay=0.0)  # EMA off: an exact copy
    for p, e in zip(model.parameters(), ema.parameters()):
        assert torch.equal(p, e)
    with pytest.raises(ValueError, match="method.mpl.ema"):
        ema_update(ema, model, decay=1.5)


def test_ema_update_refuses_a_model_of_another_shape():
    with pytest.raises(ValueError, match="different parameters or buffers; build the EMA model as a deep copy"):
        ema_update(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2)), decay=0.5)


def test_autocast_factory_wraps_every_forward_of_the_step():
    teacher, student = _mlp(0), _mlp(1)
    entered = []

    class Probe:
        def __enter__(self):
            entered.append(torch.is_grad_enabled())

        def __exit__(self, *exc):
            return False

    x = torch.rand(4, 8)
    mpl_step(teacher, student, _sgd(teacher, 0.01), _sgd(student, 0.01), x, torch.tensor([0, 1, 0, 1]), x, x,
             step=0, cfg=MPLParams(threshold=0.0, student_labelled=0.0), autocast=Probe)
    # teacher forward, student before (no grad), student on x_us, student after (no grad)
    assert entered == [True, False, True, False]


def test_student_labelled_step_comes_after_the_feedback_and_teaches_the_labels():
    """``student_labelled``: with no pseudo-label passing, h is 0 (the feedback measures the
    pseudo-label step alone) and still the student learns L; at 0 it stays put."""
    teacher, student = _mlp(11), _mlp(12)
    torch.manual_seed(13)
    x_l, y_l = torch.randn(8, 8), torch.randint(0, 3, (8,))
    x_u = torch.randn(6, 8)
    s0 = _params(student)
    losses = []
    for _ in range(30):
        out = mpl_step(teacher, student, _sgd(teacher, 0.0), _sgd(student), [x_l], y_l, [x_u], [x_u.clone()],
                       step=0, cfg=MPLParams(threshold=1.0, student_labelled=1.0))
        assert out["mpl_h"] == 0.0 and out["student_loss"] == 0.0
        losses.append(out["student_loss_sup"])
    assert losses[-1] < 0.5 * losses[0], losses
    assert any(not torch.equal(p, s0[n]) for n, p in student.named_parameters())
    fresh = _mlp(12)
    out = mpl_step(teacher, fresh, _sgd(teacher, 0.0), _sgd(fresh), [x_l], y_l, [x_u], [x_u.clone()],
                   step=0, cfg=MPLParams(threshold=1.0, student_labelled=0.0))
    assert out["student_loss_sup"] == 0.0
    assert all(torch.equal(p, s0[n]) for n, p in fresh.named_parameters())
