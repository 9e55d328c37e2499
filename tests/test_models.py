"""Model registry: every backbone, single- and multi-scale, at small patch sizes on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ipb_ray.config import BACKBONES
from ipb_ray.nn.models import count_parameters, create_model, list_models, register_model

# (name, width) of every registered backbone: the full-size ones at reduced width keep the test in milliseconds;
# their full-width parameter counts are checked separately without a forward pass
CASES = [(name, 0.25 if name in ("vgg19_bn", "hrnet") else 1.0) for name in list_models()]  # the registry itself


def test_registry_lists_every_configurable_backbone():
    assert set(BACKBONES) <= set(list_models())


def _inputs(multi_scale: bool, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(n, 1, 64, 64), (n, 1, 32, 32)] if multi_scale else [(n, 1, 48, 48)]
    return [torch.rand(s, generator=g) for s in shapes]


@pytest.mark.parametrize("multi_scale", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("name,width", CASES, ids=[c[0] for c in CASES])
def test_shapes_finite_and_every_parameter_gets_a_gradient(name, width, multi_scale):
    torch.manual_seed(0)
    model = create_model(name, 5, width=width, feature_dim=32, multi_scale=multi_scale)
    print(f"\n{name} width {width} {'multi' if multi_scale else 'single'}-scale: "
          f"{count_parameters(model):,} parameters")
    xs = _inputs(multi_scale)
    logits, feats = model(*xs)
    assert logits.shape == (4, 5)
    assert feats.shape == (4, 64 if multi_scale else 32)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters whose gradient is identically zero: {zero}"


@pytest.mark.parametrize("name", ["vgg19_bn", "hrnet"])
def test_full_size_parameter_counts(name):
    single = count_parameters(create_model(name, 4))
    multi = count_parameters(create_model(name, 4, multi_scale=True))
    print(f"\n{name}: {single:,} parameters single-scale, {multi:,} multi-scale")
    # two independent streams (no shared stem, unlike the authors' code) plus BN1d and a wider head
    head = 512 * 4 + 4
    assert multi == 2 * (single - head) + 2 * 1024 + (1024 * 4 + 4)


def test_feature_dim_of_full_vgg_matches_torchvision_layout():
    from torchvision.models import vgg19_bn

    ours = create_model("vgg19_bn", 10, in_chans=3, feature_dim=4096)
    ref = vgg19_bn(weights=None, num_classes=10)
    convs = lambda m: [tuple(c.weight.shape) for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    assert convs(ours) == convs(ref)
    # one hidden FC layer instead of torchvision's two: exactly one 4096 x 4096 layer fewer
    assert count_parameters(ref) - count_parameters(ours) == 4096 * 4096 + 4096


def test_models_have_at_most_one_hidden_layer_and_a_small_head():
    for name in list_models():
        net = create_model(name, 4, width=0.25, feature_dim=16)
        linears = [m for m in net.backbone.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) <= 1, f"{name} has {len(linears)} fully connected layers before the head"
        assert float(net.head.weight.detach().std()) < 0.02 and float(net.head.bias.detach().abs().max()) == 0.0


def test_normalisation_is_carried_in_the_state_dict():
    net = create_model("cnn_small", 3, width=0.25, feature_dim=8, pixel_mean=0.4, pixel_std=0.2)
    state = net.state_dict()
    assert float(state["normalise.mean"]) == pytest.approx(0.4) and float(state["normalise.std"]) == pytest.approx(0.2)
    fresh = create_model("cnn_small", 3, width=0.25, feature_dim=8)
    fresh.load_state_dict(state)
    x = torch.rand(2, 1, 32, 32)
    fresh.eval(), net.eval()
    assert torch.allclose(fresh(x)[0], net(x)[0])
    with pytest.raises(ValueError, match="std must be > 0"):
        create_model("cnn_small", 3, pixel_std=0.0)


def test_config_takes_backbones_from_the_registry():
    from ipb_ray.config import ConfigError, load_config

    @register_model("test_registry_backbone")
    def _tiny(in_chans=1, width=1.0, feature_dim=8):
        return create_model("cnn_small", 2, width=0.25, feature_dim=feature_dim).backbone

    assert load_config(overrides=["model.backbone=test_registry_backbone"]).model.backbone == "test_registry_backbone"
    with pytest.raises(ConfigError, match="did you mean 'cnn_small'"):
        load_config(overrides=["model.backbone=cnn_smal"])


def test_kaiming_init_and_seeded_reproducibility():
    torch.manual_seed(3)
    a = create_model("hrnet_tiny", 4)
    torch.manual_seed(3)
    b = create_model("hrnet_tiny", 4)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), n
    conv = a.backbone.stem[0][0].weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert abs(conv.std().item() - (2 / fan_out) ** 0.5) < 0.35 * (2 / fan_out) ** 0.5


def test_eval_mode_is_deterministic_and_batch_independent():
    model = create_model("vgg_tiny", 3, multi_scale=True).eval()
    xs = _inputs(True, n=6)
    with torch.no_grad():
        full, _ = model(*xs)
        part, _ = model(*(x[:2] for x in xs))
    torch.testing.assert_close(full[:2], part, rtol=1e-5, atol=1e-5)


def test_bad_arguments_and_inputs_say_what_to_do():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet50'; registered: .*hrnet"):
        create_model("resnet50", 4)
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        create_model("vgg_tiny", 1)
    single = create_model("vgg_tiny", 4)
    multi = create_model("hrnet_tiny", 4, multi_scale=True)
    x = torch.rand(2, 1, 64, 64)
    with pytest.raises(TypeError, match="two input batches.*data.multi_scale"):
        multi(x)
    with pytest.raises(TypeError, match="one input batch.*data.multi_scale"):
        single(x, x)
    with pytest.raises(ValueError, match=r"expected a batch shaped \(N, 1, H, W\), got \(2, 3, 64, 64\)"):
        single(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="too small for this backbone.*data.patch_size"):
        single(torch.rand(2, 1, 12, 12))
    with pytest.raises(ValueError, match="already registered"):
        register_model("hrnet")(lambda **kw: None)
