"""Hyperparameter search: Ray Tune with Optuna (TPE) and ASHA, tracked in MLflow.

A search space is a YAML file of dotted config keys::

    method.mpl.teacher_lr: {type: loguniform, low: 1.0e-4, high: 0.05}
    method.mpl.threshold: {type: uniform, low: 0.5, high: 0.95}
    method.mpl.student_warmup_epochs: {type: randint, low: 0, high: 10}   # high exclusive
    method.batch_size: {type: choice, values: [16, 32, 64]}

:func:`load_space` checks every key against the config schema and every bound (or
choice) by building the config with it, so a typo fails before any trial starts.

Each trial (:func:`_trial`) is a Tune function that runs :func:`ipb_ray.distributed.training.train_fold`
with the trial's overrides; the Train run forwards every epoch's ``objective`` (the
validation balanced accuracy of the student, or of the teacher while it pre-trains) to
Tune through ``TuneReportCallback``, and ASHA stops trials that fall behind. With
``objective: kfold`` a trial runs k folds one after another and reports the running
mean of their final validation scores after each fold. The test folds are never used.

The Optuna study lives in a SQLite file beside the search's results, so
``--resume`` adds trials to the same study (and ``optuna-dashboard sqlite:///...``
can read it). MLflow gets one parent run per search and one child run per trial; the
best trial's config is written as a YAML that ``ipb cv --config`` takes unchanged.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from ipb_ray.config import ConfigError, ExperimentConfig, dump_yaml, flatten, from_dict, to_dict

__all__ = [
    "METRIC", "OBJECTIVES", "SPACE_TYPES", "SearchResult", "best_config", "epochs_of", "load_space",
    "run_search", "trial_config", "tune_space",
]

log = logging.getLogger(__name__)

SPACE_TYPES = ("loguniform", "uniform", "randint", "choice")
OBJECTIVES = ("fold", "kfold")
METRIC = "objective"


# --------------------------------------------------------------------------- spaces (pure)

def load_space(path: str | Path, cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Read and check a search-space YAML against ``cfg``'s schema (a ``method.*`` key must
    be one the configured method reads: :meth:`ipb_ray.methods.Method.keys`); returns
    ``{key: spec}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search space {path} not found (see tune/spaces/ipb.yaml for an example)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(path)) from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("a search space is a mapping of dotted config keys to {type, low, high} or "
                          "{type: choice, values: [...]}", source=str(path))
    from ipb_ray.methods import get_method

    known = flatten(cfg)
    method_keys = set(get_method(cfg.method.name).keys(cfg))
    space: dict[str, dict[str, Any]] = {}
    for key, spec in raw.items():
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"not a config key{hint}", key=str(key), source=str(path))
        if key.startswith("method.") and key.split(".", 1)[1] not in method_keys:
            from ipb_ray.methods.base import own_keys

            own = [f"method.{k}" for k in own_keys(get_method(cfg.method.name))]
            raise ConfigError(f"method {cfg.method.name!r} does not read this key, so searching it would change "
                              f"nothing; its own keys: {', '.join(own) or 'none'} (plus the shared ones: "
                              "`ipb config methods`); remove it from the space or search another method",
                              key=str(key), source=str(path))
        if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
            raise ConfigError(f"give a mapping with type one of {', '.join(SPACE_TYPES)}", key=key, source=str(path))
        kind = spec["type"]
        if kind == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError("type choice needs a non-empty list 'values'", key=key, source=str(path))
            probes = values
        else:
            lo, hi = spec.get("low"), spec.get("high")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
                raise ConfigError(f"needs numbers low < high, got low={lo!r} high={hi!r}", key=key, source=str(path))
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"loguniform needs low > 0, got {lo}", key=key, source=str(path))
            if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
                raise ConfigError("randint needs whole-number bounds (high is exclusive)", key=key, source=str(path))
            probes = [lo, hi - 1 if kind == "randint" else hi]
        for value in probes:  # every bound must make a valid config
            try:
                cfg.replace(f"{key}={json.dumps(value)}")
            except ConfigError as exc:
                raise ConfigError(f"value {value!r} is not allowed: {exc.detail}", key=key, source=str(path)) from None
        space[key] = dict(spec)
    return space


def tune_space(space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Ray Tune domains of a checked space."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind == "loguniform":
            out[key] = tune.loguniform(spec["low"], spec["high"])
        elif kind == "uniform":
            out[key] = tune.uniform(spec["low"], spec["high"])
        elif kind == "randint":
            out[key] = tune.randint(int(spec["low"]), int(spec["high"]))
        else:
            out[key] = tune.choice(list(spec["values"]))
    return out


def trial_config(base: ExperimentConfig, params: Mapping[str, Any], trial_name: str) -> ExperimentConfig:
    """The config a trial runs: the base with the sampled values and its own run name."""
    return base.replace(*(f"{k}={json.dumps(_plain(v))}" for k, v in params.items()),
                        f"name={base.name}-{trial_name}")


def _plain(v: Any) -> Any:
    """numpy scalars -> Python numbers (Tune samples numpy types)."""
    return v.item() if hasattr(v, "item") else v


def best_config(base: ExperimentConfig, params: Mapping[str, Any]) -> ExperimentConfig:
    return base.replace(*(f"{k}={json.dumps(_plain(v))}" for k, v in params.items()))


# --------------------------------------------------------------------------- the trial

def _trial(config: dict[str, Any]) -> None:
    """Tune function: one trial = train_fold (or k of them) with the trial's parameters."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ipb_ray.data.fold_views import resolve_fold_catalog
    from ipb_ray.distributed.fold import run_fold

    base: ExperimentConfig = from_dict(config["__base__"])
    meta = config["__meta__"]
    params = {k: v for k, v in config.items() if not k.startswith("__")}
    name = ray.tune.get_context().get_trial_name() or "trial"
    # the folds of the trial's own split.* (a space may vary it): the catalog or a view of it
    cfg = resolve_fold_catalog(trial_config(base, params, name.replace("_", "-")))
    if meta["objective"] == "fold":
        run_fold(cfg, meta["folds"][0], callbacks=[TuneReportCallback()], curves=False)
        _settle_reports()
        return
    scores = []
    for i, fold in enumerate(meta["folds"]):  # k folds: the running mean after each
        result = run_fold(cfg, fold, curves=False)
        history = result.get("history", [])
        scores.append(next((h[METRIC] for h in reversed(history) if _finite(h.get(METRIC))),
                           _best_val(history)))
        ray.tune.report({METRIC: float(sum(scores) / len(scores)), "folds_done": i + 1})


def _settle_reports(timeout_s: float = 60.0, grace_s: float = 0.5) -> None:
    """Wait until Tune's trial actor has taken every epoch report that Ray Train's
    ``TuneReportCallback`` queued for it, before the trial function returns.

    On this Ray (2.5x) the callback hands reports to the trial actor through a one-slot
    Ray queue, and the function's return puts Tune's end-of-trial marker into the actor's
    one-slot result queue; if the last report is still in the first queue then, the
    actor's main thread blocks putting it into the second one, behind the marker nobody
    will take, and the trial (and the search) hangs for ever. Seen once in the test suite;
    waiting for the queue to empty, then a moment for the main thread to pass the report
    on, closes the window."""
    import time

    try:
        from ray.train._internal.session import get_session

        queue = getattr(get_session(), "_inter_actor_queue", None)
    except Exception:  # another Ray: nothing to wait for
        return
    deadline = time.monotonic() + timeout_s
    while queue is not None and time.monotonic() < deadline:
        try:
            if queue.empty():
                break
        except Exception:
            return
        time.sleep(0.05)
    time.sleep(grace_s)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _best_val(history: list[dict[str, Any]]) -> float:
    for h in reversed(history):
        if _finite(h.get("val_balanced_accuracy")):
            return float(h["val_balanced_accuracy"])
    return float("nan")


# --------------------------------------------------------------------------- the search

@dataclass
class SearchResult:
    best_params: dict[str, Any]
    best_value: float
    best_yaml: Path
    trials: list[dict[str, Any]]  # one per trial: params, objective, iterations, status
    importances: dict[str, float]
    study_storage: str
    parent_run_id: str


def epochs_of(cfg: ExperimentConfig) -> int:
    """Reports a one-fold trial makes (ASHA's time axis)."""
    from ipb_ray.methods import total_epochs

    return total_epochs(cfg)


def _placement_groups() -> set[str]:
    import ray.util

    return set(ray.util.placement_group_table())


def _release_placement_groups(before: set[str]) -> None:
    """Remove the placement groups the search's trials left reserved. A trial that ASHA
    stops is killed mid-run, and on this Ray (2.5x) the placement group of its Ray Train
    run can outlive it, holding the Train workers' CPUs: a later search (``--resume``) on
    a small cluster would then wait forever for a CPU. Every trial has ended here, so any
    placement group created since the search began is garbage."""
    import ray
    import ray.util
    from ray.util.placement_group import PlacementGroup

    for pg_id, info in ray.util.placement_group_table().items():
        if pg_id not in before and info.get("state") != "REMOVED":
            try:
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
                log.info("released placement group %s left by a stopped trial", pg_id)
            except Exception as exc:  # noqa: BLE001 - already gone is fine
                log.debug("placement group %s: %s", pg_id, exc)


def run_search(cfg: ExperimentConfig, space_path: str | Path, trials: int, *, out: str | Path,
               objective: str = "fold", folds: tuple[int, ...] = (0,), resume: bool = False,
               max_concurrent: int | None = None, grace_period: int = 1, reduction_factor: int = 2,
               seed: int | None = None, points_to_evaluate: list[dict[str, Any]] | None = None) -> SearchResult:
    """Run ``trials`` trials of a search over ``space_path`` on the Ray cluster.

    ``out``: directory for the Optuna study (``study.db``), Tune's results and ``best.yaml``.
    ``resume``: add the trials to the study already in ``out`` (refused without one; a new
    search refuses an existing study so nothing is mixed by accident). ``points_to_evaluate``:
    parameter sets to try first (e.g. the preset's own values), before TPE proposes."""
    import optuna
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from ipb_ray.tracking import runs as tracking
    from ipb_ray.cluster.paths import check_cluster_paths
    from ipb_ray.data.fold_views import resolve_fold_catalog
    from ipb_ray.distributed.ray_setup import init_ray

    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if cfg.resources.num_workers == 0:  # Ray Train refuses its API inside a Tune function
        raise ValueError("resources.num_workers=0 (Ray Train's local mode) cannot run inside a Tune trial; "
                         "search with resources.num_workers=1 or more (each trial trains on Train workers)")
    space = load_space(space_path, cfg)
    out = Path(out).resolve()
    db = out / "study.db"
    if resume and not db.exists():
        raise FileNotFoundError(f"--resume: no study in {out} (expected {db}); start the search without --resume")
    if not resume and db.exists():
        raise FileExistsError(f"{out} already holds a study ({db}); pass --resume to add trials to it, "
                              "or choose another --out")
    # Draw the base's folds (into a view when the catalog's plan is another split) once, here,
    # so a bad split.* fails before any trial and trials only read them; trials resolve the
    # catalog from an absolute path, whatever their working directory.
    resolve_fold_catalog(cfg)
    trial_base = cfg if "://" in cfg.data.catalog else \
        cfg.replace(f"data.catalog={Path(cfg.data.catalog).resolve()}")
    init_ray(cfg.resources)
    check_cluster_paths(cfg, {"--out": str(out)})
    out.mkdir(parents=True, exist_ok=True)
    storage_url = f"sqlite:///{db}"
    study_name = "ipb-search"
    seed = cfg.seed if seed is None else seed
    previous = len(optuna.load_study(study_name=study_name, storage=storage_url).trials) if resume else 0
    for point in points_to_evaluate or []:
        unknown = set(point) - set(space)
        if unknown:
            raise ValueError(f"points_to_evaluate names {sorted(unknown)}, which the space {space_path} does not hold")
    searcher = OptunaSearch(metric=METRIC, mode="max", sampler=optuna.samplers.TPESampler(seed=seed + previous),
                            study_name=study_name, storage=optuna.storages.RDBStorage(storage_url),
                            points_to_evaluate=points_to_evaluate or None)
    max_t = len(folds) if objective == "kfold" else epochs_of(cfg)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(max_t, 1), grace_period=grace_period,
                              reduction_factor=reduction_factor)
    r = cfg.resources
    per_trial = max(r.num_workers, 1) * r.cpus_per_worker + r.data_cpus
    if max_concurrent is None:
        import ray

        max_concurrent = max(1, int(ray.cluster_resources().get("CPU", 1.0) // (per_trial + 0.5)))
    uri, experiment = cfg.tracking.tracking_uri, cfg.tracking.experiment
    parent = tracking.open_search_parent(uri, experiment, cfg, out, space)
    base = {"__base__": to_dict(trial_base), "__meta__": {"objective": objective, "folds": list(folds)}}
    trainable = tune.with_resources(_trial, {"CPU": 0.01})  # the trial only waits on its Train run
    tuner = tune.Tuner(
        trainable, param_space={**base, **tune_space(space)},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric=METRIC, mode="max",
                                    num_samples=trials, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name=f"search-{previous}", storage_path=str(out / "tune"),
                                  callbacks=[MLflowLoggerCallback(
                                      tracking_uri=uri, experiment_name=experiment, save_artifact=False,
                                      tags={tracking.PARENT_TAG: parent, tracking.Tag.KIND: "trial"})]))
    before = _placement_groups()
    try:
        grid = tuner.fit()
    finally:
        _release_placement_groups(before)
    rows = []
    for res in grid:
        params = {k: _plain(v) for k, v in (res.config or {}).items() if not k.startswith("__")}
        metrics = res.metrics or {}
        rows.append({"trial": metrics.get("trial_id", ""), "params": params,
                     METRIC: metrics.get(METRIC, float("nan")),
                     "iterations": metrics.get("training_iteration", 0),
                     "error": str(res.error)[:200] if res.error else ""})
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if not done:
        raise RuntimeError(f"no trial of the search in {out} completed; see the trial errors in {out / 'tune'}")
    best = max(done, key=lambda t: t.value)
    best_params = dict(best.params)
    best_cfg = best_config(cfg, best_params)
    best_yaml = out / "best.yaml"
    best_yaml.write_text("# best trial of `ipb tune` (objective %s = %.4f); run it with `ipb cv --config %s`\n"
                         % (objective, best.value, best_yaml) + dump_yaml(best_cfg))
    try:
        importances = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as exc:  # too few distinct trials
        log.info("no parameter importances: %s", exc)
        importances = {}
    tracking.close_search_parent(uri, parent, best_params, float(best.value), best_yaml, importances)
    return SearchResult(best_params, float(best.value), best_yaml, rows, importances, storage_url, parent)
