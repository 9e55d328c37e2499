"""ipb-ray's public face: what a script or a notebook imports, in one place.

Everything here is also where it lives (``ipb_ray.config.load_config`` is
``ipb_ray.api.load_config``); the names below are the ones the README's examples use and
the ones whose signatures we keep stable between releases. Importing this module starts
no Ray cluster and imports neither Ray, MLflow nor Optuna: each function starts or joins
a cluster when it is called.

The path of an experiment, in the order a user meets it::

    cfg = load_config("my.yaml", overrides=["split.labelled_fraction=0.05"])
    build_catalog(cfg)                      # ipb preprocess: frames -> colony catalog + folds
    metrics = run_fold(cfg, fold=0)         # ipb train: one fold on Ray Train
    result = run_cv(cfg)                    # ipb cv: every fold, tracked in MLflow
    search = run_search(cfg, "space.yaml", 20, out="search")   # ipb tune
    predictor = load_predictor("models:/colonies@champion")    # what ipb predict loads
    run_predict(predictor, "plate2/", "predictions")           # ipb predict
    export_model(predictor, "onnx", "exported")                # ipb export

and, to extend it: :func:`register_model` (a backbone), :func:`register_method` (a way to
train, subclassing :class:`Method`), :func:`register_balancer` (a way to draw the
unlabelled stream, subclassing :class:`Balancer`), each with its own hyperparameter
section (:class:`Params`, :func:`param`).
"""

from __future__ import annotations

from ipb_ray.config import ExperimentConfig, load_config
from ipb_ray.data.fold_views import fold_catalog, resolve_fold_catalog
from ipb_ray.data.folds import read_folds
from ipb_ray.distributed.cv import run_cv
from ipb_ray.distributed.epoch_stream import crop_cache, plan_batches
from ipb_ray.distributed.fold import run_fold
from ipb_ray.distributed.predict import run_predict
from ipb_ray.distributed.preprocess import build_catalog
from ipb_ray.distributed.search import run_search
from ipb_ray.distributed.streams import patch_dataset, torch_batches
from ipb_ray.methods import Balancer, Method, Stage, register_balancer, register_method
from ipb_ray.nn.models import create_model, list_models, register_model
from ipb_ray.params import ConfigError, Params, param
from ipb_ray.patches.core import StreamSpec
from ipb_ray.patches.geometry import PatchGeometry
from ipb_ray.patches.plan import stream_plan
from ipb_ray.prediction.export import export_model
from ipb_ray.tracking.registry import load_predictor

__all__ = [
    "Balancer", "ConfigError", "ExperimentConfig", "Method", "Params", "PatchGeometry", "Stage", "StreamSpec",
    "build_catalog", "create_model", "crop_cache", "export_model", "fold_catalog", "list_models", "load_config",
    "load_predictor", "param", "patch_dataset", "plan_batches", "read_folds", "register_balancer", "register_method",
    "register_model", "resolve_fold_catalog", "run_cv", "run_fold", "run_predict", "run_search", "stream_plan",
    "torch_batches",
]
