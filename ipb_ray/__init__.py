"""ipb-ray: Iterative Pseudo Balancing for microscopy colony classification, on Ray.

The library reads in the order a run flows, one package a room: ``data`` (synthetic
world, segmentation, colony catalog, folds) -> ``patches`` -> ``nn`` (models, MPL step)
and ``methods`` (the method and balancer registries) -> ``distributed`` (everything on
Ray) -> ``evaluation`` -> ``tracking`` (MLflow); ``cluster`` and ``cli`` run it. Importing
it never starts Ray; Ray, MLflow and Optuna load lazily.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["MOVED_MODULES"]

__version__ = "0.1.0"

#: Modules that moved into packages (session 5). Pickles made before the move (MLflow
#: models logged by earlier versions name e.g. ``ipb_ray.models.Classifier``) still load:
#: importing an old name gives the module where it lives now. Old names that are packages
#: now (``tracking``, ``patches``, ``cluster``) cannot be aliased.
MOVED_MODULES = {
    "ipb_ray.models": "ipb_ray.nn.models", "ipb_ray.mpl": "ipb_ray.nn.mpl", "ipb_ray.optim": "ipb_ray.nn.optim",
    "ipb_ray.synth": "ipb_ray.data.synth", "ipb_ray.segmentation": "ipb_ray.data.segmentation",
    "ipb_ray.importers": "ipb_ray.data.importers", "ipb_ray.catalog": "ipb_ray.data.catalog",
    "ipb_ray.folds": "ipb_ray.data.folds", "ipb_ray.augment": "ipb_ray.patches.augment",
    "ipb_ray.balance": "ipb_ray.patches.balance", "ipb_ray.metrics": "ipb_ray.evaluation.metrics",
    "ipb_ray.stats": "ipb_ray.evaluation.stats", "ipb_ray.preprocess": "ipb_ray.distributed.preprocess",
    "ipb_ray.streams": "ipb_ray.distributed.streams", "ipb_ray.rebalance": "ipb_ray.distributed.rebalance",
    "ipb_ray.training": "ipb_ray.distributed.training", "ipb_ray.cv": "ipb_ray.distributed.cv",
    "ipb_ray.search": "ipb_ray.distributed.search", "ipb_ray.ray_setup": "ipb_ray.distributed.ray_setup",
    "ipb_ray.report": "ipb_ray.tracking.report", "ipb_ray.viz": "ipb_ray.tracking.viz",
    "ipb_ray.submit": "ipb_ray.cluster.submit", "ipb_ray.localcluster": "ipb_ray.cluster.local",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    specs: dict = {}

    def create_module(self, spec):
        module = importlib.import_module(MOVED_MODULES[spec.name])
        self.specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module):
        # the import machinery stamped the alias's spec on the real module: give it back its own
        real = self.specs[module.__name__]
        module.__spec__, module.__loader__ = real, real.loader


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
