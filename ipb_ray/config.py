"""Typed experiment configuration: one tree of frozen dataclasses.

Every default lives here and is the paper's value (shared/IPB.md); a preset or a user
YAML only states what differs. The same object feeds the CLI, Ray Tune's param_space
and MLflow params (:func:`flatten`).

Loading order: defaults <- preset chain (``extends:``) <- YAML file <- dotted overrides
(``method.mpl.threshold=0.7``). Errors name the file, the dotted key, the bad value and what
is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from ipb_ray.params import ConfigError, Params, check_fields, check_value, param
from ipb_ray.params import field_spec as _f
from ipb_ray.patches.ops import GRAY_STRONG_OPS, STRONG_OPS

__all__ = [
    "AugmentConfig", "BACKBONES", "ConfigError", "DataConfig", "dump_yaml", "EvalConfig",
    "ExperimentConfig", "flatten", "from_dict", "GROUP_BY_KINDS", "key_type", "LABEL_STAGES",
    "list_presets", "load_config", "MethodConfig", "ModelConfig", "OPTIMIZERS", "param", "Params",
    "parse_override", "reference_markdown", "ResourcesConfig", "RETIRED", "RUNNERS", "SCHEDULES", "SegmentationConfig",
    "SplitConfig", "to_dict", "TrackingConfig", "validate_all",
]

#: Backbones shipped with the model registry (the *_tiny ones and cnn_small are CPU-sized
#: for tests and the demo; patch_stats is a linear model of patch statistics for smoke
#: tests). ``model.backbone`` is checked against the registry itself
#: (:func:`ipb_ray.nn.models.list_models`), so a ``@register_model`` backbone is valid too.
BACKBONES = ("vgg19_bn", "hrnet", "vgg_tiny", "hrnet_tiny", "cnn_small", "patch_stats")
LABEL_STAGES = ("auto", "tasks", "actors")
#: who runs a fold's training engine (resources.runner)
RUNNERS = ("auto", "ray_train", "in_process")
SCHEDULES = ("cosine", "constant", "step")
OPTIMIZERS = ("sgd", "adamw")


def _section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"doc": (cls.__doc__ or "").strip()})


@dataclass(frozen=True)
class SegmentationConfig:
    """Colony segmentation of a raw frame (paper: blur, entropy, Otsu, opening, fill, size filter)."""

    blur_ksize: int = _f(3, lo=1, hi=31, odd=True, doc="Gaussian blur kernel, px (odd)")
    entropy_radius: int = _f(3, lo=1, hi=15, doc="disk radius of the local entropy filter, px")
    opening_radius: int = _f(3, lo=0, hi=15, doc="disk radius of the morphological opening, px")
    min_object_px: int = _f(2000, lo=0, doc="objects smaller than this many px are dropped")
    fill_holes: bool = _f(True, doc="fill holes inside colony regions")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how patches are cut from it."""

    frames: str | None = _f(None, doc="directory or glob of raw frames (TIFF/PNG/JPEG)")
    annotations: str | None = _f(None, doc="annotation table (CSV/Parquet) joined to the colonies")
    catalog: str = _f("catalog", doc="colony catalog: a Parquet data set directory")
    class_names: tuple[str, ...] = _f((), doc="class names; empty = taken from the data")
    pixel_size_um: float = _f(0.8, lo=1e-3, hi=1e3, doc="µm per pixel")
    patch_size: int = _f(128, lo=8, hi=2048, doc="single-scale patch side, px")
    multi_scale: bool = _f(True, doc="two streams: global patch and its centre")
    global_patch: int = _f(224, lo=8, hi=2048, doc="multi-scale global patch side, px")
    local_patch: int = _f(112, lo=4, hi=2048, doc="multi-scale local (centre) patch side, px")
    multi_label: bool = _f(True, doc="put multi-label colonies into the unlabelled set U")
    min_foreground: float = _f(0.25, lo=0.0, hi=1.0, doc="minimum colony fraction of a patch")
    window: str = _f("inside", choices=("inside", "whole"),
                     doc="inside: windows cut inside each colony (the paper); whole: each crop stretched to the "
                         "patch side (single cells or objects smaller than a patch)")
    point_box: int = _f(0, lo=0, hi=4096, doc="point annotations (x,y) become a fixed box of this side, px, "
                        "centred on the point, with no colony segmentation (touching single cells); a point "
                        "closer than half a box to the frame's edge is rejected. 0 = a point names the "
                        "segmented colony under it")
    channel: int = _f(0, lo=0, hi=1024, doc="the channel read from a multi-channel stack (OME-TIFF, OME-Zarr, ND2), "
                      "counted from 0")
    z_plane: int = _f(-1, lo=-1, hi=100_000, doc="the z-plane read from a stack with a Z axis (-1 = the middle one)")
    segmentation: SegmentationConfig = _section(SegmentationConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.local_patch > self.global_patch:
            raise ConfigError(f"{self.local_patch} is larger than data.global_patch "
                              f"({self.global_patch}); the local patch is the global patch's centre",
                              key="local_patch")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"{list(self.class_names)} has repeated names", key="class_names")


@dataclass(frozen=True)
class SplitConfig:
    """Cross-validation: disjoint test folds T; L and U carved from the rest."""

    folds: int = _f(10, lo=2, hi=100, doc="number of CV folds; each test fold T is 1/folds")
    labelled_fraction: float = _f(0.1, lo=1e-4, hi=0.98, doc="share of the single-labelled colonies put in L per fold")
    val_fraction: float = _f(0.2, lo=0.0, hi=0.9, doc="share of L held out for model selection")
    fold: int = _f(0, lo=0, doc="fold run by `ipb train`")
    group_by: str | None = _f(None, doc="colonies that share a group share a test fold: column:<name> (a catalog or "
                              "annotation column, e.g. column:well) or regex:<pattern with one (...) group> "
                              "on the source frame path; None = every colony its own group")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.labelled_fraction + 1.0 / self.folds >= 1.0:
            raise ConfigError(
                f"{self.labelled_fraction} plus the test share 1/{self.folds} leaves no unlabelled "
                "data; lower split.labelled_fraction or raise split.folds", key="labelled_fraction")
        if self.fold >= self.folds:
            raise ConfigError(f"{self.fold} is out of range; allowed [0, {self.folds - 1}]", key="fold")
        if self.group_by is not None:
            _check_group_by(self.group_by)


#: Kinds of ``split.group_by``: a column of the catalog (or of the annotation table, kept
#: at import), or a regular expression whose one group picks the name from the source path.
GROUP_BY_KINDS = ("column", "regex")


def _check_group_by(text: str) -> None:
    kind, sep, arg = text.partition(":")
    if not sep or kind not in GROUP_BY_KINDS or not arg.strip():
        raise ConfigError(f"{text!r} is not a grouping; write column:<name> (e.g. column:well) or "
                          "regex:<pattern> whose one (...) group names the group in the source frame path "
                          "(e.g. regex:(well[0-9]+)_t)", key="group_by")
    if kind == "regex":
        try:
            groups = re.compile(arg).groups
        except re.error as exc:
            raise ConfigError(f"'{arg}' is not a valid regular expression ({exc})", key="group_by") from None
        if groups != 1:
            raise ConfigError(f"regex '{arg}' has {groups} capture groups; it needs exactly one, around the "
                              "part of the source path that names the group, e.g. regex:(well[0-9]+)_t",
                              key="group_by")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone shared by teacher and student."""

    backbone: str = _f("hrnet", doc="registered backbone name (ipb_ray.nn.models.list_models())")
    width: float = _f(1.0, lo=0.01, hi=8.0, doc="channel width multiplier")
    feature_dim: int = _f(512, lo=2, hi=8192, doc="per-stream feature length before the head")
    dropout: float = _f(0.0, lo=0.0, hi=0.99, doc="dropout before the classifier")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.backbone in BACKBONES:  # shipped with the registry (tests keep the two in step)
            return
        from ipb_ray.nn.models import list_models  # the registry decides, so @register_model works

        known = list_models()
        if self.backbone not in known:
            close = difflib.get_close_matches(self.backbone, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{self.backbone!r} is not a registered backbone{hint}; registered: "
                              f"{', '.join(known)} (add your own with @ipb_ray.nn.models.register_model)",
                              key="backbone")


def _method_sections() -> dict[str, type]:
    from ipb_ray.methods import param_sections  # the registries decide (no torch, no Ray)

    return param_sections()


@dataclass(frozen=True)
class MethodConfig:
    """Training method and its optimisation (paper: SGD lr 0.005, wd 1e-4, momentum 0.9).

    The keys here are read by the loop for every method (and, from ``balancer`` to
    ``finetune_lr``, by every semi-supervised one). Each method's and balancer's own
    hyperparameters are a section of their own: ``method.mpl.*`` (MPL and IPB),
    ``method.pseudo_label.*``, ``method.pseudo_balance.*``, ... (``ipb config methods``)."""

    name: str = _f("ipb", doc="registered method (ipb_ray.methods.list_methods())")
    balancer: str | None = _f(None, doc="balancer of a semi-supervised method's unlabelled stream "
                              "(ipb_ray.methods.list_balancers()); None = the method's own (ipb: pseudo_balance, "
                              "others: none)")
    epochs: int = _f(200, lo=1, doc="epochs of the method's main stage (supervised; MPL/IPB; ...)")
    teacher_epochs: int = _f(200, lo=0, doc="epochs of supervised pre-training on balanced L before the "
                             "unlabelled stage (MPL/IPB: the teacher's; other methods: their model's)")
    batch_size: int = _f(32, lo=1, hi=65536, doc="labelled batch size per worker")
    unlabelled_batch_size: int = _f(32, lo=1, hi=65536, doc="unlabelled batch size per worker")
    steps_per_epoch: int | None = _f(None, lo=1, doc="optimizer steps per epoch (supervised, pre-training "
                                     "and unlabelled stages); None = one pass: |L| labelled draws "
                                     "(supervised) or draws_per_epoch unlabelled ones (semi-supervised)")
    optimizer: str = _f("sgd", choices=OPTIMIZERS, doc="sgd (the paper's, with momentum) | adamw")
    schedule: str = _f("cosine", choices=SCHEDULES, doc="lr schedule per optimizer step: cosine decay "
                       "after a linear warm-up, constant, or step (x0.1 at half the steps)")
    warmup_fraction: float = _f(0.05, lo=0.0, hi=0.5, doc="share of a phase's steps with linear lr warm-up")
    shuffle: bool = _f(True, doc="every training stream streams its epoch's draw in a seeded random order "
                       "over the whole epoch, from (seed, epoch, stream); false: in plan order")
    lr: float = _f(0.005, lo=0.0, hi=10.0, doc="lr of supervised training, pre-training and single-network "
                   "semi-supervised stages")
    weight_decay: float = _f(1e-4, lo=0.0, hi=1.0)
    momentum: float = _f(0.9, lo=0.0, hi=0.999)
    nesterov: bool = _f(False)
    label_smoothing: float = _f(0.0, lo=0.0, hi=0.5)
    finetune_epochs: int = _f(0, lo=0, doc="semi-supervised methods: epochs of fine-tuning the selected network "
                              "on (balanced) L after the unlabelled stage, its own stage selected on V (the IPB "
                              "authors' last step; 0 = off). Both test results are kept: before and after")
    finetune_lr: float = _f(3e-5, lo=0.0, hi=10.0, doc="fine-tuning lr (the authors': 3e-5 with SGD)")
    keep_start: bool = _f(True, doc="semi-supervised methods: the pre-trained network on L competes on V with "
                          "what the unlabelled stage makes, and fine-tuning must beat the choice it starts from, so a "
                          "run never returns a network worse on V than the supervised one it started from (false: "
                          "only the unlabelled stage's networks are chosen from and fine-tuning selects anew, as "
                          "before)")
    balance_labelled: bool = _f(True, doc="class-balance L by resampling")
    draws_per_epoch: int | None = _f(None, lo=1, doc="unlabelled patches per epoch of an unlabelled stage "
                                     "(pseudo_balance: multinomial draws); None = |U|")
    grad_clip: float = _f(0.0, lo=0.0, doc="max grad norm; 0 = off")
    mixed_precision: bool = _f(True, doc="autocast on GPU (ignored on CPU)")
    sections: tuple[tuple[str, Any], ...] = field(
        default=(), metadata={"sections": _method_sections,
                              "doc": "the registered methods' and balancers' own sections, by name"})

    def __post_init__(self) -> None:
        check_fields(self)
        from ipb_ray.methods import get_method, list_balancers  # the registries decide (no torch, no Ray)

        try:
            method = get_method(self.name)
        except ValueError as exc:
            raise ConfigError(str(exc), key="name") from None
        if self.balancer is not None and not method.semi_supervised:
            raise ConfigError(f"method {self.name!r} streams no unlabelled data, so it has nothing to balance; "
                              "remove method.balancer or choose a semi-supervised method", key="balancer")
        if self.balancer not in (None, "none") and method.semi_supervised and not method.pseudo_labelling:
            raise ConfigError(f"method {self.name!r} learns from U without pseudo-labels, so balancer "
                              f"{self.balancer!r} has nothing to balance; remove method.balancer", key="balancer")
        if self.balancer is not None and self.balancer not in list_balancers():
            raise ConfigError(f"{self.balancer!r} is not a registered balancer; choose one of "
                              f"{', '.join(list_balancers())}", key="balancer")
        given = dict(self.sections)
        known = _method_sections()
        for name, value in given.items():
            if name not in known:
                raise ConfigError(f"no registered method or balancer has a section {name!r}; sections: "
                                  f"{', '.join(known)}", key=name)
            if not isinstance(value, known[name]):
                raise ConfigError(f"expected {known[name].__qualname__}, got {type(value).__name__}", key=name)
        object.__setattr__(self, "sections", tuple((n, given.get(n) or cls()) for n, cls in known.items()))

    def __getattr__(self, name: str) -> Any:
        """``cfg.method.mpl``: a section by name."""
        if not name.startswith("__"):
            for key, value in self.__dict__.get("sections", ()):
                if key == name:
                    return value
        raise AttributeError(f"{type(self).__name__} has no key or section {name!r}")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-view augmentation. The weak view (supervised stream, teacher pre-training,
    the labelled MPL stream, UDA's weak view) follows the paper: flips, rotation,
    brightness/contrast jitter, blur. The strong view (UDA/MPL) is RandAugment for
    grayscale microscopy at a capped magnitude, then cutout."""

    flip_p: float = _f(0.5, lo=0.0, hi=1.0, doc="probability of each of the horizontal and vertical flips")
    rot90: bool = _f(True, doc="rotate by a random multiple of 90 degrees (lossless; colonies have no up)")
    rotate_p: float = _f(0.25, lo=0.0, hi=1.0, doc="probability of a free rotation")
    max_rotation: float = _f(180.0, lo=0.0, hi=360.0, doc="free rotation angle range, degrees")
    jitter_p: float = _f(0.25, lo=0.0, hi=1.0, doc="probability of the brightness/contrast jitter")
    brightness: float = _f(0.2, lo=0.0, hi=1.0, doc="brightness factor range 1 +- this")
    contrast: float = _f(0.2, lo=0.0, hi=1.0, doc="contrast factor range 1 +- this")
    blur_p: float = _f(0.25, lo=0.0, hi=1.0, doc="probability of the 3x3 Gaussian blur")
    strong_ops: tuple[str, ...] = _f(GRAY_STRONG_OPS, doc="ops the strong view draws from")
    strong_n_ops: int = _f(2, lo=0, hi=10, doc="ops per strong view")
    strong_max_magnitude: float = _f(0.5, lo=0.0, hi=1.0, doc="cap of each op's magnitude (fraction of "
                                     "its range)")
    cutout: float = _f(0.25, lo=0.0, hi=1.0, doc="largest cutout side, fraction of the patch side")

    def __post_init__(self) -> None:
        check_fields(self)
        bad = [op for op in self.strong_ops if op not in STRONG_OPS]
        if bad or not self.strong_ops:
            raise ConfigError(f"{list(self.strong_ops)} has unknown ops {bad}; choose from {', '.join(STRONG_OPS)}"
                              if bad else "is empty; name at least one op (e.g. identity)", key="strong_ops")


@dataclass(frozen=True)
class EvalConfig:
    """How a network is evaluated (validation V, test T, IPB's labelling pass)."""

    tta: int = _f(1, lo=1, hi=64, doc="test windows per colony: the mask-centre window plus tta - 1 seeded "
                  "random ones, averaged in softmax space")
    bn_recalibrate: bool = _f(True, doc="re-estimate BatchNorm statistics on un-augmented L, shuffled and in "
                              "the class mix of training (balanced unless method.balance_labelled=false), "
                              "before every validation, test and labelling pass")
    bn_batches: int = _f(16, lo=1, hi=100_000, doc="batches of L drawn to re-estimate the statistics")
    batch_size: int = _f(0, lo=0, hi=65536, doc="windows per forward pass of validation, the test and IPB's "
                         "labelling pass (eval mode: the predictions do not depend on it, the speed does); "
                         "0 = the training batch (method.batch_size). On a CPU small batches are the faster "
                         "(cache-sized: benchmarks/eval_batch.py measures it); raise it on a GPU")
    every: int = _f(1, lo=1, hi=100_000, doc="validate on V (and re-estimate BatchNorm for it) every this many "
                    "epochs of a stage, and always at a stage's last epoch; the best-on-V choice is made among "
                    "the validated epochs. Epochs in between report the last validation's objective. 1 = every "
                    "epoch (the figures of RESULTS.md)")
    cache_mb: int = _f(256, lo=0, hi=1_000_000, doc="rank 0 keeps the patches of V and of the BatchNorm "
                       "stream in memory after the first epoch when they fit in this many MB (they are the same "
                       "windows every epoch), instead of cutting them again before every validation; 0 = cut "
                       "them every time")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class ResourcesConfig:
    """Ray cluster and worker resources."""

    address: str | None = _f(None, doc="Ray address; None starts a local cluster")
    num_workers: int = _f(1, lo=0, hi=4096, doc="Ray Train workers; 0 = run in the driver")
    runner: str = _f("auto", choices=RUNNERS, doc="who runs a fold: ray_train (Ray Train workers, or its local "
                     "mode with num_workers=0), in_process (this process alone, no Ray: one rank, patches cut "
                     "on a thread; needs num_workers=0); auto = in_process when num_workers=0, except in a Tune "
                     "trial (its reports go through Ray Train)")
    use_gpu: bool = _f(False)
    cpus_per_worker: float = _f(1.0, lo=0.0, hi=1024.0)
    torch_threads: int | None = _f(None, lo=1, hi=1024, doc="intra-op threads of each Train worker's torch; "
                                   "None = what Ray sets (its CPUs). On a small machine whose data tasks "
                                   "are light, all cores speed a CPU step up although Ray reserves fewer")
    gpus_per_worker: float = _f(1.0, lo=0.0, hi=16.0, doc="used only with use_gpu")
    teacher_actors: int = _f(1, lo=1, hi=1024, doc="actors of the pseudo-labelling stage (label_stage=actors)")
    label_stage: str = _f("auto", choices=LABEL_STAGES, doc="IPB labelling pass on Ray tasks or an actor pool; "
                          "auto = actors when label_gpus > 0, else tasks")
    label_gpus: float = _f(0.0, lo=0.0, hi=16.0, doc="GPUs per labelling actor (leave room beside the Train "
                           "workers' gpus_per_worker)")
    data_cpus: float = _f(1.0, lo=0.01, hi=64.0,
                          doc="CPUs per patch task and read task; fractions on small machines")
    data_workers: int | None = _f(None, lo=1, hi=4096, doc="patch tasks running at once per stream; None = "
                                  "the cluster's CPUs minus the Train workers' (at least 1). Each task is a "
                                  "Python process importing torch: on a small machine more tasks only add "
                                  "start-up time")
    checkpoints_to_keep: int = _f(2, lo=1, hi=1000, doc="Ray Train checkpoints kept per run")
    max_failures: int = _f(3, lo=0, hi=1000, doc="worker failures a run survives (restarts from checkpoint)")
    object_store_mb: int | None = _f(None, lo=64, doc="object store size of a local cluster")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.runner == "in_process" and self.num_workers > 0:
            raise ConfigError(f"in_process runs one rank in this process; resources.num_workers="
                              f"{self.num_workers} asks for Ray Train workers. Set resources.num_workers=0, or "
                              "resources.runner=ray_train", key="runner")


@dataclass(frozen=True)
class TrackingConfig:
    """Where results go: MLflow and Ray Train storage."""

    tracking_uri: str = _f("sqlite:///mlflow.db", doc="MLflow tracking URI")
    experiment: str = _f("ipb-ray", doc="MLflow experiment name")
    storage_path: str = _f("ray_results", doc="Ray Train checkpoint storage (shared on clusters)")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.experiment.strip():
            raise ConfigError("must not be empty", key="experiment")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: data, splits, model, method, resources and tracking."""

    name: str = _f("ipb", doc="run name")
    preset: str | None = _f(None, doc="preset this config was resolved from")
    seed: int = _f(0, lo=0, hi=2**32 - 1, doc="root seed of every random choice")
    data: DataConfig = _section(DataConfig)
    split: SplitConfig = _section(SplitConfig)
    model: ModelConfig = _section(ModelConfig)
    method: MethodConfig = _section(MethodConfig)
    augment: AugmentConfig = _section(AugmentConfig)
    eval: EvalConfig = _section(EvalConfig)
    resources: ResourcesConfig = _section(ResourcesConfig)
    tracking: TrackingConfig = _section(TrackingConfig)

    def __post_init__(self) -> None:
        check_fields(self)

    def replace(self, *overrides: str) -> "ExperimentConfig":
        """A copy with dotted overrides applied (``"method.mpl.threshold=0.7"``)."""
        data = to_dict(self)
        for item in overrides:
            key, value = parse_override(item)
            _set_dotted(data, key, value, source="override")
        return from_dict(data)


# --------------------------------------------------------------------------- conversion

def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) ready for YAML/JSON."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            out: dict[str, Any] = {}
            for f in dataclasses.fields(v):
                if "sections" in f.metadata:  # named sections sit beside the section's own keys
                    out.update((name, conv(sub)) for name, sub in getattr(v, f.name))
                else:
                    out[f.name] = conv(getattr(v, f.name))
            return out
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key dict (``{"method.mpl.threshold": 0.65, ...}``) for MLflow params and Tune."""
    out: dict[str, Any] = {}
    for key, value in to_dict(cfg).items() if dataclasses.is_dataclass(cfg) else cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def reference_markdown() -> str:
    """Every config key with its default, allowed values and meaning, as Markdown
    (``docs/config.md`` is this text; a test keeps the two equal)."""
    out = ["# Configuration keys", "",
           "Generated from `ipb_ray/config.py` by `ipb config reference > docs/config.md`; a test fails when",
           "the two differ. Any key can be overridden on the command line as a dotted key",
           "(`method.mpl.threshold=0.7`). Which `method.*` keys each method reads: `ipb config methods`.", ""]

    def section(name: str, doc: str, cls: type) -> None:
        out.extend(["", f"## `{name}`", "", " ".join(doc.split()), "",
                    "| key | default | allowed | meaning |", "|---|---|---|---|"])
        rows(cls, f"{name}.")

    def rows(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if "sections" in meta:  # the registered methods' and balancers' own sections
                for name, sub in meta["sections"]().items():
                    section(f"{prefix}{name}", sub.__doc__ or "", sub)
                continue
            if "doc" in meta and f.default_factory is not dataclasses.MISSING:  # a section
                section(f"{prefix}{f.name}", str(meta["doc"]), f.default_factory)
                continue
            allowed = []
            if meta.get("choices"):
                allowed.append(" \\| ".join(str(c) for c in meta["choices"]))
            lo, hi = meta.get("lo"), meta.get("hi")
            if lo is not None or hi is not None:
                allowed.append(f"[{lo}, {hi}]" if lo is not None and hi is not None else
                               f">= {lo}" if lo is not None else f"<= {hi}")
            default = f.default if f.default is not dataclasses.MISSING else ""
            doc = " ".join(str(meta.get("doc", "")).split()).replace("|", "\\|")
            out.append(f"| `{prefix}{f.name}` | `{default!r}` | {'; '.join(allowed)} | {doc} |")

    out.extend(["| key | default | allowed | meaning |", "|---|---|---|---|"])
    rows(ExperimentConfig, "")
    return "\n".join(out) + "\n"


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError("null is not allowed here; give a value or remove the key", key=key)
    if typing.get_origin(inner) is tuple:
        (item_tp, *_rest) = typing.get_args(inner)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{value!r} should be a list", key=key)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{value!r} should be true or false", key=key)
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{value!r} should be a whole number", key=key)
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{value!r} should be a number", key=key)
        if not math.isfinite(value):
            raise ConfigError(f"{value!r} is not a finite number; give a value such as 0.5", key=key)
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise ConfigError(f"{value!r} should be a string (in a YAML file, write it in quotes: '{value}')", key=key)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def from_dict(data: Mapping[str, Any], cls: type = ExperimentConfig, source: str = "",
              _prefix: str = "") -> Any:
    """Build ``cls`` from a nested mapping, rejecting unknown keys with a suggestion; raises
    the first problem (the one parser, :func:`_collect`, finds them all)."""
    errors: list[ConfigError] = []
    built = _collect(data, cls, source, _prefix, errors)
    if errors:
        raise errors[0]
    return built


def _fields_and_sections(cls: type) -> tuple[list[str], dict[str, type], str]:
    """A section's own key names, its named sub-sections (``{name: dataclass}``, from a field
    whose metadata has ``sections``) and the name of the field that holds them."""
    names, sections, holder = [], {}, ""
    for f in dataclasses.fields(cls):
        if "sections" in f.metadata:
            sections, holder = f.metadata["sections"](), f.name
        else:
            names.append(f.name)
    return names, sections, holder


#: Keys that are gone, with what to write instead.
RETIRED = {
    "method.shuffle_buffer": "is gone: training streams are now shuffled over the whole epoch, with no buffer in the "
                             "training process; delete the key (or write 'method.shuffle: false' for no shuffling)",
}


def _unknown_key(key: Any, names: Sequence[str], prefix: str, source: str,
                 sections: Mapping[str, type] | None = None) -> ConfigError:
    if f"{prefix}{key}" in RETIRED:
        return ConfigError(RETIRED[f"{prefix}{key}"], key=f"{prefix}{key}", source=source)
    owners = [name for name, sub in (sections or {}).items()
              if str(key) in {f.name for f in dataclasses.fields(sub)}]
    if owners:  # a key that moved from the flat method section into a method's own section
        where = " or ".join(f"'{prefix}{o}.{key}'" for o in owners)
        return ConfigError(f"is a method's own key now: write {where} (`ipb config methods` lists each "
                           "method's keys)", key=f"{prefix}{key}", source=source)
    names = [*names, *(sections or {})]
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys here: {', '.join(names)}"
    return ConfigError(f"unknown key{hint}", key=f"{prefix}{key}", source=source)


def _collect(data: Any, cls: type, source: str, prefix: str, errors: list[ConfigError]) -> Any:
    """The configuration parser: ``cls`` built from a nested mapping, every problem appended to
    ``errors`` (:func:`from_dict` raises the first, :func:`validate_all` lists them all).

    Each key is coerced and range-checked on its own; a section's ``__post_init__``
    (its cross-field checks) runs only once all its own values are valid, so a bad
    value is not reported a second time through a check that depends on it. Returns
    the built object, or None when the section has an error.
    """
    if not isinstance(data, Mapping):
        errors.append(ConfigError(f"expected a mapping of keys, got {type(data).__name__}",
                                  key=prefix.rstrip("."), source=source))
        return None
    hints = typing.get_type_hints(cls)
    names, sections, field_name = _fields_and_sections(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name in names}
    kwargs: dict[str, Any] = {}
    named: dict[str, Any] = {}
    valid = True
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key in sections:
            named[key] = _collect(value if value is not None else {}, sections[key], source, dotted + ".", errors)
            valid = valid and named[key] is not None
            continue
        if key not in fields:
            errors.append(_unknown_key(key, list(fields), prefix, source, sections))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            sub = _collect(value if value is not None else {}, tp, source, dotted + ".", errors)
            valid = valid and sub is not None
            kwargs[key] = sub
            continue
        try:
            kwargs[key] = _coerce(value, tp, dotted)
            check_value(fields[key], kwargs[key], key=dotted)
        except ConfigError as exc:
            errors.append(ConfigError(exc.detail, key=exc.key, source=source))
            valid = False
    if not valid:
        return None
    if named:
        kwargs[field_name] = tuple(named.items())
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        full = f"{prefix}{exc.key}" if exc.key else prefix.rstrip(".")
        errors.append(ConfigError(exc.detail, key=full, source=source))
        return None


# --------------------------------------------------------------------------- loading

def key_type(key: str) -> Any:
    """The declared type of a dotted config key (``"data.frames"`` -> ``str | None``), or
    None for a key no section declares (a method's own section included)."""
    cls: Any = ExperimentConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None
        names, sections, _ = _fields_and_sections(cls)
        if part in sections:
            cls = sections[part]
            continue
        if part not in names:
            return None
        cls = typing.get_type_hints(cls)[part]
    return None if dataclasses.is_dataclass(cls) else cls


def _is_text(tp: Any) -> bool:
    return _is_optional(tp)[1] is str


_QUOTES = ('"', "'")


def _literal_text(raw: str, tp: Any) -> str | None:
    """A string setting's value as written: a path such as ``H/plate #2``, a glob such as
    ``*.tif`` or a folder named ``2024`` stays exactly that (YAML would read a comment, an
    alias and a number). ``null`` (or ``~``, or nothing) clears an optional setting; a
    value in matching quotes is unquoted the YAML way, which is how to write a path that
    is literally named ``null``."""
    text = raw.strip()
    if text in ("null", "~", "Null", "NULL") or (text == "" and _is_optional(tp)[0]):
        return None  # refused with its own message where the setting is not optional
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return raw
        return value if isinstance(value, str) else raw
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """``"method.mpl.threshold=0.7"`` -> ``("method.mpl.threshold", 0.7)``: values are YAML
    scalars, except for string settings (paths, globs, names), which are taken literally
    (:func:`_literal_text`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} should look like section.key=value "
                          "(e.g. method.mpl.threshold=0.7)", source="override")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key", source="override")
    tp = key_type(key)
    if tp is not None and _is_text(tp):
        return key, _literal_text(raw, tp)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {raw!r}: {exc}", key=key, source="override") from None
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"'{'.'.join(parts[:i + 1])}' is a value, not a section",
                              key=key, source=source)
        node = nxt
    node[parts[-1]] = value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _preset_dir() -> Any:
    return resources.files("ipb_ray") / "presets"


def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of sections, got {type(data).__name__}",
                          source=source)
    return data


def _resolve_layers(ref: str, seen: tuple[str, ...] = (), base_dir: Path | None = None,
                    as_preset: bool = False) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """Layers (source, dict) from the root of the ``extends`` chain to ``ref``.

    ``ref`` is a preset name or a YAML path (relative paths resolve against the
    file that extends them). Returns the layers and the preset name, if any.
    """
    path = Path(ref)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not as_preset and (ref.endswith((".yaml", ".yml")) or path.is_file()):
        if not path.is_file():
            raise ConfigError(f"config file {ref!r} not found (looked at {path.resolve()})",
                              source=str(path))
        source, text, preset, parent_dir = str(path), path.read_text(), None, path.parent
    else:
        names = list_presets()
        if ref not in names:
            close = difflib.get_close_matches(ref, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"no preset or file named {ref!r}{hint} "
                              f"(presets: {', '.join(names)})", source=ref)
        source = f"preset {ref}"
        text = (_preset_dir() / f"{ref}.yaml").read_text()
        preset, parent_dir = ref, None
    if source in seen:
        raise ConfigError(f"'extends' makes a loop: {' -> '.join(seen + (source,))}", source=source)
    data = _read_yaml(text, source)
    parent = data.pop("extends", None)
    layers: list[tuple[str, dict[str, Any]]] = []
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError("'extends' must name a preset or a YAML file", key="extends",
                              source=source)
        layers, parent_preset = _resolve_layers(parent, seen + (source,), parent_dir)
        preset = preset or parent_preset
    layers.append((source, data))
    return layers, preset


def load_config(ref: str | Path | None = None, overrides: Sequence[str] = (),
                preset: str | None = None) -> ExperimentConfig:
    """Resolve a config: defaults <- preset/extends chain <- file <- overrides.

    ``ref`` is a YAML path or a preset name; ``preset`` names a preset explicitly
    (both may be given: the file then extends the preset unless it says otherwise).
    Raises the first :class:`ConfigError`; :func:`validate_all` lists them all.
    """
    source, merged = "", {}
    for source, merged in _stages(ref, overrides, preset):
        from_dict(merged, source=source)  # validate as each layer lands, so errors name it
    return from_dict(merged, source=source)


def validate_all(ref: str | Path | None = None, overrides: Sequence[str] = (),
                 preset: str | None = None) -> list[ConfigError]:
    """Every problem :func:`load_config` would meet, not just the first; [] = it loads.

    Each layer of the ``extends`` chain and each override is checked as it lands (as
    :func:`load_config` does), collecting every unknown key, bad type and out-of-range
    value of every section, each with its source, dotted key and fix. A file that
    cannot be read (missing, not YAML, an ``extends`` loop) stops the walk: that one
    error is returned.
    """
    errors: list[ConfigError] = []
    seen: set[tuple[str, str]] = set()
    try:
        for source, merged in _stages(ref, overrides, preset, errors=errors):
            found: list[ConfigError] = []
            _collect(merged, ExperimentConfig, source, "", found)
            for exc in found:  # a bad value left in place stays bad in every later stage
                if (exc.key, exc.detail) not in seen:
                    seen.add((exc.key, exc.detail))
                    errors.append(exc)
    except ConfigError as exc:
        errors.append(exc)
    return errors


def _stages(ref: str | Path | None, overrides: Sequence[str], preset: str | None,
            errors: list[ConfigError] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(source, merged dict)`` as each layer, then each override, lands.

    Unreadable layers raise. A malformed override raises, or, when ``errors`` is
    given, is appended there and skipped.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    preset_name = None
    if preset is not None:
        pl, preset_name = _resolve_layers(preset, as_preset=True)
        layers += pl
    if ref is not None:
        fl, file_preset = _resolve_layers(str(ref))
        layers += fl
        preset_name = file_preset or preset_name
    merged: dict[str, Any] = {}
    for source, data in layers:
        merged = _merge(merged, data)
        yield source, merged
    if preset_name is not None and "preset" not in merged:
        merged["preset"] = preset_name
        yield layers[-1][0], merged
    for item in overrides:
        try:
            key, value = parse_override(item)
            _set_dotted(merged, key, value, source="override")
        except ConfigError as exc:
            if errors is None:
                raise
            errors.append(exc)
            continue
        yield f"override {item!r}", merged
