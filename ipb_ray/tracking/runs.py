"""MLflow tracking of a cross-validation experiment (one configuration, all its folds).

Layout in the tracking store (the names are the contract with :mod:`ipb_ray.tracking.report`):

- **parent run**, one per configuration, named ``"{cfg.name}-{cfg.method.name}"`` unless
  given; tags ``ipb.kind = "cv"``, ``ipb.config_key`` (:func:`config_key`), ``ipb.method``,
  ``ipb.balancer`` (the balancer of U, "" for a supervised method), ``ipb.preset``, ``ipb.git_commit``, ``ipb.data_fingerprint``, ``ipb.labelled_fraction``,
  ``ipb.backbone``; params :func:`ipb_ray.config.flatten` of the config (values ``str()``-ed);
  after the last fold (:func:`log_summary`) metrics ``cv_{macro_tpr,macro_f1,
  balanced_accuracy,accuracy}_{mean,std}``, ``cv_{tpr,f1}_{mean,std}/<class>`` and
  ``cv_folds``; artifacts ``cv_summary.json`` (:func:`ipb_ray.evaluation.stats.aggregate_folds`),
  ``fold_reports.json`` (``[{"fold": k, "report": classification_report}, ...]`` in fold
  order), ``cv_confusion_matrix.png`` (summed over folds) and ``config.yaml`` (the
  resolved configuration, from which ``ipb register`` rebuilds the patch geometry).
- **child run** per fold (:func:`open_fold` when the fold starts, :func:`log_fold` when it
  ends), named ``"{parent name}-fold{k}"``; tags ``mlflow.parentRunId``, ``ipb.kind =
  "fold"``, ``ipb.fold``, ``ipb.config_key``; metrics: every numeric key of the per-epoch
  history (step = epoch, names sanitised to MLflow's characters), logged by the training
  loop's rank 0 as each epoch ends (:func:`log_epoch`: ``mlflow ui`` draws a running
  fold's curves; a resumed fold keeps its run), and the final ``test_{macro_tpr,macro_f1,balanced_accuracy,accuracy}``,
  ``test_{tpr,f1,precision}/<class>`` (a run with ``method.finetune_epochs`` also
  logs the choice of the stage before fine-tuning as ``pre_finetune_test_*`` and
  ``pre_finetune_test_report.json``); artifacts ``test_report.json``,
  ``confusion_matrix.json`` (``{"class_names": [...], "matrix": [[...]]}``, rows = true
  class), ``confusion_matrix.png``, ``history.json``; and optionally the selected network
  as an MLflow model named ``model`` (load it with ``mlflow.pytorch.load_model(
  "runs:/<child id>/model")`` or pyfunc): it takes one float32 batch ``(N, 1, S, S)`` in
  [0, 1], S the largest patch side, cuts the centre itself for a multi-scale network and
  returns softmax probabilities ``(N, C)``. It is pickled (unpickling needs ``ipb_ray``
  importable); MLflow 3 keeps it as a *logged model* linked to the run, so it is not in the
  run's artifact list: the tag ``ipb.model_uri`` holds its ``models:/<id>`` URI.

Resuming: :func:`open_parent` reuses the parent run of an equal configuration (same
``ipb.config_key`` and run name), :func:`finished_folds` says which folds already have a
finished child run (the CV driver skips them), and :func:`log_fold` supersedes any older
child run of the same fold (tag ``ipb.superseded_by``; a still RUNNING one is marked KILLED).

Every function takes the tracking URI explicitly and works through an
``mlflow.MlflowClient``; only logging the model goes through MLflow's fluent API, with the
URI set for the call and restored after it (under a lock). Experiments are created when
missing; with a SQLite store the artifacts go next to the database (``mlartifacts/``)
rather than into the current directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ipb_ray.config import ExperimentConfig, dump_yaml, flatten, to_dict
from ipb_ray.tracking.packaging import load_best_model, model_input_side, probability_model
from ipb_ray.tracking.viz import plot_confusion

__all__ = [
    "absolute_uri", "client_for", "close_search_parent", "CONFIG_ARTIFACT", "config_key", "CV_KIND",
    "CV_SUMMARY", "data_fingerprint", "find_parent", "finished_folds", "fluent_run", "fluent_uri",
    "fold_children", "FOLD_KIND", "FOLD_REPORTS", "git_commit", "load_cv", "log_epoch",
    "log_fold", "log_summary", "MODEL_NAME", "open_fold", "open_parent", "open_search_parent", "PARENT_TAG",
    "PRE_FINETUNE_REPORT", "quiet_downloads", "sanitize_metric_name", "SEARCH_KIND",
    "Tag", "TEST_REPORT",
]

log = logging.getLogger(__name__)


class Tag:
    """The ``ipb.*`` tag names of the tracking layout (the module docstring), in one place."""

    BACKBONE = "ipb.backbone"
    BALANCER = "ipb.balancer"
    CHECKPOINT = "ipb.checkpoint"
    CONFIG_KEY = "ipb.config_key"
    DATA_FINGERPRINT = "ipb.data_fingerprint"
    FOLD = "ipb.fold"
    GIT_COMMIT = "ipb.git_commit"
    KIND = "ipb.kind"
    LABELLED_FRACTION = "ipb.labelled_fraction"
    METHOD = "ipb.method"
    MODEL_URI = "ipb.model_uri"
    PARAM_DIGEST = "ipb.param_digest"
    PRESET = "ipb.preset"
    SEARCH_DIR = "ipb.search_dir"
    SUPERSEDED_BY = "ipb.superseded_by"


CV_KIND = "cv"
FOLD_KIND = "fold"
FOLD_REPORTS = "fold_reports.json"
CV_SUMMARY = "cv_summary.json"
TEST_REPORT = "test_report.json"
CONFIG_ARTIFACT = "config.yaml"  # a parent run's full resolved configuration
PRE_FINETUNE_REPORT = "pre_finetune_test_report.json"  # MPL/IPB with method.finetune_epochs: before fine-tuning
MODEL_NAME = "model"
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_VALUE = 6000          # MLflow's limit on a param value (characters)
_MAX_KEY = 250                   # MLflow's limit on a metric/param key
_PARAMS_PER_BATCH = 100          # MlflowClient.log_batch limits
_METRICS_PER_BATCH = 1000
_PROJECT_DIR = Path(__file__).resolve().parents[2]
# The fluent API (used to log the model) reads a process-wide tracking URI: one at a time.
_FLUENT_LOCK = threading.Lock()


# --------------------------------------------------------------------------- identities

def config_key(cfg: ExperimentConfig) -> str:
    """Short sha1 of the configuration without ``split.fold``, ``resources`` and
    ``tracking`` (which do not change results): equal configs, equal keys."""
    data = to_dict(cfg)
    data.pop("resources", None)
    data.pop("tracking", None)
    data.get("split", {}).pop("fold", None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def git_commit(path: str | Path = _PROJECT_DIR) -> str:
    """``git rev-parse HEAD`` of the checkout holding ``path``; "unknown" outside one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(path), capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,64}", commit) else "unknown"


def data_fingerprint(catalog: str | Path) -> str:
    """sha1 of the catalog's ``catalog.json`` and ``folds.json`` bytes (those present);
    "unknown" when neither is."""
    h = hashlib.sha1()
    found = False
    for name in ("catalog.json", "folds.json"):
        path = Path(catalog) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
            found = True
    return h.hexdigest() if found else "unknown"


_BAD_CHARS = re.compile(r"[^\w\-. /]")


def sanitize_metric_name(name: str) -> str:
    """A metric/param key MLflow accepts: alphanumerics, ``_ - . / space`` (others become
    ``_``), no empty, ``.`` or ``..`` path segments, at most 250 characters."""
    text = _BAD_CHARS.sub("_", str(name))
    parts = ["_" if p in (".", "..") else p for p in text.split("/") if p != ""]
    return ("/".join(parts) or "_")[:_MAX_KEY]


# --------------------------------------------------------------------------- helpers

def client_for(tracking_uri: str) -> Any:
    """An MLflow client of ``tracking_uri``. A SQLite store is opened (created and migrated
    when new) under a file lock beside the database: two commands that start at once on a
    new store would otherwise both run MLflow's schema migrations and one would fail."""
    import mlflow

    db = _sqlite_file(tracking_uri)
    if db is None:
        return mlflow.MlflowClient(tracking_uri)
    with _file_lock(db.with_name(db.name + ".ipb-lock")):
        client = mlflow.MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)  # the store's set-up happens here, one process at a time
    return client


def _sqlite_file(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return None if not db or db == ":memory:" else Path(db)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing); none where the platform
    has no ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sqlite_artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """``<database dir>/mlartifacts/<experiment>`` for a SQLite store (MLflow's default
    would be ``./mlruns`` of whatever directory the process runs in)."""
    db = _sqlite_file(tracking_uri)
    if db is None:
        return None
    safe = re.sub(r"[^\w.\-]", "_", experiment).strip(".") or "experiment"
    return (db.resolve().parent / "mlartifacts" / safe).as_uri()


def _experiment_id(client: Any, tracking_uri: str, experiment: str, create: bool) -> str | None:
    exp = client.get_experiment_by_name(experiment)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise ValueError(f"MLflow experiment {experiment!r} at {tracking_uri!r} is deleted; restore it "
                         "(mlflow experiments restore) or use another tracking.experiment")
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    try:
        return client.create_experiment(experiment, artifact_location=_sqlite_artifact_root(tracking_uri,
                                                                                            experiment))
    except Exception:  # created meanwhile by another process
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


def _get_run(client: Any, tracking_uri: str, run_id: str, what: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise ValueError(f"{what} {run_id!r} not found at tracking URI {tracking_uri!r} ({exc.message}); "
                         "pass the id returned by open_parent for this tracking URI") from None


def _search(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError(f"{value!r} contains a single quote, which MLflow search filters cannot hold")
    return f"'{value}'"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (NaN/inf/None/bool/str: None)."""
    if not _is_number(value):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):           # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


@contextlib.contextmanager
def quiet_downloads() -> Iterator[None]:
    """No MLflow progress bar per small artifact (unless the user set it explicitly)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if key in os.environ:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _log_metrics(client: Any, run_id: str, items: Sequence[tuple[str, Any, int]]) -> int:
    """Log (name, value, step) triples in batches; non-finite values are skipped."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(sanitize_metric_name(k), v, now, int(step))
               for k, value, step in items if (v := _finite(value)) is not None]
    for i in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + _METRICS_PER_BATCH])
    return len(metrics)


def _log_json(client: Any, run_id: str, obj: Any, name: str, tmp: Path) -> None:
    path = tmp / name
    path.write_text(json.dumps(obj, indent=2, default=_json_default), encoding="utf-8")
    client.log_artifact(run_id, str(path))


def _download_json(client: Any, run_id: str, name: str) -> Any:
    with tempfile.TemporaryDirectory(prefix="ipb-mlflow-") as tmp, quiet_downloads():
        local = client.download_artifacts(run_id, name, tmp)
        return json.loads(Path(local).read_text(encoding="utf-8"))


def _has_artifact(client: Any, run_id: str, name: str) -> bool:
    try:
        return any(f.path == name for f in client.list_artifacts(run_id))
    except Exception:
        return False


# --------------------------------------------------------------------------- parent run

def find_parent(tracking_uri: str, experiment: str, cfg: ExperimentConfig,
                run_name: str | None = None) -> str | None:
    """The newest parent run of ``cfg`` (same ``ipb.config_key`` and run name) in
    ``experiment``, or None (also when the experiment does not exist)."""
    client = client_for(tracking_uri)
    eid = _experiment_id(client, tracking_uri, experiment, create=False)
    if eid is None:
        return None
    name = run_name or f"{cfg.name}-{cfg.method.name}"
    runs = _search(client, eid, f"tags.`ipb.kind` = '{CV_KIND}' and "
                                f"tags.`ipb.config_key` = {_quote(config_key(cfg))}")
    for r in runs:  # newest first
        if r.info.run_name == name:
            return r.info.run_id
    return None


def open_parent(tracking_uri: str, experiment: str, cfg: ExperimentConfig, run_name: str | None = None) -> str:
    """The parent run id of ``cfg``'s cross-validation: an existing one of the same
    configuration and name (resumed), else a new run with tags and params set."""
    from mlflow.entities import Param

    name = run_name or f"{cfg.name}-{cfg.method.name}"
    found = find_parent(tracking_uri, experiment, cfg, run_name=name)
    client = client_for(tracking_uri)
    if found is not None:
        run = client.get_run(found)
        if run.info.status in ("FAILED", "KILLED"):
            client.update_run(found, status="RUNNING")
        log.info("resuming MLflow parent run %s (%s) in experiment %r", name, found, experiment)
        return found
    eid = _experiment_id(client, tracking_uri, experiment, create=True)
    tags = {
        Tag.KIND: CV_KIND,
        Tag.CONFIG_KEY: config_key(cfg),
        Tag.METHOD: cfg.method.name,
        Tag.BALANCER: _balancer(cfg),
        Tag.PRESET: cfg.preset or "",
        Tag.GIT_COMMIT: git_commit(),
        Tag.DATA_FINGERPRINT: data_fingerprint(cfg.data.catalog),
        Tag.LABELLED_FRACTION: str(cfg.split.labelled_fraction),
        Tag.BACKBONE: cfg.model.backbone,
    }
    run = client.create_run(eid, run_name=name, tags=tags)
    rid = run.info.run_id
    try:
        params = [Param(sanitize_metric_name(k), str(v)[:_MAX_PARAM_VALUE]) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), _PARAMS_PER_BATCH):
            client.log_batch(rid, params=params[i:i + _PARAMS_PER_BATCH])
        client.log_text(rid, dump_yaml(cfg), CONFIG_ARTIFACT)  # the exact config, for `ipb register`
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    return rid


# --------------------------------------------------------------------------- fold runs

def fold_children(client: Any, experiment_id: str, parent_id: str, fold: int | None = None) -> list[Any]:
    filt = f"tags.`{PARENT_TAG}` = {_quote(parent_id)} and tags.`ipb.kind` = '{FOLD_KIND}'"
    if fold is not None:
        filt += f" and tags.`ipb.fold` = '{int(fold)}'"
    return _search(client, experiment_id, filt)


def _history_metrics(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any, int]]:
    items: list[tuple[str, Any, int]] = []
    for i, row in enumerate(history or []):
        if not isinstance(row, Mapping):
            continue
        epoch = row.get("epoch", i)
        step = int(epoch) if _is_number(epoch) else i
        items.extend((key, value, step) for key, value in row.items()
                     if key != "epoch" and _is_number(value))
    return items


def _balancer(cfg: ExperimentConfig) -> str:
    """The balancer a run of ``cfg`` streams U through ("" for a supervised method)."""
    from ipb_ray.methods import get_method

    method = get_method(cfg.method.name)
    return method.balancer_name(cfg) if method.semi_supervised else ""


def _final_metrics(report: Mapping[str, Any], prefix: str = "test_") -> list[tuple[str, Any, int]]:
    items: list[tuple[str, Any, int]] = [(f"{prefix}{k}", report.get(k), 0) for k in
                                         ("macro_tpr", "macro_f1", "balanced_accuracy", "accuracy")]
    for metric in ("tpr", "f1", "precision"):
        items.extend((f"{prefix}{metric}/{c}", v, 0) for c, v in (report.get(metric) or {}).items())
    return items


@contextlib.contextmanager
def fluent_run(tracking_uri: str, run_id: str) -> Iterator[None]:
    """MLflow's fluent API pointed at ``tracking_uri`` with ``run_id`` active, restored on
    exit. The run ends FINISHED (FAILED on an exception), as ``mlflow.start_run`` does."""
    import mlflow

    with fluent_uri(tracking_uri):
        nested = mlflow.active_run() is not None
        with mlflow.start_run(run_id=run_id, nested=nested):
            yield


@contextlib.contextmanager
def fluent_uri(tracking_uri: str | None) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.pytorch.load_model``, ``get_model_info``...) pointed at
    ``tracking_uri`` (None: left as it is), restored on exit, one caller at a time."""
    import mlflow

    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover - older/newer MLflow without the helper
        _use_tracking_uri = None

    with _FLUENT_LOCK:
        if tracking_uri is None:
            yield
        elif _use_tracking_uri is not None:
            with _use_tracking_uri(tracking_uri):
                yield
        else:  # pragma: no cover
            old = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(tracking_uri)
            try:
                yield
            finally:
                mlflow.set_tracking_uri(old)


def _log_model(tracking_uri: str, run_id: str, net: Any, cfg: ExperimentConfig,
               class_names: Sequence[str]) -> str:
    """Log ``net`` as the MLflow model ``model`` of ``run_id`` (ending the run FINISHED);
    returns its model URI."""
    from importlib.metadata import PackageNotFoundError, version

    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch

    side = model_input_side(cfg)
    wrapped = probability_model(net, cfg.data.multi_scale, cfg.data.local_patch)
    example = np.random.default_rng(0).random((2, 1, side, side), dtype=np.float32)
    with torch.no_grad():
        probs = wrapped(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, probs)
    reqs = []
    for dist in ("torch", "cloudpickle", "numpy"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    metadata = {"class_names": list(class_names), "input": f"float32 (N, 1, {side}, {side}) in [0, 1]",
                "output": "softmax probabilities (N, C) in class_names order",
                "multi_scale": bool(cfg.data.multi_scale), "local_patch": int(cfg.data.local_patch),
                "backbone": cfg.model.backbone}
    pt_logger = logging.getLogger("mlflow.pytorch")
    old_level = pt_logger.level
    with fluent_run(tracking_uri, run_id):
        pt_logger.setLevel(logging.ERROR)  # the pickle-format caution on every call
        try:
            # pickle: the pt2 default (torch.export) takes many times longer and needs an example
            info = mlflow.pytorch.log_model(wrapped, name=MODEL_NAME, signature=signature,
                                            pip_requirements=reqs, serialization_format="pickle",
                                            metadata=metadata)
        finally:
            pt_logger.setLevel(old_level)
    return info.model_uri


def _cv_parent(client: Any, tracking_uri: str, parent_id: str) -> Any:
    parent = _get_run(client, tracking_uri, parent_id, "parent run")
    kind = parent.data.tags.get(Tag.KIND)
    if kind != CV_KIND:
        raise ValueError(f"run {parent_id!r} ({parent.info.run_name}) is not a cross-validation parent run "
                         f"(tag ipb.kind={kind!r}); pass the id returned by open_parent")
    return parent


def _fold_tags(parent: Any, fold: int, cfg: ExperimentConfig) -> dict[str, str]:
    ptags = parent.data.tags
    return {PARENT_TAG: parent.info.run_id, Tag.KIND: FOLD_KIND, Tag.FOLD: str(int(fold)),
            Tag.CONFIG_KEY: ptags.get(Tag.CONFIG_KEY, config_key(cfg)),
            Tag.METHOD: ptags.get(Tag.METHOD, cfg.method.name)}


def open_fold(tracking_uri: str, parent_id: str, fold: int, cfg: ExperimentConfig) -> str:
    """The child run a fold's training logs into while it trains (:func:`log_epoch`): the
    newest unfinished child of that fold (a resumed fold keeps its run and its curves), or
    a new one. It is RUNNING until :func:`log_fold` finishes it."""
    client = client_for(tracking_uri)
    parent = _cv_parent(client, tracking_uri, parent_id)
    for run in fold_children(client, parent.info.experiment_id, parent_id, int(fold)):  # newest first
        if run.info.status == "FINISHED" or Tag.SUPERSEDED_BY in run.data.tags:
            continue
        if _has_artifact(client, run.info.run_id, TEST_REPORT):
            continue
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    return client.create_run(parent.info.experiment_id, run_name=f"{parent.info.run_name}-fold{int(fold)}",
                             tags=_fold_tags(parent, fold, cfg)).info.run_id


_LIVE_WARNED: set[str] = set()


def absolute_uri(tracking_uri: str) -> str:
    """``sqlite:///relative.db`` made absolute (as seen from this process), so a Train
    worker with another working directory writes to the same store; other URIs as given."""
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        path, _, query = tracking_uri[len("sqlite:///"):].partition("?")
        return "sqlite:///" + os.path.abspath(path) + (f"?{query}" if query else "")
    return tracking_uri


def log_epoch(tracking_uri: str, run_id: str, row: Mapping[str, Any]) -> int:
    """Log one epoch's history row to a fold's child run (step = epoch), from the training
    loop while it runs. A store that cannot be reached is reported once per run and
    otherwise ignored: training goes on and :func:`log_fold` backfills the epochs."""
    try:
        return _log_metrics(client_for(tracking_uri), run_id, _history_metrics([row]))
    except Exception as exc:  # noqa: BLE001 - logging must never stop training
        if run_id not in _LIVE_WARNED:
            _LIVE_WARNED.add(run_id)
            log.warning("live MLflow logging to %s (run %s) failed: %s; the fold's curves are logged when it "
                        "finishes", tracking_uri, run_id, exc)
        return 0


def _logged_steps(client: Any, run_id: str, key: str = "epoch_seconds") -> set[int]:
    """Epochs a run already holds (every history row has ``epoch_seconds``)."""
    return {int(m.step) for m in client.get_metric_history(run_id, key)}


def log_fold(tracking_uri: str, parent_id: str, fold: int, fold_metrics: Mapping[str, Any],
             cfg: ExperimentConfig, log_model: bool = True, child_id: str | None = None) -> str:
    """Log one finished fold as a child run of ``parent_id``; returns the child run id.

    ``fold_metrics``: what :func:`ipb_ray.distributed.training.train_fold` returns (``test_report``,
    ``history``, ``checkpoint``, ...). ``child_id``: the run :func:`open_fold` gave the fold
    (its epochs logged live are not logged again); else a new child run. Older child runs
    of the same fold are superseded. The child run ends FINISHED once everything is logged
    (FAILED if logging fails).
    """
    client = client_for(tracking_uri)
    parent = _cv_parent(client, tracking_uri, parent_id)
    report = fold_metrics.get("test_report")
    if not isinstance(report, Mapping) or "class_names" not in report:
        raise ValueError(f"fold {fold} of parent run {parent.info.run_name!r} ({parent_id}): fold_metrics has "
                         "no 'test_report' classification report; pass the dict train_fold returns")
    fold = int(fold)
    eid = parent.info.experiment_id
    old_runs = fold_children(client, eid, parent_id, fold)
    name = f"{parent.info.run_name}-fold{fold}"
    tags = _fold_tags(parent, fold, cfg)
    if fold_metrics.get("param_digest"):
        tags[Tag.PARAM_DIGEST] = str(fold_metrics["param_digest"])
    if fold_metrics.get("checkpoint"):
        tags[Tag.CHECKPOINT] = str(fold_metrics["checkpoint"])[:5000]
    if child_id is None:
        child = client.create_run(eid, run_name=name, tags=tags).info.run_id
    else:
        child = child_id
        for key, value in tags.items():
            client.set_tag(child, key, value)
    for old in old_runs:
        if old.info.run_id == child:
            continue
        client.set_tag(old.info.run_id, Tag.SUPERSEDED_BY, child)
        if old.info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(old.info.run_id, "KILLED")
    try:
        history = list(fold_metrics.get("history") or [])
        live = _logged_steps(client, child) if child_id is not None else set()
        # a fine-tuned MPL/IPB student: the MPL stage's own choice is kept beside it
        before = fold_metrics.get(PRE_FINETUNE_REPORT.removesuffix(".json"))
        missing = [row for row in history if not (isinstance(row, Mapping) and row.get("epoch") in live)]
        _log_metrics(client, child, _history_metrics(missing) + _final_metrics(report) +
                     (_final_metrics(before, "pre_finetune_test_") if isinstance(before, Mapping) else []))
        class_names = list(report["class_names"])
        with tempfile.TemporaryDirectory(prefix="ipb-mlflow-") as d:
            tmp = Path(d)
            _log_json(client, child, history, "history.json", tmp)
            _log_json(client, child, {"class_names": class_names, "matrix": report.get("confusion_matrix", [])},
                      "confusion_matrix.json", tmp)
            if report.get("confusion_matrix"):
                client.log_artifact(child, str(plot_confusion(
                    report["confusion_matrix"], class_names, tmp / "confusion_matrix.png",
                    title=f"{name}: test fold {fold}")))
            if isinstance(before, Mapping):
                _log_json(client, child, dict(before), PRE_FINETUNE_REPORT, tmp)
            _log_json(client, child, dict(report), TEST_REPORT, tmp)  # last: marks the fold complete
        local = fold_metrics.get("local_checkpoint") or fold_metrics.get("checkpoint")
        net, why = load_best_model(local, cfg, len(class_names)) if log_model else (None, "log_model=False")
        if net is not None:
            uri = _log_model(tracking_uri, child, net, cfg, class_names)  # ends the run FINISHED
            client.set_tag(child, Tag.MODEL_URI, uri)
        else:
            if log_model:
                log.warning("fold %d of %s: no model logged (%s)", fold, parent.info.run_name, why)
            client.set_tag(child, Tag.MODEL_URI, "")
        client.set_terminated(child, "FINISHED")
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(child, "FAILED")
        raise
    return child


def finished_folds(tracking_uri: str, parent_id: str) -> dict[int, dict]:
    """``{fold: test_report}`` of the parent's FINISHED, not superseded child runs that hold
    a ``test_report.json`` (the newest per fold); the CV driver skips these folds."""
    client = client_for(tracking_uri)
    parent = _get_run(client, tracking_uri, parent_id, "parent run")
    out: dict[int, dict] = {}
    for r in fold_children(client, parent.info.experiment_id, parent_id):  # newest first
        tags = r.data.tags
        if r.info.status != "FINISHED" or Tag.SUPERSEDED_BY in tags:
            continue
        try:
            fold = int(tags.get(Tag.FOLD, ""))
        except ValueError:
            continue
        if fold in out or not _has_artifact(client, r.info.run_id, TEST_REPORT):
            continue
        out[fold] = _download_json(client, r.info.run_id, TEST_REPORT)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- summary

def log_summary(tracking_uri: str, parent_id: str, fold_reports: Mapping[int, Mapping[str, Any]]) -> dict:
    """Aggregate the folds' test reports (:func:`ipb_ray.evaluation.stats.aggregate_folds`), log the
    ``cv_*`` metrics and summary artifacts on the parent run and end it FINISHED."""
    from ipb_ray.evaluation.stats import aggregate_folds

    client = client_for(tracking_uri)
    parent = _get_run(client, tracking_uri, parent_id, "parent run")
    if not fold_reports:
        raise ValueError(f"no fold reports to summarise for parent run {parent.info.run_name!r} ({parent_id}); "
                         "log at least one fold first")
    ordered = sorted((int(k), dict(v)) for k, v in fold_reports.items())
    try:
        summary = aggregate_folds([rep for _, rep in ordered])
    except ValueError as exc:
        raise ValueError(f"parent run {parent.info.run_name!r} ({parent_id}): {exc}") from None
    items: list[tuple[str, Any, int]] = [("cv_folds", len(ordered), 0)]
    for metric in ("macro_tpr", "macro_f1", "balanced_accuracy", "accuracy"):
        items += [(f"cv_{metric}_mean", summary[metric]["mean"], 0), (f"cv_{metric}_std", summary[metric]["std"], 0)]
    for metric in ("tpr", "f1"):
        for c in summary["class_names"]:
            items += [(f"cv_{metric}_mean/{c}", summary[metric]["mean"][c], 0),
                      (f"cv_{metric}_std/{c}", summary[metric]["std"][c], 0)]
    _log_metrics(client, parent_id, items)
    with tempfile.TemporaryDirectory(prefix="ipb-mlflow-") as d:
        tmp = Path(d)
        _log_json(client, parent_id, summary, CV_SUMMARY, tmp)
        _log_json(client, parent_id, [{"fold": k, "report": rep} for k, rep in ordered], FOLD_REPORTS, tmp)
        client.log_artifact(parent_id, str(plot_confusion(
            summary["confusion_matrix"], summary["class_names"], tmp / "cv_confusion_matrix.png",
            title=f"{parent.info.run_name}: summed over {len(ordered)} folds")))
    client.set_terminated(parent_id, "FINISHED")
    return summary


# --------------------------------------------------------------------------- reading back

def load_cv(tracking_uri: str, experiment: str, name_or_id: str) -> tuple[str, dict[int, dict]]:
    """(parent run id, ``{fold: test_report}``) of a cross-validation parent run given by
    run id or by run name (the newest parent with that name). Reports come from
    ``fold_reports.json``, or from the finished child runs when it is absent."""
    client = client_for(tracking_uri)
    eid = _experiment_id(client, tracking_uri, experiment, create=False)
    if eid is None:
        names = [e.name for e in client.search_experiments()][:10]
        raise ValueError(f"MLflow experiment {experiment!r} does not exist at tracking URI {tracking_uri!r} "
                         f"(experiments there: {', '.join(names) or 'none'}); check tracking.experiment "
                         "and tracking.tracking_uri, or run `ipb cv` first")
    parent = None
    if re.fullmatch(r"[0-9a-f]{32}", name_or_id):
        from mlflow.exceptions import MlflowException

        try:
            parent = client.get_run(name_or_id)
        except MlflowException:
            parent = None
    if parent is None:
        parents = _search(client, eid, f"tags.`ipb.kind` = '{CV_KIND}'")  # newest first
        parent = next((r for r in parents if r.info.run_name == name_or_id), None)
        if parent is None:
            seen: list[str] = []
            for r in parents:
                if r.info.run_name not in seen:
                    seen.append(r.info.run_name)
            listing = ", ".join(repr(n) for n in seen[:10]) + (", ..." if len(seen) > 10 else "")
            raise ValueError(f"no cross-validation parent run named or with id {name_or_id!r} in MLflow "
                             f"experiment {experiment!r} at {tracking_uri!r}; available parent runs "
                             f"(newest first): {listing or 'none'}")
    if parent.data.tags.get(Tag.KIND) != CV_KIND:
        hint = parent.data.tags.get(PARENT_TAG)
        more = f"; its parent run is {hint}" if hint else ""
        raise ValueError(f"run {name_or_id!r} ({parent.info.run_name}) is not a cross-validation parent run "
                         f"(tag ipb.kind={parent.data.tags.get('ipb.kind')!r}){more}")
    rid = parent.info.run_id
    if _has_artifact(client, rid, FOLD_REPORTS):
        entries = _download_json(client, rid, FOLD_REPORTS)
        return rid, dict(sorted((int(e["fold"]), e["report"]) for e in entries))
    return rid, finished_folds(tracking_uri, rid)


# --------------------------------------------------------------------------- searches

SEARCH_KIND = "search"


def open_search_parent(tracking_uri: str, experiment: str, cfg: ExperimentConfig, out: str | Path,
                       space: Mapping[str, Any]) -> str:
    """The parent run of a hyperparameter search kept in ``out``: the existing one (a
    resumed search) or a new run holding the base config as params and the space."""
    from mlflow.entities import Param

    client = client_for(tracking_uri)
    eid = _experiment_id(client, tracking_uri, experiment, create=True)
    where = str(Path(out).resolve())
    for r in _search(client, eid, f"tags.`ipb.kind` = '{SEARCH_KIND}' and tags.`ipb.search_dir` = {_quote(where)}"):
        if r.info.status != "RUNNING":
            client.update_run(r.info.run_id, status="RUNNING")
        return r.info.run_id
    tags = {Tag.KIND: SEARCH_KIND, Tag.SEARCH_DIR: where, Tag.METHOD: cfg.method.name,
            Tag.PRESET: cfg.preset or "", Tag.GIT_COMMIT: git_commit(),
            Tag.DATA_FINGERPRINT: data_fingerprint(cfg.data.catalog)}
    rid = client.create_run(eid, run_name=f"{cfg.name}-{cfg.method.name}-search", tags=tags).info.run_id
    params = [Param(sanitize_metric_name(k), str(v)[:_MAX_PARAM_VALUE]) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), _PARAMS_PER_BATCH):
        client.log_batch(rid, params=params[i:i + _PARAMS_PER_BATCH])
    with tempfile.TemporaryDirectory() as tmp:
        _log_json(client, rid, dict(space), "space.json", Path(tmp))
    return rid


def close_search_parent(tracking_uri: str, parent_id: str, best_params: Mapping[str, Any], best_value: float,
                        best_yaml: str | Path, importances: Mapping[str, float]) -> None:
    """Log a search's outcome on its parent run (best value, best parameters as tags,
    parameter importances, ``best.yaml``) and mark it finished."""
    client = client_for(tracking_uri)
    _log_metrics(client, parent_id, [("best_objective", best_value, 0),
                                     *((f"importance/{k}", v, 0) for k, v in importances.items())])
    for k, v in best_params.items():
        client.set_tag(parent_id, f"ipb.best.{k}", str(v))
    client.log_artifact(parent_id, str(best_yaml))
    client.set_terminated(parent_id, "FINISHED")
