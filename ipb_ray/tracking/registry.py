"""The MLflow Model Registry side of ipb-ray: ``ipb register`` and the models ``ipb predict`` loads.

:func:`register_configuration` takes a cross-validation parent run (``ipb cv``), loads the
selected network of each of its folds (the MLflow models the fold runs logged), puts them in
one :class:`ipb_ray.nn.ensemble.FoldEnsemble`, logs that to the parent run as the model
``ensemble`` and registers it under a name as a new version, with an alias (``champion`` by
default) moved to it. The registered model's metadata carries what applying it needs:
``class_names``, the resolved configuration (``config``: patch geometry, segmentation,
``eval.tta``, pixel size), the folds, the cross-validation estimate (``cv_macro_tpr``,
``cv_accuracy``) and the ipb-ray version. Its signature takes one window batch
``(N, 1, S, S)`` float32 in [0, 1] and returns class probabilities ``(N, C)``; the
network normalises with the training data's statistics itself.

:func:`load_predictor` opens any of ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``),
``runs:/<fold run id>/model`` and a Ray Train checkpoint directory, as a
:class:`Predictor`: the module and the configuration its windows are cut with.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipb_ray.config import ExperimentConfig, from_dict, to_dict

__all__ = [
    "ENSEMBLE_NAME", "load_predictor", "package_version", "Predictor", "register_configuration", "set_alias",
]

log = logging.getLogger(__name__)
ENSEMBLE_NAME = "ensemble"


@dataclass
class Predictor:
    """A model ready to apply: ``module`` maps a window batch to probabilities (a
    :class:`~ipb_ray.nn.ensemble.FoldEnsemble` or one network), ``cfg`` says how windows are
    cut and colonies segmented, ``class_names`` the output order, ``source`` where it came from."""

    module: Any
    cfg: ExperimentConfig
    class_names: tuple[str, ...]
    source: str
    cv_estimate: dict[str, float]

    @property
    def members(self) -> int:
        return len(getattr(self.module, "nets", [])) or 1


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ipb-ray")
    except PackageNotFoundError:
        return "unknown"


def _parent_config(client: Any, run_id: str) -> ExperimentConfig:
    """The resolved configuration a cross-validation parent run logged (``config.yaml``)."""
    import yaml

    from ipb_ray.tracking.runs import CONFIG_ARTIFACT

    with tempfile.TemporaryDirectory(prefix="ipb-register-") as tmp:
        try:
            path = client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)
        except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise ValueError(f"run {run_id} has no {CONFIG_ARTIFACT} artifact (runs of ipb-ray before it was "
                             f"logged lack it); run `ipb cv` again for this configuration ({exc})") from None
        return from_dict(yaml.safe_load(Path(path).read_text()), source=f"run {run_id}/{CONFIG_ARTIFACT}")


def register_configuration(tracking_uri: str, experiment: str, run: str, name: str, alias: str = "champion",
                           ) -> dict[str, Any]:
    """Register the fold networks of the cross-validation parent ``run`` (name or id) as a
    new version of the registered model ``name`` and point ``alias`` at it; returns
    ``{"name", "version", "alias", "uri", "folds", "cv_macro_tpr"}``."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch

    from ipb_ray.evaluation.stats import aggregate_folds
    from ipb_ray.nn.ensemble import FoldEnsemble
    from ipb_ray.tracking.runs import MODEL_NAME, Tag, client_for, fluent_run, fluent_uri, fold_children, load_cv

    parent_id, reports = load_cv(tracking_uri, experiment, run)
    client = client_for(tracking_uri)
    parent = client.get_run(parent_id)
    cfg = _parent_config(client, parent_id)
    models: dict[int, str] = {}
    for child in fold_children(client, parent.info.experiment_id, parent_id):
        fold, uri = child.data.tags.get(Tag.FOLD), child.data.tags.get(Tag.MODEL_URI)
        if fold is not None and uri and not child.data.tags.get(Tag.SUPERSEDED_BY) and int(fold) not in models:
            models[int(fold)] = uri
    if not models:
        raise ValueError(f"run {run!r} ({parent_id}) has no fold with a logged model ({MODEL_NAME}); run `ipb cv` "
                         "without --no-model")
    with fluent_uri(tracking_uri):
        nets = [mlflow.pytorch.load_model(models[f], map_location="cpu").eval() for f in sorted(models)]
        first = mlflow.models.get_model_info(models[min(models)]).metadata or {}
    ensemble = FoldEnsemble(nets).eval()
    summary = aggregate_folds([reports[f] for f in sorted(models) if f in reports]) if reports else {}
    class_names = list(first.get("class_names") or summary.get("class_names") or [])
    side = cfg.data.global_patch if cfg.data.multi_scale else cfg.data.patch_size
    example = np.random.default_rng(0).random((2, 1, side, side), dtype=np.float32)
    with torch.no_grad():
        probs = ensemble(torch.from_numpy(example)).numpy()
    estimate = {k: float(summary[k]["mean"]) for k in ("macro_tpr", "accuracy") if k in summary}
    metadata = {"class_names": class_names, "config": to_dict(cfg), "folds": sorted(models),
                "cv_macro_tpr": estimate.get("macro_tpr"), "cv_accuracy": estimate.get("accuracy"),
                "source_run": parent_id, "ipb_ray_version": package_version(),
                "input": f"float32 (N, 1, {side}, {side}) in [0, 1]",
                "output": "softmax probabilities (N, C) in class_names order, the mean over the fold networks"}
    with fluent_run(tracking_uri, parent_id):
        info = mlflow.pytorch.log_model(ensemble, name=ENSEMBLE_NAME, signature=mlflow.models.infer_signature(
            example, probs), serialization_format="pickle", metadata=metadata, registered_model_name=name)
    version = str(info.registered_model_version)
    set_alias(tracking_uri, name, alias, version)
    return {"name": name, "version": version, "alias": alias, "uri": f"models:/{name}@{alias}",
            "folds": sorted(models), "cv_macro_tpr": estimate.get("macro_tpr")}


def set_alias(tracking_uri: str, name: str, alias: str, version: str | int) -> None:
    """Point ``models:/name@alias`` at ``version`` (moving it from any other version)."""
    from ipb_ray.tracking.runs import client_for

    client = client_for(tracking_uri)
    try:
        client.get_model_version(name, str(version))
    except Exception:  # noqa: BLE001
        versions = [str(v.version) for v in client.search_model_versions(f"name = '{name}'")]
        raise ValueError(f"registered model {name!r} has no version {version}; versions: "
                         f"{', '.join(sorted(versions, key=int)) or 'none'}") from None
    client.set_registered_model_alias(name, alias, str(version))


def load_predictor(ref: str, tracking_uri: str | None = None) -> Predictor:
    """A :class:`Predictor` from ``models:/...``, ``runs:/<fold run>/model`` or a checkpoint dir."""
    if ref.startswith(("models:/", "runs:/")):
        return _from_mlflow(ref, tracking_uri)
    path = Path(ref)
    if path.is_dir():
        return _from_checkpoint(path)
    raise ValueError(f"--model {ref!r} is neither an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, "
                     "runs:/RUN_ID/model) nor a checkpoint directory")


def _from_mlflow(ref: str, tracking_uri: str | None) -> Predictor:
    import mlflow
    import mlflow.pytorch

    from ipb_ray.tracking.runs import PARENT_TAG, client_for, fluent_uri

    try:
        with fluent_uri(tracking_uri):
            info = mlflow.models.get_model_info(ref)
            module = mlflow.pytorch.load_model(ref, map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001 - MLflow's errors for a missing model vary by store
        raise ValueError(f"cannot load model {ref!r} from tracking URI {tracking_uri!r}: {exc}") from None
    meta = info.metadata or {}
    if "config" in meta:
        cfg = from_dict(meta["config"], source=ref)
    else:  # a fold run's own model: its configuration is its parent run's
        client = client_for(tracking_uri or mlflow.get_tracking_uri())
        run_id = info.run_id
        parent = client.get_run(run_id).data.tags.get(PARENT_TAG, run_id)
        cfg = _parent_config(client, parent)
    estimate = {k: float(meta[f"cv_{k}"]) for k in ("macro_tpr", "accuracy") if meta.get(f"cv_{k}") is not None}
    return Predictor(module, cfg, tuple(meta.get("class_names") or ()), ref, estimate)


def _from_checkpoint(path: Path) -> Predictor:
    from ipb_ray.nn.checkpoint import CHECKPOINT_FILE, load_state
    from ipb_ray.tracking.packaging import load_best_model, probability_model

    file = path / CHECKPOINT_FILE
    if not file.is_file():
        raise ValueError(f"{path} is not a training checkpoint (no {CHECKPOINT_FILE} in it)")
    state = load_state(file)
    cfg = from_dict(state["config"], source=str(file)) if isinstance(state.get("config"), dict) else state["config"]
    names = tuple(state["class_names"])
    net, why = load_best_model(str(path), cfg, len(names))
    if net is None:
        raise ValueError(f"{path}: {why}")
    return Predictor(probability_model(net, cfg.data.multi_scale, cfg.data.local_patch).eval(), cfg, names,
                     str(path), {})
