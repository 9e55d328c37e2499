"""Backbones, the multi-scale two-stream wrapper, and the registry behind `create_model`.

Every model maps grayscale patches to ``(logits, features)``: the features are the
pre-logit vector (for a multi-scale model, the batch-normalised concatenation of both
streams, as in the paper's Figure 3). Nothing here downloads weights: the paper trains
from scratch with Kaiming initialisation.

    model = create_model("hrnet_tiny", num_classes=4, multi_scale=True)
    logits, feats = model(x224, x112)

A backbone is a module ``image -> (N, feature_dim)``; register new ones with
``@register_model("name")`` on a builder ``(in_chans, width, feature_dim) -> nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:  # pragma: no cover
    from ipb_ray.config import ExperimentConfig

__all__ = [
    "build_model", "Classifier", "cnn_small", "count_parameters", "create_model", "HEAD_INIT_STD", "HRNet",
    "hrnet", "hrnet_tiny", "list_models", "model_kwargs", "MultiScale", "patch_stats", "PatchStats",
    "register_model", "SmallCNN", "VGG", "vgg19_bn", "vgg_tiny",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a backbone builder available to `create_model` under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return wrap


def list_models() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ch(base: int, width: float) -> int:
    """Channel count for a width multiplier: at least 4, rounded to an even number."""
    return max(4, int(round(base * width / 2)) * 2)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


#: Standard deviation of the classifier head's initial weights: small, so every class
#: starts near equal probability and no class wins the first steps by accident.
HEAD_INIT_STD = 0.01


def _init_weights(module: nn.Module) -> None:
    """Kaiming initialisation (He et al.) for convolutions and hidden linear layers; the
    classifier head (``module.head``) gets small normal weights and zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    head = getattr(module, "head", None)
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(head.bias)


# --------------------------------------------------------------------------- VGG19-BN

# torchvision's configuration "E" (VGG19): 16 convolutions, "M" = 2x2 max-pool
_VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with batch norm after every convolution (torchvision's layout, grayscale input).

    After the convolutions one fully connected layer (the single hidden layer) gives the
    ``feature_dim`` vector the head classifies (512 in the paper). torchvision's two
    4096-wide hidden layers are left out: on a few hundred labels they only add
    parameters to overfit.
    """

    def __init__(self, in_chans: int, width: float, feature_dim: int, pool: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for v in _VGG19:
            if v == "M":
                # ceil mode: equal to torchvision's floor mode on even sizes (224, 128, 112),
                # and small odd-sized patches keep at least one pixel to the end
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                cout = _ch(int(v), width)
                layers.append(_conv_bn_relu(cin, cout, bias=True))  # biased, as torchvision's
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Sequential(nn.Linear(cin * pool * pool, feature_dim), nn.ReLU(inplace=True))
        self.feature_dim = feature_dim
        self.min_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model("vgg19_bn")
def vgg19_bn(in_chans: int = 1, width: float = 1.0, feature_dim: int = 512) -> nn.Module:
    """VGG19-BN: 16 convolutions 64-512 channels, 7x7 pooled, one hidden layer (the paper's baseline)."""
    return VGG(in_chans, width, feature_dim, pool=7)


@register_model("vgg_tiny")
def vgg_tiny(in_chans: int = 1, width: float = 1.0, feature_dim: int = 512) -> nn.Module:
    """VGG19-BN's 16-convolution layout at 1/16 width, 1x1 pooled: for CPU tests and the demo."""
    return VGG(in_chans, width / 16, feature_dim, pool=1)


class PatchStats(nn.Module):
    """Hand-made features of a patch (mean, spread, edge energy per direction, bright and
    dark tails) through one linear layer. Not a network worth publishing: a CPU-cheap
    model whose predictions depend on texture from the first step, for smoke tests of the
    training machinery and as a floor any real backbone must beat."""

    n_stats = 6

    def __init__(self, in_chans: int, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.proj = nn.Linear(self.n_stats * in_chans, feature_dim)
        self.min_size = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(2).mean(-1)
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(2).mean(-1)
        mean, std = flat.mean(-1), flat.std(-1)
        hi = flat.amax(-1) - mean
        lo = mean - flat.amin(-1)
        return F.relu(self.proj(torch.cat([mean, std, dx, dy, hi, lo], 1)))


@register_model("patch_stats")
def patch_stats(in_chans: int = 1, width: float = 1.0, feature_dim: int = 512) -> nn.Module:
    """:class:`PatchStats` (``width`` is ignored)."""
    return PatchStats(in_chans, feature_dim)


# --------------------------------------------------------------------------- HRNet


class _Fuse(nn.Module):
    """Exchange between parallel branches: every output branch sums all inputs brought to
    its resolution (stride-2 3x3 convolutions down, 1x1 convolution + upsampling up)."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.paths = nn.ModuleList()
        for j, cj in enumerate(channels):
            row = nn.ModuleList()
            for i, ci in enumerate(channels):
                if i == j:
                    row.append(nn.Identity())
                elif i > j:  # lower resolution to higher
                    row.append(nn.Sequential(nn.Conv2d(ci, cj, 1, bias=False), nn.BatchNorm2d(cj)))
                else:  # higher resolution to lower: (j - i) stride-2 convolutions
                    steps: list[nn.Module] = []
                    c = ci
                    for k in range(j - i):
                        last = k == j - i - 1
                        cout = cj if last else ci
                        steps += [nn.Conv2d(c, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)]
                        if not last:
                            steps.append(nn.ReLU(inplace=True))
                        c = cout
                    row.append(nn.Sequential(*steps))
            self.paths.append(row)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for j, row in enumerate(self.paths):
            size = xs[j].shape[-2:]
            acc = xs[j]
            for i, path in enumerate(row):
                if i == j:
                    continue
                y = path(xs[i])
                if y.shape[-2:] != size:
                    y = F.interpolate(y, size=size, mode="nearest")
                acc = acc + y
            out.append(F.relu(acc))
        return out


class HRNet(nn.Module):
    """Compact HRNet in the spirit of the paper's network.

    A stride-4 stem of two 3x3 stride-2 convolutions, then three stages with 1, 2 and 3
    parallel branches (C, 2C, 4C channels at 1/4, 1/8, 1/16 resolution). Each stage runs
    one 3x3 BN-ReLU convolution per branch and fuses the branches; a new lower branch is
    made by a 3x3 stride-2 convolution from the lowest one. The high-resolution branch is
    kept to the end. That is ten 3x3 convolutions on the main paths (2 stem + 1 + 1 + 2 +
    1 + 3), before the fusion convolutions. Each branch is globally pooled and the pooled
    vectors concatenated; one fully connected layer gives the ``feature_dim`` vector. (The
    paper's text has four hidden FC layers; on a pooled vector of a few dozen channels
    they made the network slower to learn and no better, see RESULTS.md.)
    """

    def __init__(self, in_chans: int, width: float, feature_dim: int, base: int) -> None:
        super().__init__()
        c = _ch(base, width)
        chans = [c, 2 * c, 4 * c]
        self.stem = nn.Sequential(_conv_bn_relu(in_chans, c, 2), _conv_bn_relu(c, c, 2))
        self.stage1 = _conv_bn_relu(c, c)
        self.trans1 = _conv_bn_relu(chans[0], chans[1], 2)
        self.stage2 = nn.ModuleList([_conv_bn_relu(ch, ch) for ch in chans[:2]])
        self.fuse2 = _Fuse(chans[:2])
        self.trans2 = _conv_bn_relu(chans[1], chans[2], 2)
        self.stage3 = nn.ModuleList([_conv_bn_relu(ch, ch) for ch in chans])
        self.fuse3 = _Fuse(chans)
        self.fc = nn.Sequential(nn.Linear(sum(chans), feature_dim), nn.ReLU(inplace=True))
        self.feature_dim = feature_dim
        self.min_size = 16  # 1/16 resolution on the lowest branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem(x))
        xs = [x, self.trans1(x)]
        xs = self.fuse2([blk(t) for blk, t in zip(self.stage2, xs, strict=True)])
        xs = xs + [self.trans2(xs[-1])]
        xs = self.fuse3([blk(t) for blk, t in zip(self.stage3, xs, strict=True)])
        pooled = [F.adaptive_avg_pool2d(t, 1).flatten(1) for t in xs]
        return self.fc(torch.cat(pooled, 1))


@register_model("hrnet")
def hrnet(in_chans: int = 1, width: float = 1.0, feature_dim: int = 512) -> nn.Module:
    """Compact HRNet, branches of 32/64/128 channels."""
    return HRNet(in_chans, width, feature_dim, base=32)


@register_model("hrnet_tiny")
def hrnet_tiny(in_chans: int = 1, width: float = 1.0, feature_dim: int = 512) -> nn.Module:
    """Compact HRNet at 1/4 width (8/16/32 channels): for CPU tests and the demo."""
    return HRNet(in_chans, width, feature_dim, base=8)


# --------------------------------------------------------------------------- small CNN


class SmallCNN(nn.Module):
    """Four blocks of (3x3 conv, BN, ReLU, 2x2 max-pool) with 32/64/128/256 channels times
    ``width``, global average pooling, one fully connected layer: a plain CNN that
    learns on a CPU in minutes, the kind of network a user writes first."""

    def __init__(self, in_chans: int, width: float, feature_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for base in (32, 64, 128, 256):
            cout = _ch(base, width)
            layers += [_conv_bn_relu(cin, cout), nn.MaxPool2d(2, 2, ceil_mode=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Linear(cin, feature_dim), nn.ReLU(inplace=True))
        self.feature_dim = feature_dim
        self.min_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@register_model("cnn_small")
def cnn_small(in_chans: int = 1, width: float = 1.0, feature_dim: int = 512) -> nn.Module:
    """:class:`SmallCNN`: 32/64/128/256 channels at width 1."""
    return SmallCNN(in_chans, width, feature_dim)


# --------------------------------------------------------------------------- heads


class _Normalise(nn.Module):
    """``(x - mean) / std`` with the data set's pixel statistics held as buffers, so a
    saved or logged model carries the normalisation its weights were trained with."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        if not std > 0:
            raise ValueError(f"pixel std must be > 0, got {std}")
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _check_input(x: torch.Tensor, backbone: nn.Module, in_chans: int, what: str) -> None:
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{what}: expected a batch shaped (N, {in_chans}, H, W), got {tuple(x.shape)}")
    size = getattr(backbone, "min_size", 1)
    if min(x.shape[-2:]) < size:
        raise ValueError(f"{what}: patches of {tuple(x.shape[-2:])} px are too small for this backbone "
                         f"(at least {size} px); raise data.patch_size (single-scale) or "
                         "data.global_patch / data.local_patch (multi-scale)")


class Classifier(nn.Module):
    """Single-scale network: backbone features -> dropout -> linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int, in_chans: int = 1, dropout: float = 0.0,
                 mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.normalise = _Normalise(mean, std)
        self.backbone = backbone
        self.in_chans = in_chans
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.multi_scale = False

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(inputs) != 1:
            raise TypeError(f"a single-scale model takes one input batch, got {len(inputs)}; "
                            "was data.multi_scale set differently for the model and the stream?")
        (x,) = inputs
        _check_input(x, self.backbone, self.in_chans, "input")
        feats = self.backbone(self.normalise(x))
        return self.head(self.dropout(feats)), feats


class MultiScale(nn.Module):
    """Two streams (the large patch and its centre), each its own backbone with its own
    stem; the two feature vectors are concatenated, batch-normalised and classified."""

    def __init__(self, big: nn.Module, small: nn.Module, num_classes: int, in_chans: int = 1,
                 dropout: float = 0.0, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.normalise = _Normalise(mean, std)
        if big.feature_dim != small.feature_dim:
            raise ValueError(f"both streams must give features of equal length, "
                             f"got {big.feature_dim} and {small.feature_dim}")
        self.big, self.small = big, small
        self.in_chans = in_chans
        self.norm = nn.BatchNorm1d(2 * big.feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * big.feature_dim, num_classes)
        self.multi_scale = True

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(inputs) != 2:
            raise TypeError(f"a multi-scale model takes two input batches (large patch, centre), got {len(inputs)}; "
                            "was data.multi_scale set differently for the model and the stream?")
        x_big, x_small = inputs
        _check_input(x_big, self.big, self.in_chans, "large-scale input")
        _check_input(x_small, self.small, self.in_chans, "small-scale input")
        feats = self.norm(torch.cat([self.big(self.normalise(x_big)), self.small(self.normalise(x_small))], 1))
        return self.head(self.dropout(feats)), feats


def create_model(name: str, num_classes: int, in_chans: int = 1, *, width: float = 1.0, feature_dim: int = 512,
                 dropout: float = 0.0, multi_scale: bool = False, pixel_mean: float = 0.0,
                 pixel_std: float = 1.0) -> nn.Module:
    """Build a registered backbone with its head, Kaiming-initialised (the head small).

    Inputs are patches in [0, 1]; the model subtracts ``pixel_mean`` and divides by
    ``pixel_std`` first (the data set's statistics, kept as buffers in the state dict).
    ``multi_scale=True`` builds two independent backbones (one per patch scale) under the
    `MultiScale` wrapper; the model is then called as ``model(x_big, x_small)``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(list_models())}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be at least 1, got {in_chans}")
    if feature_dim < 1:
        raise ValueError(f"feature_dim must be at least 1, got {feature_dim}")
    build = _REGISTRY[name]
    model: nn.Module
    if multi_scale:
        model = MultiScale(build(in_chans=in_chans, width=width, feature_dim=feature_dim),
                           build(in_chans=in_chans, width=width, feature_dim=feature_dim),
                           num_classes, in_chans, dropout, pixel_mean, pixel_std)
    else:
        model = Classifier(build(in_chans=in_chans, width=width, feature_dim=feature_dim),
                           num_classes, in_chans, dropout, pixel_mean, pixel_std)
    _init_weights(model)
    return model


# --------------------------------------------------------------------------- the experiment's network

def build_model(cfg: "ExperimentConfig", num_classes: int, inputs: Any = None) -> nn.Module:
    """The experiment's network (``model.*``, ``data.multi_scale``), freshly initialised."""
    return create_model(**model_kwargs(cfg, num_classes, inputs))


def model_kwargs(cfg: "ExperimentConfig", num_classes: int, inputs: Any = None) -> dict[str, Any]:
    """:func:`create_model` arguments of the experiment's network (with the fold's pixel
    statistics when ``inputs``, a :class:`ipb_ray.distributed.training.FoldInputs`, is
    given; a loaded state dict brings its own)."""
    stats = dict(pixel_mean=inputs.pixel_mean, pixel_std=inputs.pixel_std) if inputs is not None else {}
    return dict(name=cfg.model.backbone, num_classes=num_classes, in_chans=1, width=cfg.model.width,
                feature_dim=cfg.model.feature_dim, dropout=cfg.model.dropout, multi_scale=cfg.data.multi_scale,
                **stats)
