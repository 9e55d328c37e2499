"""MPL and IPB on Ray Train: teacher pre-training, then teacher/student epochs (worker side).

One run has ``method.teacher_epochs`` pre-training epochs (the teacher alone on L,
class-balanced by resampling) followed by ``method.epochs`` MPL epochs. In every MPL
epoch rank 0 first prepares the streams:

- IPB (``method.name=ipb``): publishes the teacher's weights, runs the labelling pass on
  Ray Data (:mod:`ipb_ray.rebalance`; skipped after the first epoch with
  ``method.relabel=reuse``) and draws the epoch's pseudo-balanced plan;
- plain MPL (``method.name=mpl``): every unlabelled colony once, at a fresh window;

and writes the plan to the unlabelled stream's state actor. The labelling pass of the next
epoch starts in a background thread as soon as an epoch's last step is done (the teacher
will not change before then), so it overlaps rank 0's validation and checkpointing;
``label_seconds`` is what the epoch still had to wait for it, ``label_pass_seconds`` its
duration. Then every rank runs the
same number of :func:`ipb_ray.mpl.mpl_step` s on its equal share of both streams (the
labelled stream is resampled to exactly as many batches). The student with the best
balanced accuracy on V is kept and tested on T.

With ``method.finetune_epochs`` > 0 a third stage follows (the authors' last step): that
student is fine-tuned on class-balanced L (cross-entropy, ``method.finetune_lr`` with its
own warm-up and schedule), the best fine-tuning epoch on V is kept and tested on T, and
the MPL stage's choice is tested too (``pre_finetune_test_*``), so both numbers exist.

Learning rates follow :func:`ipb_ray.optim.lr_factor` per optimizer step (warm-up, then
cosine by default), over the pre-training steps for the teacher and over the MPL steps
for both networks (the student's warm-up epochs scale it further). Before every
validation and every labelling pass rank 0 re-estimates the BatchNorm statistics of the
network it is about to use on un-augmented L (``eval.bn_recalibrate``).

The checkpoint of every epoch holds both networks, both optimisers, the EMA student, the global step, the latest pseudo-label table and class
weights, and the best student, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import time
from typing import Any

import numpy as np

from ipb_ray.config import ExperimentConfig, from_dict
from ipb_ray.training import (FoldInputs, _Timer, _all_reduce, _autocast, _inputs, _test_metrics, _unwrap,
                              build_model, labelled_draws, labelled_steps, load_checkpoint, model_kwargs, param_digest,
                              recalibrate, report_epoch, report_finished, shuffled, snapshot, supervised_epoch,
                              validate, worker_device, write_digest)

log = logging.getLogger(__name__)

#: per-step figures of :func:`ipb_ray.mpl.mpl_step` averaged into the epoch's metrics
#: Key prefix of the MPL stage's own test figures when fine-tuning follows it.
PRE_FINETUNE = "pre_finetune_"

STEP_METRICS = ("teacher_loss", "teacher_loss_l", "uda_loss", "teacher_loss_mpl", "student_loss",
                "student_loss_l_old", "student_loss_l_new", "mpl_h", "mask_rate", "uda_mask_rate")


def _gather(obj: Any) -> list[Any]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def _from_rank_zero(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (itself without a process group)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _shares(prefix: str, counts: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    total = max(float(np.sum(counts)), 1.0)
    return {f"{prefix}/{n}": float(c) / total for n, c in zip(names, counts)}


def _per_class(prefix: str, values: Any, names: tuple[str, ...]) -> dict[str, float]:
    return {f"{prefix}/{n}": float(v) for n, v in zip(names, values)}


def _mpl_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.data
    import ray.train
    import ray.train.collective
    import ray.train.torch
    import torch

    from ipb_ray.mpl import ema_update, mpl_step, student_lr_at
    from ipb_ray.optim import lr_factor, make_optimizer, set_lr, warmup_steps
    from ipb_ray.rebalance import (LabelTable, class_histogram, epoch_plan, labelling_dataset, pseudo_label_tpr,
                                   run_labelling, steps_per_epoch)
    from ipb_ray.streams import state_handle

    cfg: ExperimentConfig = from_dict(config["cfg"])
    inputs: FoldInputs = config["inputs"]
    spec_train, spec_uda, spec_label, spec_eval, spec_plain = (
        config[k] for k in ("spec_train", "spec_uda", "spec_label", "spec_eval", "spec_plain"))
    m, r = cfg.method, cfg.resources
    names, n_cls = inputs.class_names, len(inputs.class_names)
    ipb = m.name == "ipb"
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(cfg)
    amp = m.mixed_precision and device.type == "cuda"
    ray.data.DataContext.get_current().enable_progress_bars = False

    torch.manual_seed(cfg.seed)  # identical init on every rank; teacher and student differ
    teacher = ray.train.torch.prepare_model(build_model(cfg, n_cls, inputs))
    torch.manual_seed(cfg.seed + 1)
    student = ray.train.torch.prepare_model(build_model(cfg, n_cls, inputs))
    opt_kw = dict(momentum=m.momentum, weight_decay=m.weight_decay, nesterov=m.nesterov)
    t_opt = make_optimizer(teacher.parameters(), m.optimizer, m.lr, **opt_kw)
    s_opt = make_optimizer(student.parameters(), m.optimizer, student_lr_at(0, m), **opt_kw)
    ema = copy.deepcopy(_unwrap(student)) if m.ema > 0 else None

    # teacher pre-training: steps per epoch on L and the lr schedule over all of them
    t_steps = labelled_steps(len(inputs.labelled), world, m.batch_size, m.steps_per_epoch)
    t_total = max(t_steps * m.teacher_epochs, 1)
    t_warm = warmup_steps(t_total, m.warmup_fraction)

    def pretrain_lr(step: int) -> float:
        return m.lr * lr_factor(step, t_total, t_warm, m.schedule)

    n_u = m.draws_per_epoch or len(inputs.unlabelled)
    steps = m.steps_per_epoch or steps_per_epoch(n_u, world, m.unlabelled_batch_size)
    if steps == 0:
        raise ValueError(f"{n_u} unlabelled patches per epoch make no full batch of method.unlabelled_batch_size="
                         f"{m.unlabelled_batch_size} on each of {world} worker(s); lower the batch size or raise "
                         "method.draws_per_epoch")
    n_draws, n_labelled = steps * world * m.unlabelled_batch_size, steps * world * m.batch_size
    ft_start = m.teacher_epochs + m.epochs  # the first fine-tuning epoch (when there are any)
    total = ft_start + m.finetune_epochs
    ft_total = max(t_steps * m.finetune_epochs, 1)
    ft_warm = warmup_steps(ft_total, m.warmup_fraction)
    ft_opt = make_optimizer(student.parameters(), m.optimizer, m.finetune_lr, **opt_kw) \
        if m.finetune_epochs else None

    def finetune_lr(step: int) -> float:
        return m.finetune_lr * lr_factor(step, ft_total, ft_warm, m.schedule)
    mpl_total = steps * m.epochs
    mpl_warm = warmup_steps(mpl_total, m.warmup_fraction)
    calib = dict(max_batches=cfg.eval.bn_batches, enabled=cfg.eval.bn_recalibrate, seed=cfg.seed)
    columns = spec_train.patch_columns()
    u_truth = np.asarray(inputs.unlabelled_truth or [-1] * len(inputs.unlabelled), np.int64)
    truth_of = dict(zip(inputs.unlabelled, u_truth.tolist()))

    start, global_step, best_metric, best_state, resumed_from = 0, 0, -1.0, None, None
    table: LabelTable | None = None
    mpl_best: dict[str, Any] | None = None  # the MPL stage's selected student, once fine-tuning began
    class_weights: list[float] | None = None
    history: list[dict[str, Any]] = []
    state = load_checkpoint(config)
    if state is not None:
        _unwrap(teacher).load_state_dict(state["teacher"])
        _unwrap(student).load_state_dict(state["student"])
        t_opt.load_state_dict(state["t_opt"])
        s_opt.load_state_dict(state["s_opt"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        start, global_step = state["epoch"] + 1, state["global_step"]
        best_metric, best_state, resumed_from = state["best_metric"], state["best_model"], state["epoch"]
        table = LabelTable.from_rows(state["table"]) if state.get("table") else None
        class_weights = state.get("class_weights")
        history = list(state.get("history", []))
        mpl_best = state.get("mpl_best_model")
        if ft_opt is not None and state.get("ft_opt") is not None:
            ft_opt.load_state_dict(state["ft_opt"])
    l_state, u_state, p_state = (state_handle(config[k]) for k in ("state", "u_state", "label_state"))

    def selected() -> Any:
        return ema if ema is not None and mpl_best is None else student  # fine-tuning trains the student itself

    def checkpoint_state(g: int) -> dict[str, Any]:
        phase = "teacher" if g < m.teacher_epochs else "mpl" if g < ft_start else "finetune"
        return {"phase": phase, "epoch": g, "mpl_best_model": mpl_best,
                "ft_opt": ft_opt.state_dict() if ft_opt is not None else None,
                "teacher": _unwrap(teacher).state_dict(), "student": _unwrap(student).state_dict(),
                "t_opt": t_opt.state_dict(), "s_opt": s_opt.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "global_step": global_step,
                "best_metric": best_metric, "best_model": best_state,
                "table": table.to_dict() if table is not None else None, "class_weights": class_weights,
                "torch_rng": torch.get_rng_state(), "class_names": list(names), "config": config["cfg"],
                "history": history}

    def final() -> dict[str, Any]:
        """Rank 0: the selected student on T (after fine-tuning, when there was any, and the
        MPL stage's choice as well), and where the run began."""
        out = _test_metrics(selected(), best_state, inputs, spec_eval, columns, device, amp, m.batch_size)
        if mpl_best is not None:
            before = _test_metrics(selected(), mpl_best, inputs, spec_eval, columns, device, amp, m.batch_size)
            out.update({f"{PRE_FINETUNE}{k}": v for k, v in before.items()})
        return {**out, "resumed_from_epoch": -1 if resumed_from is None else resumed_from,
                "param_digest": param_digest(_unwrap(student)),
                "teacher_param_digest": param_digest(_unwrap(teacher))}

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ipb-label") if rank == 0 and ipb else None
    pending: dict[int, concurrent.futures.Future] = {}

    def start_pass(e: int) -> None:
        """Rank 0: label every unlabelled colony for MPL epoch ``e`` with the teacher as it
        is now, in the background (it overlaps validation and checkpointing)."""
        weights = ray.put(snapshot(teacher))

        def work() -> tuple[LabelTable, float]:
            t0 = time.perf_counter()
            ray.get(p_state.set.remote(e, {cid: 1 for cid in inputs.unlabelled}))
            ray.get(p_state.publish.remote(time.time_ns(), [weights]))
            labelled = run_labelling(labelling_dataset(
                inputs.catalog, spec_label, config["label_state"], model_kwargs(cfg, n_cls, inputs),
                batch_size=max(4 * m.unlabelled_batch_size, 128), cpus=r.data_cpus, actors=r.teacher_actors,
                gpus=r.label_gpus, use_actors=r.label_stage == "actors" or (r.label_stage == "auto"
                                                                            and r.label_gpus > 0)))
            return labelled, time.perf_counter() - t0

        pending[e] = pool.submit(work)

    def finish_pass(e: int) -> tuple[LabelTable, float, float]:
        """The labelling of epoch ``e`` (started now if it was not prefetched): the table,
        how long the pass took, and how long the epoch had to wait for it."""
        if e not in pending:
            start_pass(e)
        t0 = time.perf_counter()
        labelled, took = pending.pop(e).result()
        if len(labelled) != len(inputs.unlabelled):
            raise RuntimeError(f"the labelling pass labelled {len(labelled)} of {len(inputs.unlabelled)} "
                               "unlabelled colonies")
        return labelled, took, time.perf_counter() - t0

    def labelled_counts(epoch: int, n: int) -> dict[str, int]:
        return labelled_draws(inputs, n, cfg.seed, epoch, m.balance_labelled)

    for g in range(start, total):
        t_epoch = time.perf_counter()
        metrics: dict[str, Any] = {"epoch": g, "world_size": world}
        if g < m.teacher_epochs:  # ---- teacher pre-training on (balanced) L
            if rank == 0:
                ray.get(l_state.set.remote(g, labelled_counts(g, t_steps * world * m.batch_size)))
            ray.train.collective.barrier()
            sup = supervised_epoch(teacher, t_opt, shuffled(ray.train.get_dataset_shard("train"), spec_train,
                                                            m.batch_size, cfg, g, rank, device),
                                   columns, device, amp, m, pretrain_lr, g * t_steps)
            if rank == 0:
                recalibrate(teacher, spec_plain, columns, device, amp, m.batch_size, **calib)
            if rank == 0 and ipb and g == m.teacher_epochs - 1:
                start_pass(0)  # the final teacher labels MPL epoch 0 while validation runs
            metrics.update({"phase": 0, "teacher_lr": t_opt.param_groups[0]["lr"],
                           **{f"teacher_{k}": v for k, v in sup.items()}})
            if rank == 0:
                val = validate(teacher, inputs, spec_eval, columns, device, amp, m.batch_size)
                if val is not None:
                    metrics["teacher_val_balanced_accuracy"] = val["balanced_accuracy"]
                    metrics["objective"] = val["balanced_accuracy"]  # the teacher is all there is yet
            metrics["epoch_seconds"] = time.perf_counter() - t_epoch
            if rank == 0:
                history.append(dict(metrics))
            report_epoch(metrics, checkpoint_state(g) if rank == 0 else None, config)
            continue

        if g >= ft_start:  # ---- fine-tuning the MPL stage's selected student on (balanced) L
            if mpl_best is None:  # its first epoch: start from that student (rank 0 chose it); select anew on V
                mpl_best, best_metric, best_state = _from_rank_zero(best_state), -1.0, None
                _unwrap(student).load_state_dict(mpl_best)
            if rank == 0:
                ray.get(l_state.set.remote(g, labelled_counts(g, t_steps * world * m.batch_size)))
            ray.train.collective.barrier()
            sup = supervised_epoch(student, ft_opt, shuffled(ray.train.get_dataset_shard("train"), spec_train,
                                                             m.batch_size, cfg, g, rank, device),
                                   columns, device, amp, m, finetune_lr, (g - ft_start) * t_steps)
            metrics.update({"phase": 2, "finetune_lr": ft_opt.param_groups[0]["lr"],
                            **{f"finetune_{k}": v for k, v in sup.items()}})
            state = None
            if rank == 0:
                recalibrate(student, spec_plain, columns, device, amp, m.batch_size, **calib)
                val = validate(student, inputs, spec_eval, columns, device, amp, m.batch_size)
                if val is not None:
                    metrics["student_val_balanced_accuracy"] = metrics["objective"] = val["balanced_accuracy"]
                score = val["balanced_accuracy"] if val is not None else float(g)  # no V: the latest
                if score >= best_metric:
                    best_metric, best_state = score, snapshot(student)
                    metrics["best_epoch"] = g
                metrics["epoch_seconds"] = time.perf_counter() - t_epoch
                history.append(dict(metrics))
                state = checkpoint_state(g)
                if g == total - 1:
                    metrics.update(final())
            report_epoch(metrics, state, config)
            continue

        e = g - m.teacher_epochs  # ---- one MPL / IPB epoch
        if e == 0 and m.student_init == "teacher":  # every rank: the student starts as the pre-trained teacher
            _unwrap(student).load_state_dict(_unwrap(teacher).state_dict())
            if ema is not None:
                ema.load_state_dict(_unwrap(student).state_dict())
        plan_metrics: dict[str, Any] = {}
        if rank == 0:
            label_s = pass_s = 0.0
            if ipb and (m.relabel == "pass" or table is None):
                table, pass_s, label_s = finish_pass(e)
            t0 = time.perf_counter()
            plan = epoch_plan(inputs.unlabelled, table if ipb else None, n_cls, cfg.seed, e, n_draws, names)
            ray.get(u_state.set.remote(e, plan.counts, plan.coords))
            ray.get(l_state.set.remote(g, labelled_counts(g, n_labelled)))
            plan_metrics = {"label_seconds": label_s, "label_pass_seconds": pass_s,
                            "plan_seconds": time.perf_counter() - t0,
                            "unlabelled_draws": n_draws}
            if plan.balance is not None:
                class_weights = plan.balance.class_weights.tolist()
                plan_metrics.update(_per_class("teacher_proportion", plan.balance.proportions, names))
                plan_metrics.update(_per_class("sampling_weight", plan.balance.class_weights, names))
                plan_metrics["missing_classes"] = len(plan.balance.missing)
                tpr, acc = pseudo_label_tpr(table, n_cls)
                plan_metrics.update(_per_class("pseudo_tpr", tpr, names))
                plan_metrics["pseudo_accuracy"] = acc
        ray.train.collective.barrier()

        s_base = student_lr_at(e, m)
        teacher.train()
        student.train()
        l_iter = iter(shuffled(ray.train.get_dataset_shard("train"), spec_train, m.batch_size, cfg, g, rank, device))
        u_iter = iter(shuffled(ray.train.get_dataset_shard("unlabelled"), spec_uda, m.unlabelled_batch_size, cfg,
                               g, rank, device))
        timer, sums = _Timer(), torch.zeros(len(STEP_METRICS), dtype=torch.float64)
        step_counts = np.zeros(n_cls, np.int64)
        seen: list[str] = []
        seen_labels: list[int] = []
        last: dict[str, Any] = {}
        weak = [f"weak{s}" for s in spec_uda.geometry.scales]
        strong = [f"strong{s}" for s in spec_uda.geometry.scales]
        for i in range(steps):
            bl, bu = next(l_iter), next(u_iter)
            timer.got()
            f = lr_factor(e * steps + i, mpl_total, mpl_warm, m.schedule)
            set_lr(s_opt, s_base * f)
            set_lr(t_opt, m.teacher_lr * f)
            last = mpl_step(teacher, student, t_opt, s_opt, _inputs(bl, columns, device), bl["label"].to(device),
                            _inputs(bu, weak, device), _inputs(bu, strong, device), step=global_step, cfg=m,
                            autocast=lambda: _autocast(device, amp))
            if ema is not None:
                ema_update(ema, _unwrap(student), m.ema)
            global_step += 1
            sums += torch.tensor([last[k] for k in STEP_METRICS], dtype=torch.float64)
            step_counts += np.asarray(last["pseudo_label_counts"], np.int64)
            seen.extend(bu["colony_id"])
            seen_labels.extend(last["pseudo_labels"])
            timer.resume()
        for _ in l_iter:  # the shares hold exactly `steps` batches; finish both executions cleanly
            pass
        for _ in u_iter:
            pass
        metrics.update(timer.metrics(float(steps * m.unlabelled_batch_size * world)))
        s_lr, t_lr = s_opt.param_groups[0]["lr"], t_opt.param_groups[0]["lr"]
        if rank == 0:  # eval-mode statistics of un-augmented L, before labelling and validation
            recalibrate([teacher, selected()], spec_plain, columns, device, amp, m.batch_size, **calib)
        if rank == 0 and ipb and m.relabel == "pass" and g + 1 < ft_start:
            start_pass(e + 1)  # the teacher is final for this epoch: label the next one meanwhile
        _all_reduce(sums)
        gathered = _gather((seen, seen_labels, step_counts))
        metrics.update({"phase": 1, "mpl_epoch": e, "student_lr": s_lr, "teacher_lr": t_lr,
                        "uda_weight": float(last.get("uda_weight", 0.0)), "global_step": global_step,
                        "train_steps": steps, **{k: float(v) / (steps * world) for k, v in zip(STEP_METRICS, sums)}})
        state = None
        if rank == 0:
            metrics.update(plan_metrics)
            ids = [c for part in gathered for c in part[0]]
            stream_pseudo = [p for part in gathered for p in part[1]]
            metrics.update(_shares("step_pseudo_share", sum(part[2] for part in gathered), names))
            metrics.update(_shares("unlabelled_true_share", class_histogram(u_truth, n_cls), names))
            metrics.update(_shares("stream_true_share", class_histogram([truth_of[c] for c in ids], n_cls), names))
            if ipb and table is not None:
                # the student's stream by the pseudo-label its window was drawn with
                rows = table.lookup(ids)
                metrics.update(_shares("stream_share", class_histogram(table.pseudo[rows], n_cls), names))
                if m.relabel == "reuse":
                    table = table.with_labels(ids, stream_pseudo)
            for tag, net in (("student", selected()), ("teacher", teacher)):
                val = validate(net, inputs, spec_eval, columns, device, amp, m.batch_size)
                if val is not None:
                    metrics[f"{tag}_val_balanced_accuracy"] = val["balanced_accuracy"]
            if "student_val_balanced_accuracy" in metrics:
                metrics["objective"] = metrics["student_val_balanced_accuracy"]
            score = metrics.get("student_val_balanced_accuracy", float(g))  # no V: the latest student
            if score >= best_metric:
                best_metric, best_state = score, snapshot(selected())
                metrics["best_epoch"] = g
            metrics["epoch_seconds"] = time.perf_counter() - t_epoch
            history.append(dict(metrics))
            state = checkpoint_state(g)
            if g == total - 1:
                metrics.update(final())
        report_epoch(metrics, state, config)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    if start >= total:  # the run had already finished: test its selected student again
        report_finished(state, final, rank, world, total - 1, config)
    write_digest(config, rank, student)
