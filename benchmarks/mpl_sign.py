"""Which sign of the MPL feedback h helps? A toy study of :func:`ipb_ray.nn.mpl.mpl_step`.

    python benchmarks/mpl_sign.py [--seeds 5] [--steps 800] [--per-class 6] [--json out.json]

shared/IPB.md ("MPL feedback"): h = CE(S_old(x_l), y) - CE(S_new(x_l), y) by the
first-order derivation (``old_minus_new``), the sign of the MPL authors' code is the
opposite (``new_minus_old``). This script runs both on a problem small enough for a
laptop CPU (one thread, about 15 s per seed) and compares them with a control.

Problem: a 2-D "pinwheel" of C curved arms (one class per arm), ``--per-class`` labelled
points per class (L), many unlabelled (U) and a held-out test set (T). Weak and strong
views are the same points plus Gaussian noise of two strengths. Teacher and student are
small MLPs (the teacher returns ``(logits, features)``, the student bare logits, as the
library allows). Each seed: the teacher is pre-trained on L alone, then every arm starts
from that same teacher and the same fresh student, and sees the same batches and noise.

Arms:

- ``old_minus_new``, ``new_minus_old``: ``mpl_step`` with that ``method.mpl.mpl_feedback``.
- ``no_feedback`` (the control): the same step with the MPL term left out (h = 0): the
  teacher learns from labelled CE + ramped UDA only, the student from its hard
  pseudo-labels. Written here from the library's own losses; at the start the script
  checks that it moves the teacher exactly as ``mpl_step`` does when h is 0 (student lr 0).

Reported per arm: the student's and the teacher's test accuracy after the last step (mean
± std over seeds), the mean h over all steps, and the mean per-step fall of the student's
labelled loss (old - new, the same quantity in every arm). Then paired comparisons over
seeds (mean difference, its std, paired t-test p) of the student's accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from ipb_ray.methods.mpl import MPLParams  # noqa: E402
from ipb_ray.nn.mpl import mpl_step, pseudo_labels, student_loss, uda_loss, uda_weight  # noqa: E402

ARMS = ("old_minus_new", "new_minus_old", "no_feedback")

# the toy's settings, in one place
TOY = SimpleNamespace(
    classes=4, unlabelled=2000, test=4000, radial_std=0.3, tangential_std=0.1, rate=0.8,
    weak_noise=0.05, strong_noise=0.25, hidden=64, pretrain_steps=200, unlabelled_batch=64,
    teacher_lr=0.05, student_lr=0.05, momentum=0.9,
)
METHOD = dict(threshold=0.6, threshold_student=True, temperature=1.0, uda_weight=1.0, uda_steps=300,
              student_labelled=0.0)  # the paper's student: the study is about the feedback alone


# --------------------------------------------------------------------------- data, models

def pinwheel(n: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of a pinwheel with ``classes`` arms: (n, 2) float32 and (n,) int64 labels."""
    y = torch.arange(n) % classes
    r = torch.randn(n, generator=gen) * TOY.radial_std + 1.0
    t = torch.randn(n, generator=gen) * TOY.tangential_std
    angle = 2 * math.pi * y / classes + TOY.rate * torch.exp(r)
    xy = torch.stack([r, t], 1)
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1),
                       torch.stack([angle.sin(), angle.cos()], -1)], -2)  # (n, 2, 2)
    return 2.0 * (rot @ xy.unsqueeze(-1)).squeeze(-1), y


class MLP(nn.Module):
    """2 -> hidden -> hidden -> classes; ``with_features`` returns ``(logits, features)``."""

    def __init__(self, classes: int, hidden: int, with_features: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)
        self.with_features = with_features

    def forward(self, x: torch.Tensor) -> Any:
        feats = self.body(x)
        logits = self.head(feats)
        return (logits, feats) if self.with_features else logits


def _logits(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (_logits(model(x)).argmax(-1) == y).float().mean().item()


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=TOY.momentum)


# --------------------------------------------------------------------------- the control arm

def no_feedback_step(teacher: nn.Module, student: nn.Module, t_opt: torch.optim.Optimizer,
                     s_opt: torch.optim.Optimizer, x_l: torch.Tensor, y_l: torch.Tensor,
                     x_uw: torch.Tensor, x_us: torch.Tensor, *, step: int, cfg: MPLParams) -> dict:
    """``mpl_step`` without its MPL term: teacher on labelled CE + ramped UDA, student on
    the teacher's hard pseudo-labels of the strong view (same masks, same order)."""
    n_l, n_u = x_l.shape[0], x_uw.shape[0]
    t_logits_l, t_logits_uw, t_logits_us = _logits(teacher(torch.cat([x_l, x_uw, x_us]))).split([n_l, n_u, n_u])
    t_loss = (F.cross_entropy(t_logits_l, y_l)
              + uda_weight(step, cfg.uda_weight, cfg.uda_steps)
              * uda_loss(t_logits_uw, t_logits_us, cfg.temperature, cfg.threshold)[0])
    hard, _, mask = pseudo_labels(t_logits_us, cfg.threshold)
    with torch.no_grad():
        old = F.cross_entropy(_logits(student(x_l)), y_l)
    s_loss = student_loss(_logits(student(x_us)), hard, mask if cfg.threshold_student else None)
    for opt, loss in ((s_opt, s_loss), (t_opt, t_loss)):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        new = F.cross_entropy(_logits(student(x_l)), y_l)
    return {"mpl_h": 0.0, "student_loss_l_old": old.item(), "student_loss_l_new": new.item()}


def check_control(cfg: MPLParams) -> None:
    """With the student's lr at 0, h is exactly 0 in ``mpl_step``; the control must then
    move the teacher to exactly the same parameters."""
    gen = torch.Generator().manual_seed(123)
    x, y = pinwheel(32, TOY.classes, gen)
    torch.manual_seed(123)
    teacher, student = MLP(TOY.classes, 16, True), MLP(TOY.classes, 16, False)
    pairs = []
    for fn in (mpl_step, no_feedback_step):
        t, s = copy.deepcopy(teacher), copy.deepcopy(student)
        fn(t, s, _sgd(t, 0.1), _sgd(s, 0.0), x[:8], y[:8], x[8:20], x[20:32], step=50, cfg=cfg)
        pairs.append(torch.cat([p.detach().flatten() for p in t.parameters()]))
    if not torch.allclose(pairs[0], pairs[1], atol=1e-6):
        raise SystemExit("control arm drifted from mpl_step at h = 0; fix no_feedback_step")


# --------------------------------------------------------------------------- one seed

def run_seed(seed: int, steps: int, per_class: int) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = pinwheel(per_class * TOY.classes + TOY.unlabelled + TOY.test, TOY.classes, gen)
    perm = torch.randperm(len(y_all), generator=gen)
    x_all, y_all = x_all[perm], y_all[perm]
    # L: the first per_class points of every class; U and T from the rest
    first = torch.cat([torch.nonzero(y_all == c)[:per_class, 0] for c in range(TOY.classes)])
    rest = torch.ones(len(y_all), dtype=torch.bool)
    rest[first] = False
    x_l, y_l = x_all[first], y_all[first]
    x_rest, y_rest = x_all[rest], y_all[rest]
    x_u, (x_t, y_t) = x_rest[:TOY.unlabelled], (x_rest[TOY.unlabelled:], y_rest[TOY.unlabelled:])

    torch.manual_seed(seed)
    teacher0 = MLP(TOY.classes, TOY.hidden, with_features=True)
    student0 = MLP(TOY.classes, TOY.hidden, with_features=False)
    opt = _sgd(teacher0, TOY.teacher_lr)
    for _ in range(TOY.pretrain_steps):  # the teacher on L alone (full batch)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(_logits(teacher0(x_l)), y_l).backward()
        opt.step()
    out: dict[str, dict[str, float]] = {"pretrained": {"teacher_acc": accuracy(teacher0, x_t, y_t),
                                                       "student_acc": float("nan")}}

    for arm in ARMS:
        teacher, student = copy.deepcopy(teacher0), copy.deepcopy(student0)
        t_opt, s_opt = _sgd(teacher, TOY.teacher_lr), _sgd(student, TOY.student_lr)
        cfg = MPLParams(mpl_feedback=arm if arm != "no_feedback" else "old_minus_new", **METHOD)
        step_fn = no_feedback_step if arm == "no_feedback" else mpl_step
        stream = torch.Generator().manual_seed(10_000 + seed)  # same batches and noise in every arm
        hs, falls = [], []
        for step in range(steps):
            idx = torch.randint(0, len(x_u), (TOY.unlabelled_batch,), generator=stream)
            x_uw = x_u[idx] + TOY.weak_noise * torch.randn(len(idx), 2, generator=stream)
            x_us = x_u[idx] + TOY.strong_noise * torch.randn(len(idx), 2, generator=stream)
            x_lw = x_l + TOY.weak_noise * torch.randn(x_l.shape, generator=stream)
            r = step_fn(teacher, student, t_opt, s_opt, x_lw, y_l, x_uw, x_us, step=step, cfg=cfg)
            hs.append(r["mpl_h"])
            falls.append(r["student_loss_l_old"] - r["student_loss_l_new"])
        out[arm] = {"student_acc": accuracy(student, x_t, y_t), "teacher_acc": accuracy(teacher, x_t, y_t),
                    "mean_h": statistics.fmean(hs), "mean_fall": statistics.fmean(falls)}
    return out


# --------------------------------------------------------------------------- report

def _ms(values: list[float], spec: str = ".3f") -> str:
    if any(math.isnan(v) for v in values):
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{spec}} ± {sd:{spec}}"


def table(results: list[dict]) -> str:
    rows = ["| arm | student test acc | teacher test acc | mean h | mean fall of student L loss |",
            "|---|---|---|---|---|"]
    for arm in ("pretrained", *ARMS):
        col = {k: [r[arm].get(k, float("nan")) for r in results]
               for k in ("student_acc", "teacher_acc", "mean_h", "mean_fall")}
        name = "teacher pre-trained on L (start)" if arm == "pretrained" else arm
        rows.append(f"| {name} | {_ms(col['student_acc'])} | {_ms(col['teacher_acc'])} | "
                    f"{_ms(col['mean_h'], '.2e')} | {_ms(col['mean_fall'], '.2e')} |")
    return "\n".join(rows)


def paired(results: list[dict], metric: str = "student_acc") -> str:
    from scipy import stats

    rows = [f"| {metric}: A − B | mean diff | std | A wins / seeds | paired t p |", "|---|---|---|---|---|"]
    for a, b in (("old_minus_new", "new_minus_old"), ("old_minus_new", "no_feedback"),
                 ("new_minus_old", "no_feedback")):
        d = [r[a][metric] - r[b][metric] for r in results]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        p = stats.ttest_rel([r[a][metric] for r in results], [r[b][metric] for r in results]).pvalue \
            if len(d) > 1 and sd > 0 else float("nan")
        rows.append(f"| {a} − {b} | {statistics.fmean(d):+.4f} | {sd:.4f} | {sum(x > 0 for x in d)}/{len(d)} "
                    f"| {p:.3g} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=800, help="MPL steps per arm")
    ap.add_argument("--per-class", type=int, default=6, help="labelled points per class")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write every seed's numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    check_control(MPLParams(**METHOD))
    results, t0 = [], time.perf_counter()
    for seed in range(args.seeds):
        results.append(run_seed(seed, args.steps, args.per_class))
        print(f"seed {seed}: " + ", ".join(f"{arm} S {results[-1][arm]['student_acc']:.3f} "
                                          f"T {results[-1][arm]['teacher_acc']:.3f}" for arm in ARMS),
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n{TOY.classes} classes, {args.per_class} labelled per class, {TOY.unlabelled} unlabelled, "
          f"{TOY.test} test; {args.steps} MPL steps; {args.seeds} seeds\n")
    print(table(results))
    print()
    print(paired(results, "student_acc"))
    print()
    print(paired(results, "teacher_acc"))
    if args.json:
        Path(args.json).write_text(json.dumps({"toy": vars(TOY), "method": METHOD, "args": vars(args),
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
