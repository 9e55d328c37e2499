"""Meta Pseudo Labels, and IPB = MPL with the pseudo-balancer (shared/IPB.md, Algorithm 1).

Stages: ``teacher`` (``method.teacher_epochs`` of the teacher alone on class-balanced L),
``mpl`` (``method.epochs`` of teacher/student steps, :func:`ipb_ray.nn.mpl.mpl_step`, on
paired labelled and unlabelled batches; the student, or its EMA with ``method.mpl.ema``, is
selected on V) and, with ``method.finetune_epochs``, ``finetune`` (that student on
class-balanced L at ``method.finetune_lr``, selected anew; the MPL stage's choice is
tested too). Learning rates of the MPL stage follow the run's schedule over its steps:
``method.mpl.teacher_lr`` for the teacher, ``method.mpl.student_lr`` for the student after
``method.mpl.student_warmup_epochs`` at ``method.mpl.student_warmup_lr``.

``mpl`` streams U as it is (balancer ``none``); ``ipb`` is the same method whose default
balancer is ``pseudo_balance``: the teacher labels U before every MPL epoch and the
student's stream is drawn pseudo-balanced.
"""

from __future__ import annotations

import copy
from typing import Any

from dataclasses import dataclass

from ipb_ray.methods.base import Method, Stage, finetune_stage, pretraining_stage, register_method
from ipb_ray.params import Params, param

__all__ = [
    "IterativePseudoBalancing", "MPLParams", "MPL_FEEDBACK", "MetaPseudoLabels", "STEP_METRICS",
    "STUDENT_INITS",
]

#: ``method.mpl.mpl_feedback``: the sign of the MPL feedback (:func:`ipb_ray.nn.mpl.mpl_feedback`)
MPL_FEEDBACK = ("old_minus_new", "new_minus_old")
#: ``method.mpl.student_init``: where the student starts
STUDENT_INITS = ("scratch", "teacher")

#: per-step figures of :func:`ipb_ray.nn.mpl.mpl_step` averaged into the epoch's metrics
STEP_METRICS = ("teacher_loss", "teacher_loss_l", "uda_loss", "teacher_loss_mpl", "student_loss",
                "student_loss_l_old", "student_loss_l_new", "mpl_h", "mask_rate", "uda_mask_rate", "student_loss_sup")


@dataclass(frozen=True)
class MPLParams(Params):
    """MPL and IPB: the teacher/student stage (learning rates, UDA, the MPL feedback, EMA)."""

    teacher_lr: float = param(0.005, lo=0.0, hi=10.0, doc="teacher lr in the MPL stage")
    student_lr: float = param(0.005, lo=0.0, hi=10.0, doc="student lr after warm-up")
    student_init: str = param("scratch", choices=STUDENT_INITS, doc="the student's start: its own random init "
                              "(the paper's) or a copy of the pre-trained teacher (short runs: the student then "
                              "starts where supervised training ends)")
    student_warmup_epochs: int = param(10, lo=0, doc="epochs at the low student lr")
    student_warmup_lr: float = param(0.0005, lo=0.0, hi=10.0, doc="student lr during warm-up")
    threshold: float = param(0.65, lo=0.0, hi=1.0, doc="pseudo-label confidence threshold (UDA mask and the "
                             "student's loss)")
    threshold_student: bool = param(True, doc="apply the threshold to the student loss too")
    temperature: float = param(1.0, lo=1e-3, hi=100.0, doc="UDA soft-target temperature")
    uda_weight: float = param(8.0, lo=0.0, hi=1000.0, doc="lambda_u: final weight of the teacher's UDA loss")
    uda_steps: int = param(5000, lo=1, doc="steps of the linear ramp of lambda_u from 0")
    mpl_feedback: str = param("old_minus_new", choices=MPL_FEEDBACK,
                              doc="sign of the MPL feedback h (derivation: old - new)")
    ema: float = param(0.0, lo=0.0, hi=0.99999, doc="student EMA decay; 0 = off")
    select_teacher: bool = param(True, doc="the teacher competes on V with the student in the MPL stage: UDA, "
                                 "its labelled loss and the feedback keep improving it, and where U's pseudo-labels "
                                 "are poor it stays the better network (false: only the student, the paper)")
    student_labelled: float = param(1.0, lo=0.0, hi=100.0, doc="weight of the student's own cross-entropy "
                                    "step on each labelled batch, taken after the MPL feedback is measured (so h "
                                    "still reflects the pseudo-label step alone); 0 = the paper's student, which "
                                    "sees only pseudo-labels (on Chula RBC-12 at 3 % it fell 12-17 points below "
                                    "supervised: RESULTS.md)")


@register_method("mpl")
class MetaPseudoLabels(Method):
    """Meta Pseudo Labels (Pham et al. 2021) with the teacher's UDA loss; U unbalanced."""

    title = "MPL, imbalanced (no pseudo-balancing)"
    semi_supervised = True
    labeller = "teacher"
    step_metrics = STEP_METRICS
    loss_metric = "student_loss"
    params = MPLParams

    @classmethod
    def stages(cls, cfg) -> list[Stage]:
        m = cfg.method
        return [*pretraining_stage(cfg, "teacher", "teacher", "teacher pre-training"),
                Stage("mpl", m.epochs, "ema" if m.mpl.ema > 0 else "student", title="teacher/student",
                      unlabelled=True, also_validate=("teacher",),
                      also_select=("teacher",) if m.mpl.select_teacher else ()),
                *finetune_stage(cfg, "student")]

    def build(self) -> None:
        from ipb_ray.nn.mpl import student_lr_at

        m, p, ctx = self.m, self.p, self.ctx
        self.nets["teacher"] = ctx.network(self.cfg.seed)  # teacher and student differ at init
        self.nets["student"] = ctx.network(self.cfg.seed + 1)
        if p.ema > 0:
            self.nets["ema"] = copy.deepcopy(ctx.unwrap(self.nets["student"]))
        self.opts["teacher"] = ctx.optimizer(self.nets["teacher"], m.lr)
        self.opts["student"] = ctx.optimizer(self.nets["student"], student_lr_at(0, p))
        if m.finetune_epochs:
            self.opts["finetune"] = ctx.optimizer(self.nets["student"], m.finetune_lr)
        self._last: dict[str, Any] = {}

    def begin_stage(self, stage: Stage) -> None:
        if stage.name == "mpl" and self.p.student_init == "teacher":  # the student starts as the teacher
            unwrap = self.ctx.unwrap
            unwrap(self.nets["student"]).load_state_dict(unwrap(self.nets["teacher"]).state_dict())
            if "ema" in self.nets:
                self.nets["ema"].load_state_dict(unwrap(self.nets["student"]).state_dict())

    def train_step(self, stage: Stage, labelled: dict[str, Any], unlabelled: dict[str, Any], *,
                   step: int, lr_factor: float, stage_epoch: int) -> dict[str, Any]:
        from ipb_ray.nn.mpl import ema_update, mpl_step, student_lr_at
        from ipb_ray.nn.optim import set_lr

        m, p, ctx = self.m, self.p, self.ctx
        s_opt, t_opt = self.opts["student"], self.opts["teacher"]
        set_lr(s_opt, student_lr_at(stage_epoch, p) * lr_factor)
        set_lr(t_opt, p.teacher_lr * lr_factor)
        out = mpl_step(self.nets["teacher"], self.nets["student"], t_opt, s_opt,
                       ctx.tensors(labelled, ctx.columns), ctx.labels(labelled),
                       ctx.tensors(unlabelled, ctx.weak_columns), ctx.tensors(unlabelled, ctx.strong_columns),
                       step=step, cfg=p, label_smoothing=m.label_smoothing, grad_clip=m.grad_clip,
                       autocast=ctx.autocast, adjust=self.adjust if self.balancer is not None else None)
        if "ema" in self.nets:
            ema_update(self.nets["ema"], ctx.unwrap(self.nets["student"]), p.ema)
        self._last = out
        return out

    def epoch_metrics(self, stage: Stage) -> dict[str, Any]:
        if not stage.unlabelled:
            return {}
        return {"lr": self.opts["student"].param_groups[0]["lr"], "teacher_lr": self.opts["teacher"].param_groups[0]["lr"],
                "uda_weight": float(self._last.get("uda_weight", 0.0))}


@register_method("ipb")
class IterativePseudoBalancing(MetaPseudoLabels):
    """Iterative Pseudo Balancing (Witmer & Bhanu): MPL whose unlabelled stream is drawn,
    every epoch, pseudo-balanced on the teacher's labels of U."""

    title = "IPB: MPL with per-epoch pseudo-balancing"
    default_balancer = "pseudo_balance"
