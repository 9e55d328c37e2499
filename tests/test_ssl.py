"""Pure losses and pseudo-label corrections of FixMatch, SimCLR and the logit adjustment
(ipb_ray.nn.ssl), and the logit_adjust balancer's running prior: milliseconds, no Ray."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ipb_ray.config import load_config
from ipb_ray.nn.ssl import adjusted_logits, fixmatch_loss, nt_xent, update_prior


def test_fixmatch_loss_averages_the_kept_pseudo_labels_over_the_whole_batch():
    torch.manual_seed(0)
    logits, hard = torch.randn(8, 4), torch.randint(0, 4, (8,))
    per_patch = F.cross_entropy(logits, hard, reduction="none")
    assert fixmatch_loss(logits, hard, torch.ones(8)).item() == pytest.approx(per_patch.mean().item())
    assert fixmatch_loss(logits, hard, torch.zeros(8)).item() == 0.0
    half = torch.tensor([1.0, 0.0] * 4)
    # over all 8 patches, not over the 4 kept ones (FixMatch's eq. 4)
    assert fixmatch_loss(logits, hard, half).item() == pytest.approx((per_patch * half).sum().item() / 8)


def _nt_xent_by_hand(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2, total = z.shape[0], 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        sims = [math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / sum(sims))
    return total / n2


def test_nt_xent_matches_its_definition_and_rewards_agreeing_views():
    torch.manual_seed(1)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(_nt_xent_by_hand(z1, z2, 0.5), rel=1e-5)
    # views that agree (the same point, slightly moved) score far better than unrelated ones
    assert nt_xent(z1, z1 + 0.01 * torch.randn(5, 7), 0.5) < nt_xent(z1, z2, 0.5) - 0.5


def test_nt_xent_bad_input_messages():
    with pytest.raises(ValueError, match="at least 2 images"):
        nt_xent(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"one shape, got \(3, 4\) and \(3, 5\)"):
        nt_xent(torch.randn(3, 4), torch.randn(3, 5))


def test_prior_update_and_logit_adjustment():
    prior = torch.full((3,), 1 / 3)
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1]])
    assert torch.allclose(update_prior(prior, probs, 0.0), torch.tensor([0.7, 0.2, 0.1]))
    moved = update_prior(prior, probs, 0.9)
    assert moved.sum().item() == pytest.approx(1.0) and moved[0] > 1 / 3 > moved[2]
    logits = torch.tensor([[2.0, 1.8, -1.0], [0.0, 3.0, 0.0]])
    # a uniform prior changes no argmax; a head class (0) loses a near tie, not a clear loss
    assert adjusted_logits(logits, prior, 1.0).argmax(1).tolist() == [0, 1]
    head = torch.tensor([0.8, 0.1, 0.1])
    assert adjusted_logits(logits, head, 1.0).argmax(1).tolist() == [1, 1]
    assert adjusted_logits(logits, head, 0.0).argmax(1).tolist() == [0, 1]  # tau 0 = off


def test_logit_adjust_balancer_learns_the_models_bias_and_evens_its_pseudo_labels():
    from ipb_ray.methods.balancers import LogitAdjuster

    cfg = load_config(preset="demo", overrides=["method.name=fixmatch", "method.balancer=logit_adjust",
                                                "method.logit_adjust.momentum=0.9"])
    names = ("a", "b", "c")
    bal = LogitAdjuster(cfg, SimpleNamespace(inputs=SimpleNamespace(class_names=names)))
    gen = torch.Generator().manual_seed(0)
    raw_share = adj_share = 0.0
    for _ in range(60):  # a model biased towards class 0 on every batch
        logits = torch.randn(32, 3, generator=gen) + torch.tensor([1.5, 0.0, 0.0])
        adj = bal.adjust(logits)
        raw_share, adj_share = (logits.argmax(1) == 0).float().mean(), (adj.argmax(1) == 0).float().mean()
    assert bal.prior[0] > 0.5  # the running prior found the bias
    assert raw_share > 0.6 and adj_share < raw_share - 0.2  # and the adjusted labels lean on it far less
    figures = bal.observe([], [])
    assert set(figures) == {"prior_estimate/a", "prior_estimate/b", "prior_estimate/c"}
    again = LogitAdjuster(cfg, SimpleNamespace(inputs=SimpleNamespace(class_names=names)))
    again.load_state_dict(bal.state_dict())
    assert torch.allclose(again.prior, bal.prior)
