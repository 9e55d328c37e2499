"""Balancers: what a semi-supervised method's unlabelled stream holds in each epoch.

A balancer lives on every rank of the training loop; rank 0 plans. Before every unlabelled epoch the loop
asks it for the epoch's plan (:meth:`Balancer.plan`: which colonies, how many copies,
which windows) and writes that to the unlabelled stream; after the epoch's steps it shows
it the pseudo-labels the method gave (:meth:`Balancer.observe`). Any method that streams
U composes with any balancer (``method.balancer``):

- ``none``: every unlabelled colony once per epoch at a fresh random window (plain MPL);
- ``pseudo_balance``: IPB's per-epoch pseudo-balancing (shared/IPB.md, step 2a): the
  method's labeller network labels one random window of every unlabelled colony in a
  Ray Data pass (:mod:`ipb_ray.distributed.rebalance`), and the epoch's windows are drawn from the
  multinomial with weight 1/n_c per pseudo-label class. The pass for the next epoch runs
  in a background thread as soon as the labeller is final for it (:meth:`Balancer.prefetch`),
  overlapping validation and checkpointing;
- ``logit_adjust``: U streamed as by ``none``, and every pseudo-label the method makes is
  taken from logits debiased by the running estimate of U's class prior (:meth:`Balancer.adjust`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from ipb_ray.methods.registry import Registry, own_params
from ipb_ray.params import Params, param
from ipb_ray.patches.balance import COUNT_SOURCES, PRIORS

#: ``method.pseudo_balance.relabel``: a labelling pass per epoch, or the method's own pseudo-labels
RELABEL = ("pass", "reuse")

__all__ = [
    "Balancer", "BALANCERS", "get_balancer", "label_pool", "list_balancers", "LogitAdjuster",
    "LogitAdjustParams", "PseudoBalanceParams", "PseudoBalancer", "register_balancer", "RELABEL", "shares",
    "UniformDraw",
]


def _per_class(prefix: str, values: Any, names: tuple[str, ...]) -> dict[str, float]:
    return {f"{prefix}/{n}": float(v) for n, v in zip(names, values)}


def shares(prefix: str, counts: Any, names: tuple[str, ...]) -> dict[str, float]:
    """``<prefix>/<class>``: each class's share of ``counts``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = max(float(counts.sum()), 1.0)
    return {f"{prefix}/{n}": float(c) / total for n, c in zip(names, counts)}


class Balancer:
    """Base: the plan of an unlabelled epoch (see the module docstring). ``ctx`` is the
    loop's context (configuration, fold inputs, stream specs, Ray state names)."""

    name: ClassVar[str] = ""
    params: ClassVar[type | None] = None  # its own hyperparameters (method.<section>.*), as a Method's
    section: ClassVar[str] = ""

    def __init__(self, cfg: Any, ctx: Any):
        self.cfg, self.ctx = cfg, ctx
        self.p: Any = own_params(type(self), cfg)
        self.names = ctx.inputs.class_names

    def adjust(self, logits: Any) -> Any:
        """Every rank, every step: the method's pseudo-label logits (B, C) of an unlabelled
        batch, corrected before they become pseudo-labels (default: as they are). Methods
        call it through :meth:`ipb_ray.methods.Method.adjust`."""
        return logits

    def prefetch(self, epoch: int, labeller: Any) -> None:
        """``labeller`` is final for unlabelled epoch ``epoch``: start what the plan needs."""

    def plan(self, epoch: int, n_draws: int, labeller: Any) -> tuple[Any, dict[str, Any]]:
        """The :class:`ipb_ray.patches.pseudo_labels.EpochPlan` of unlabelled epoch ``epoch`` (``n_draws``
        patches) and its figures; ``labeller`` is the method's labelling network as it is now."""
        raise NotImplementedError

    def observe(self, colony_ids: list[str], pseudo: list[int]) -> dict[str, Any]:
        """The epoch's streamed colonies and the method's pseudo-labels of them; figures."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


BALANCERS = Registry("balancer", Balancer, "register_balancer")


def register_balancer(name: str) -> Callable[[type[Balancer]], type[Balancer]]:
    """Class decorator: make a :class:`Balancer` available as ``method.balancer=<name>``."""
    return BALANCERS.register(name)


def list_balancers() -> list[str]:
    return BALANCERS.names()


def get_balancer(name: str) -> type[Balancer]:
    return BALANCERS.get(name)


@register_balancer("none")
class UniformDraw(Balancer):
    """Every unlabelled colony once per epoch at a fresh random window (plain MPL)."""

    def plan(self, epoch: int, n_draws: int, labeller: Any) -> tuple[Any, dict[str, Any]]:
        from ipb_ray.patches.pseudo_labels import epoch_plan

        inputs = self.ctx.inputs
        return epoch_plan(inputs.unlabelled, None, len(self.names), self.cfg.seed, epoch, n_draws, self.names), {}


@dataclass(frozen=True)
class PseudoBalanceParams(Params):
    """`pseudo_balance` (IPB's balancer): how U is pseudo-labelled before each epoch's draw."""

    relabel: str = param("pass", choices=RELABEL, doc="the pseudo-labels of each epoch: a separate labelling "
                         "pass over U, or reuse those of the previous epoch's steps")
    threshold: float = param(0.0, lo=0.0, hi=1.0, doc="draw only colonies whose pseudo-label confidence is at "
                             "least this (0 = all, the paper's draw; the paper's 0.65 filters colonies between "
                             "two classes)")
    alpha: float = param(0.5, lo=0.0, hi=2.0, doc="weights 1/n_c^alpha: 1 = balanced (the paper), 0 = as "
                         "pseudo-labelled; CReST's tempering in between (default 0.5: RESULTS.md, Chula RBC-12)")
    max_copies: int = param(3, lo=0, doc="at most this many copies of one colony per epoch (0 = no cap, the "
                            "paper); raised when the cap could not fill the epoch")
    label_pool: int = param(0, lo=0, doc="colonies of U the labelling pass labels each epoch, a seeded random "
                            "subset (0 = all of U, the paper). The draw needs only the epoch's draws: on a large U "
                            "a pool of a few times those costs a fraction of the pass, and n_c comes from the sample")
    prior: str = param("none", choices=PRIORS, doc="U's class prior, to which every pseudo-label (the draw's "
                       "and the method's own in its steps) is re-weighted from the prior the labeller was trained "
                       "under: labelled = the class shares of L (right when L was drawn at random from the same "
                       "images, as ipb-ray's folds are); em = estimated by EM from the labeller's posteriors "
                       "after each labelling pass (Saerens et al. 2002; needs a calibrated labeller); none: as "
                       "the labeller gives them (the paper)")
    counts: str = param("hard", choices=COUNT_SOURCES, doc="class counts n_c from hard pseudo-labels (the paper), "
                        "the sum of the teacher's probabilities (soft), or U's prior estimated by EM (em)")

    def draw(self) -> dict[str, Any]:
        """The settings of :func:`ipb_ray.patches.balance.pseudo_balance`."""
        return {"threshold": self.threshold, "alpha": self.alpha, "max_copies": self.max_copies,
                "counts": self.counts}


def label_pool(unlabelled: Any, size: int, seed: int, epoch: int) -> list[str]:
    """The colonies of U the labelling pass of ``epoch`` labels: all of them (``size`` 0 or
    at least |U|), else a random subset of ``size``, reproducible from ``(seed, epoch)``."""
    ids = sorted(unlabelled)
    if not size or size >= len(ids):
        return list(unlabelled)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x9001]))
    return [ids[i] for i in np.sort(rng.choice(len(ids), size=int(size), replace=False))]


@register_balancer("pseudo_balance")
class PseudoBalancer(Balancer):
    """IPB's pseudo-balanced draw over the labeller's pseudo-labels of U; with
    ``method.pseudo_balance.relabel=reuse`` only the first epoch of a run has a labelling
    pass, later ones draw on the pseudo-labels of the previous epoch's steps."""

    params = PseudoBalanceParams

    def __init__(self, cfg: Any, ctx: Any):
        super().__init__(cfg, ctx)
        self.table: Any = None
        self.class_weights: list[float] | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ipb-label")
        self.pending: dict[int, concurrent.futures.Future] = {}
        self.labeller: Any = None
        self.log_shift: Any = None  # torch (C,): log(U's prior / L's), with method.pseudo_balance.prior=em
        self.prior_figures: dict[str, float] = {}

    def _train_prior(self) -> np.ndarray | None:
        """The class prior the labeller was trained under: uniform on class-balanced L."""
        if self.cfg.method.balance_labelled:
            return None
        counts = self._labelled_counts()
        return np.maximum(counts, 1.0) / max(counts.sum(), 1.0)

    def _labelled_counts(self) -> np.ndarray:
        return np.bincount(self.ctx.inputs.labelled_labels, minlength=len(self.names)).astype(np.float64)

    def _labelled_prior(self) -> np.ndarray:
        """U's class prior taken to be L's class shares (add-one smoothed). ipb-ray draws L at
        random (stratified) from the same images as U, so L's shares are an unbiased estimate
        of U's that does not depend on the labeller being calibrated (EM does: on Chula RBC-12
        at 3 % it drove `normal`, 30 % of U, to 1-22 %; RESULTS.md)."""
        counts = self._labelled_counts()
        return (counts + 1.0) / (counts.sum() + len(counts))

    def _with_prior(self, table: Any) -> tuple[Any, dict[str, float]]:
        """``prior=em|labelled``: U's prior (by EM, or L's class shares), the table relabelled
        from re-weighted posteriors, and the shift the method's own pseudo-labels take
        (:meth:`adjust`)."""
        import torch

        from ipb_ray.patches.balance import em_prior, prior_corrected

        if self.p.prior == "none":
            return table, {}
        if table.probs is None or not len(table):
            raise RuntimeError(f"method.pseudo_balance.prior={self.p.prior} needs the labelling pass's class "
                               "probabilities")
        base = self._train_prior()
        if self.p.prior == "labelled":
            prior = self._labelled_prior()
        else:
            prior = em_prior(table.probs, base)
        # EM may drive a class the labeller rarely calls to a prior of 0, and a shift of
        # log(0) would silence it in every later pseudo-label: keep a floor of 1/(10 C)
        prior = np.maximum(prior, 0.1 / len(prior))
        prior = prior / prior.sum()
        post = prior_corrected(table.probs, prior, base)
        table = dataclasses.replace(table, pseudo=post.argmax(1).astype(np.int64),
                                    confidence=post.max(1).astype(np.float32), probs=post.astype(np.float32))
        uniform = np.full(len(prior), 1.0 / len(prior)) if base is None else base
        self.log_shift = torch.tensor(np.log(np.clip(prior, 1e-8, None) / uniform), dtype=torch.float32)
        return table, _per_class("u_prior", prior, self.names)

    def adjust(self, logits: Any) -> Any:
        """``prior=em|labelled``: the method's pseudo-label logits shifted by log(U's prior / L's), the
        estimate of the last labelling pass (rank 0's, broadcast so every rank agrees)."""
        if self.p.prior == "none":
            return logits
        import torch
        import torch.distributed as dist

        shift = self.log_shift if self.log_shift is not None else torch.zeros(logits.shape[-1])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shift = shift.clone().to(logits.device)
            dist.broadcast(shift, src=0)
        return logits + shift.to(logits.device, logits.dtype)

    def _needs_pass(self) -> bool:
        return self.p.relabel == "pass" or self.table is None

    def prefetch(self, epoch: int, labeller: Any) -> None:
        if self._needs_pass() and epoch not in self.pending:
            self._start(epoch, labeller)

    def _start(self, epoch: int, labeller: Any) -> None:
        ids = label_pool(self.ctx.inputs.unlabelled, self.p.label_pool, self.cfg.seed, epoch)
        job = self.ctx.labelling_job(epoch, ids, labeller)  # the weights are taken now

        def timed() -> tuple[Any, float]:
            t0 = time.perf_counter()
            return job(), time.perf_counter() - t0

        self.pending[epoch] = self.pool.submit(timed)

    def plan(self, epoch: int, n_draws: int, labeller: Any) -> tuple[Any, dict[str, Any]]:
        from ipb_ray.patches.pseudo_labels import draw_figures, epoch_plan, pseudo_label_quality

        label_s = pass_s = 0.0
        if self._needs_pass():
            if epoch not in self.pending:  # not prefetched (e.g. the run resumed here): label now
                self._start(epoch, labeller)
            t0 = time.perf_counter()
            table, pass_s = self.pending.pop(epoch).result()
            label_s = time.perf_counter() - t0
            want = len(label_pool(self.ctx.inputs.unlabelled, self.p.label_pool, self.cfg.seed, epoch))
            if len(table) != want:
                raise RuntimeError(f"the labelling pass labelled {len(table)} of {want} "
                                   "unlabelled colonies")
            self.table, self.prior_figures = self._with_prior(table)  # a new pass: a new prior (prior=em)
        prior_figures = self.prior_figures
        n_cls = len(self.names)
        plan = epoch_plan(self.ctx.inputs.unlabelled, self.table, n_cls, self.cfg.seed, epoch, n_draws, self.names,
                          **self.p.draw())
        self.class_weights = plan.balance.class_weights.tolist()
        quality = pseudo_label_quality(self.table, n_cls)  # recall is pseudo_tpr
        known = self.table.truth >= 0
        accuracy = float((self.table.pseudo[known] == self.table.truth[known]).mean()) if known.any() else float("nan")
        drawn = draw_figures(plan, self.table, n_cls)
        figures = {"label_seconds": label_s, "label_pass_seconds": pass_s,
                   **_per_class("teacher_proportion", plan.balance.proportions, self.names),
                   **_per_class("sampling_weight", plan.balance.class_weights, self.names),
                   "missing_classes": len(plan.balance.missing),
                   # against U's hidden labels (benchmark catalogs): recall is pseudo_tpr
                   **_per_class("pseudo_tpr", quality["recall"], self.names),
                   **_per_class("pseudo_precision", quality["precision"], self.names),
                   "pseudo_accuracy": accuracy,
                   **_per_class("draw_share", drawn["draw_share"], self.names),
                   **_per_class("draw_true_share", drawn["draw_true_share"], self.names),
                   "draw_precision": drawn["draw_precision"], "max_copies": drawn["max_copies"],
                   "drawn_colonies": drawn["drawn_colonies"], **prior_figures}
        return plan, figures

    def observe(self, colony_ids: list[str], pseudo: list[int]) -> dict[str, Any]:
        from ipb_ray.patches.pseudo_labels import class_histogram

        if self.table is None:
            return {}
        # the student's stream by the pseudo-label its window was drawn with
        out = shares("stream_share", class_histogram(self.table.pseudo[self.table.lookup(colony_ids)],
                                                     len(self.names)), self.names)
        if self.p.relabel == "reuse" and len(pseudo) == len(colony_ids):
            self.table = self.table.with_labels(colony_ids, pseudo)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table.to_dict() if self.table is not None else None,
                "class_weights": self.class_weights, "prior_figures": self.prior_figures,
                "log_shift": self.log_shift.tolist() if self.log_shift is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ipb_ray.patches.pseudo_labels import LabelTable

        self.table = LabelTable.from_rows(state["table"]) if state.get("table") else None
        self.class_weights = state.get("class_weights")
        self.prior_figures = dict(state.get("prior_figures") or {})
        if state.get("log_shift") is not None:
            import torch

            self.log_shift = torch.tensor(state["log_shift"], dtype=torch.float32)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class LogitAdjustParams(Params):
    """`logit_adjust`: debiased pseudo-labels (logit adjustment by U's estimated class prior)."""

    tau: float = param(1.0, lo=0.0, hi=10.0, doc="strength of the adjustment: logits - tau * log(prior) "
                       "(0 = off; DebiasPL's lambda)")
    momentum: float = param(0.99, lo=0.0, hi=0.999999, doc="per-step momentum of the running estimate of "
                            "U's class prior (the mean softmax of the method's pseudo-label logits); 0.99 has a "
                            "half-life of 69 steps, so the estimate settles within a short run (DebiasPL's 0.999 "
                            "suits runs of 100k steps: after 75 steps it leaves the prior 93 % uniform)")


@register_balancer("logit_adjust")
class LogitAdjuster(UniformDraw):
    """Distribution-aware pseudo-labels: logit adjustment by the estimated class prior of U.

    Confirmation bias in semi-supervised learning on imbalanced data is a prior problem: a
    model trained on few, imbalanced labels over-predicts its head classes on U, its
    pseudo-labels inherit that bias and the next steps amplify it. Following the logit
    adjustment of Menon et al. ("Long-tail learning via logit adjustment", ICLR 2021) and
    its use on pseudo-labels by DebiasPL (Wang et al., "Debiased Learning from Naturally
    Imbalanced Pseudo-Labels", CVPR 2022; ACR, Wei & Gan, CVPR 2023, and SimPro, Du et al.,
    ICML 2024, estimate U's distribution for the same end), every rank keeps a running
    estimate of the prior the model currently puts on U (the momentum average of its mean
    softmax over each step's unlabelled batch, all-reduced so the ranks agree) and the
    method takes its pseudo-labels from ``logits - tau * log(prior)``. A class the model
    over-predicts is marked down, an under-predicted one up, so thresholded pseudo-labels
    of rare classes pass more often. The unlabelled stream itself is as ``none``'s: each
    colony once per epoch (compose with resampling by choosing ``pseudo_balance`` instead).
    """

    params = LogitAdjustParams

    def __init__(self, cfg: Any, ctx: Any):
        super().__init__(cfg, ctx)
        self.prior: Any = None  # torch (C,) float32, uniform until the first step

    def adjust(self, logits: Any) -> Any:
        import torch
        import torch.distributed as dist

        from ipb_ray.nn.ssl import adjusted_logits, update_prior

        if self.prior is None or self.prior.device != logits.device:
            n = logits.shape[-1]
            self.prior = (torch.full((n,), 1.0 / n) if self.prior is None else self.prior).to(logits.device)
        mean = logits.detach().float().softmax(-1).mean(0, keepdim=True)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(mean)  # the ranks keep one estimate
            mean /= dist.get_world_size()
        self.prior = update_prior(self.prior, mean, self.p.momentum)
        return adjusted_logits(logits, self.prior, self.p.tau)

    def observe(self, colony_ids: list[str], pseudo: list[int]) -> dict[str, Any]:
        if self.prior is None:
            return {}
        return _per_class("prior_estimate", self.prior.cpu().tolist(), self.names)

    def state_dict(self) -> dict[str, Any]:
        return {"prior": self.prior.cpu().tolist() if self.prior is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        self.prior = torch.tensor(state["prior"], dtype=torch.float32) if state.get("prior") else None
