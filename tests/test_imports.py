"""Every module of the library imports without pulling in Ray, MLflow or Optuna: the pure
logic is usable (and testable) without a cluster, and the wiring imports them lazily."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import ipb_ray

MODULES = sorted(m.name for m in pkgutil.walk_packages(ipb_ray.__path__, "ipb_ray."))


def test_every_module_imports_without_ray_mlflow_or_optuna():
    assert {"ipb_ray.training", "ipb_ray.methods.base", "ipb_ray.methods.balancers", "ipb_ray.tracking"} <= set(MODULES)
    code = ("import importlib, sys\n"
            f"for name in {MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            "    heavy = [m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules]\n"
            "    assert not heavy, f'importing {name} imported {heavy}'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
