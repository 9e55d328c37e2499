"""What a training method is, and the registry of them.

A method says *what* to train, never *how a run is kept*: the one Ray Train loop
(:class:`ipb_ray.engine.loop.Engine`) owns resume, checkpoints, BatchNorm
recalibration, validation, best-on-V selection, the test, reporting and the history
schema, and calls the method's hooks:

- :meth:`Method.stages` (pure, also used on the driver): the run as a list of
  :class:`Stage` s, each a number of epochs that either trains one network with
  cross-entropy on class-balanced L (the loop runs those itself) or runs the method's
  :meth:`Method.train_step` on paired labelled and unlabelled batches;
- :meth:`Method.build`: the networks and optimisers (worker side);
- :meth:`Method.begin_stage`: what changes when a stage starts (e.g. the student starts as
  the teacher);
- :meth:`Method.train_step`: one step of an unlabelled stage, returning its figures;
- :meth:`Method.state_dict` / :meth:`Method.load_state_dict`: anything beyond the
  networks and optimisers that a resumed run needs.

Semi-supervised methods draw their unlabelled stream through a balancer
(:mod:`ipb_ray.methods.balancers`): ``method.balancer`` picks one, or the method's own
default (``ipb`` is MPL with the pseudo-balancer).

Adding a method is one file: subclass :class:`Method`, decorate it with
``@register_method("name")`` and import it from :mod:`ipb_ray.methods` (or from your own
code before the configuration is loaded). Nothing here imports torch or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ipb_ray.methods.registry import Registry, own_keys, own_params

if TYPE_CHECKING:  # pragma: no cover
    from ipb_ray.config import ExperimentConfig

__all__ = ["LOOP_KEYS", "METHODS", "SEMI_KEYS", "Method", "OneNetworkMethod", "Registry", "Stage", "finetune_stage", "get_method",
           "list_methods", "own_keys", "own_params", "pretraining_stage", "register_method", "total_epochs"]


@dataclass(frozen=True)
class Stage:
    """A run's stretch of epochs with one job.

    ``net`` is the network the stage trains (labelled stages) or selects (unlabelled
    stages): it is recalibrated, validated on V (``val_*`` in the history) and, when
    ``select``, competes for the run's best on V. ``also_validate``: more networks
    validated each epoch (``<name>_val_balanced_accuracy``); those also in
    ``also_select`` compete for the best on V too (they must share ``net``'s architecture). ``restart``: selection
    starts anew, from the previous stage's choice loaded into ``net``; that choice is
    kept and tested too (``pre_<stage>_test_*``). Labelled stages step ``optimizer`` at
    ``lr`` (times the schedule); unlabelled ones leave the learning rates to the method."""

    name: str
    epochs: int
    net: str
    title: str = ""
    unlabelled: bool = False
    optimizer: str = ""
    lr: float = 0.0
    select: bool = True
    restart: bool = False
    also_validate: tuple[str, ...] = ()
    also_select: tuple[str, ...] = ()


#: ``method.*`` keys the loop reads for every method: the run's length, batches, optimiser,
#: schedule and labelled stream.
LOOP_KEYS = ("name", "epochs", "lr", "batch_size", "steps_per_epoch", "optimizer", "schedule", "warmup_fraction",
             "shuffle", "weight_decay", "momentum", "nesterov", "label_smoothing", "grad_clip",
             "balance_labelled", "mixed_precision")
#: ... and for every semi-supervised one: the unlabelled stream, pre-training and fine-tuning.
SEMI_KEYS = ("balancer", "teacher_epochs", "unlabelled_batch_size", "draws_per_epoch", "finetune_epochs",
             "finetune_lr", "keep_start")


class Method:
    """Base of every training method (see the module docstring).

    Class attributes: ``name`` (set by :func:`register_method`), ``title`` (one line for
    tables), ``semi_supervised`` (the run streams U), ``default_balancer`` (balancer of the
    unlabelled stream when ``method.balancer`` is not set), ``labeller`` (the network whose
    pseudo-labels a balancer draws on), ``step_metrics`` (per-step figures averaged into the
    epoch), ``loss_metric`` (the one of them that is the epoch's ``train_loss``),
    ``baseline`` (the method others are compared with), ``pseudo_labelling`` (False for a
    semi-supervised method that learns from U without pseudo-labels, e.g. SimCLR: it takes
    no balancer but ``none``), ``params`` (its own hyperparameters:
    a frozen :class:`ipb_ray.config.Params` dataclass, configured as
    ``method.<section>.<key>`` and read as ``self.p``; ``section`` defaults to the registered
    name, and a subclass sharing its parent's hyperparameters keeps the parent's section)."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    semi_supervised: ClassVar[bool] = False
    default_balancer: ClassVar[str] = "none"
    labeller: ClassVar[str] = ""
    step_metrics: ClassVar[tuple[str, ...]] = ()
    loss_metric: ClassVar[str] = ""
    baseline: ClassVar[bool] = False
    params: ClassVar[type | None] = None
    section: ClassVar[str] = ""
    pseudo_labelling: ClassVar[bool] = True  # a semi-supervised method whose steps make pseudo-labels

    def __init__(self, cfg: "ExperimentConfig", ctx: Any):
        self.cfg, self.m, self.ctx = cfg, cfg.method, ctx
        self.p: Any = own_params(type(self), cfg)
        self.balancer: Any = None  # the run's balancer on this rank, set by the loop (None outside it)
        self.nets: dict[str, Any] = {}
        self.opts: dict[str, Any] = {}

    # ---- driver and worker: the plan of the run
    @classmethod
    def stages(cls, cfg: "ExperimentConfig") -> list[Stage]:
        raise NotImplementedError

    @classmethod
    def balancer_name(cls, cfg: "ExperimentConfig") -> str:
        return cfg.method.balancer or cls.default_balancer

    @classmethod
    def keys(cls, cfg: "ExperimentConfig") -> tuple[str, ...]:
        """The ``method.*`` keys a run of this method under ``cfg`` reads (its balancer's too),
        relative to ``method.`` (``"lr"``, ``"mpl.threshold"``)."""
        if not cls.semi_supervised:
            return LOOP_KEYS + own_keys(cls)
        from ipb_ray.methods.balancers import get_balancer

        return LOOP_KEYS + SEMI_KEYS + own_keys(cls) + own_keys(get_balancer(cls.balancer_name(cfg)))

    # ---- worker side
    def build(self) -> None:
        """Fill ``self.nets`` (``ctx.network(seed)`` builds one, DDP-prepared) and ``self.opts``."""
        raise NotImplementedError

    def begin_stage(self, stage: Stage) -> None:
        """Called on every rank when ``stage`` starts (not again when a run resumes inside it)."""

    def train_step(self, stage: Stage, labelled: dict[str, Any], unlabelled: dict[str, Any], *,
                   step: int, lr_factor: float, stage_epoch: int) -> dict[str, Any]:
        """One step of an unlabelled stage: the figures of :attr:`step_metrics` (floats) and,
        optionally, ``pseudo_labels`` (one class index per unlabelled patch of the batch).
        ``step`` counts this worker's steps of the run's unlabelled stages from 0 (e.g. the
        clock of a ramp of lambda_u); ``lr_factor`` is the run's schedule at this step of the
        stage; ``stage_epoch`` is the epoch within the stage."""
        raise NotImplementedError(f"method {self.name!r} has no unlabelled stage")

    def adjust(self, logits: Any) -> Any:
        """Pseudo-label logits (B, C) of an unlabelled batch as the run's balancer corrects
        them (e.g. ``logit_adjust``); call it once per step on the logits a method takes its
        pseudo-labels from."""
        return self.balancer.adjust(logits) if self.balancer is not None else logits

    def epoch_metrics(self, stage: Stage) -> dict[str, Any]:
        """Extra figures of an epoch of ``stage`` (e.g. learning rates), every rank."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class OneNetworkMethod(Method):
    """Base of the semi-supervised methods that train one network, ``model``, which also
    labels U (Pseudo-Label, FixMatch): the optional ``warmup`` pre-training on L, the
    method's unlabelled stage (``stage_name``, ``stage_title``), the optional fine-tuning;
    one optimiser ``model`` at ``method.lr`` (and ``finetune``). Subclasses write
    :meth:`train_step`; its step figures are ``loss`` (the epoch's ``train_loss``), ``loss_l``,
    ``loss_u`` and ``mask_rate``."""

    semi_supervised = True
    labeller = "model"
    step_metrics = ("loss", "loss_l", "loss_u", "mask_rate")
    loss_metric = "loss"
    stage_name: ClassVar[str] = ""
    stage_title: ClassVar[str] = ""

    @classmethod
    def stages(cls, cfg: "ExperimentConfig") -> list[Stage]:
        return [*pretraining_stage(cfg, "warmup", "model", "supervised pre-training"),
                Stage(cls.stage_name or cls.name, cfg.method.epochs, "model", title=cls.stage_title or cls.name,
                      unlabelled=True),
                *finetune_stage(cfg, "model")]

    def build(self) -> None:
        m = self.m
        self.nets["model"] = self.ctx.network(self.cfg.seed)
        self.opts["model"] = self.ctx.optimizer(self.nets["model"], m.lr)
        if m.finetune_epochs:
            self.opts["finetune"] = self.ctx.optimizer(self.nets["model"], m.finetune_lr)


METHODS = Registry("method", Method, "register_method")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a :class:`Method` available as ``method.name=<name>``."""
    return METHODS.register(name)


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return METHODS.names()


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def total_epochs(cfg: "ExperimentConfig") -> int:
    """Epochs (reports) of a whole run of ``cfg``'s method."""
    return sum(s.epochs for s in get_method(cfg.method.name).stages(cfg))


def finetune_stage(cfg: "ExperimentConfig", net: str = "student") -> list[Stage]:
    """The optional last stage of a semi-supervised method (the IPB authors' last step):
    ``method.finetune_epochs`` epochs of ``net`` on class-balanced L at
    ``method.finetune_lr``, starting from the previous stage's choice, selected anew on V."""
    m = cfg.method
    if not m.finetune_epochs:
        return []
    return [Stage("finetune", m.finetune_epochs, net, title="fine-tuning", optimizer="finetune", lr=m.finetune_lr,
                  restart=True)]


def pretraining_stage(cfg: "ExperimentConfig", name: str, net: str, title: str) -> list[Stage]:
    """The optional first stage of a semi-supervised method: ``method.teacher_epochs``
    epochs of ``net`` (and its optimiser of the same name) on class-balanced L at
    ``method.lr``. With ``method.keep_start`` (default) its epochs are offered for selection
    on V like any other, so the unlabelled stage must beat the supervised network it starts
    from on V to be chosen: the guard that a semi-supervised run never returns a network
    worse on V than its own supervised start. Teacher and student share one architecture,
    so the chosen weights load into the network that is tested."""
    m = cfg.method
    if not m.teacher_epochs:
        return []
    return [Stage(name, m.teacher_epochs, net, title=title, optimizer=net, lr=m.lr, select=bool(m.keep_start))]
