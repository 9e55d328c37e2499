"""Training methods on one loop: the registry, the built-in methods and the balancers.

``method.name`` picks a registered :class:`Method` (:func:`list_methods`); a semi-
supervised one draws its unlabelled stream through a balancer (``method.balancer``, or the
method's default). Built in: ``supervised``, ``mpl``, ``ipb`` (MPL + ``pseudo_balance``)
and ``pseudo_label``. See :mod:`ipb_ray.methods.base` for how to add one.
"""

from ipb_ray.methods.balancers import BALANCERS, Balancer, get_balancer, list_balancers, register_balancer
from ipb_ray.methods.base import (METHODS, Method, Stage, finetune_stage, get_method, list_methods,
                                  register_method, total_epochs)
# the built-ins register themselves on import, in the order tables list them
from ipb_ray.methods import supervised as _supervised  # noqa: E402,F401,I001
from ipb_ray.methods import mpl as _mpl  # noqa: E402,F401,I001
from ipb_ray.methods import pseudo_label as _pseudo_label  # noqa: E402,F401,I001

__all__ = ["BALANCERS", "METHODS", "Balancer", "Method", "Stage", "finetune_stage", "get_balancer", "get_method", "list_balancers",
           "list_methods", "register_balancer", "register_method", "total_epochs"]
