"""Training methods on one loop: the registry, the built-in methods and the balancers.

``method.name`` picks a registered :class:`Method` (:func:`list_methods`); a semi-
supervised one draws its unlabelled stream through a balancer (``method.balancer``, or the
method's default). Built in: ``supervised``, ``mpl``, ``ipb`` (MPL + ``pseudo_balance``),
``pseudo_label``, ``fixmatch`` and ``simclr``; balancers ``none``, ``pseudo_balance`` and
``logit_adjust``. See :mod:`ipb_ray.methods.base` for how to add one.
"""

from ipb_ray.methods.balancers import BALANCERS, Balancer, get_balancer, list_balancers, register_balancer
from ipb_ray.methods.base import (METHODS, Method, Stage, finetune_stage, get_method, list_methods,
                                  register_method, total_epochs)
# the built-ins register themselves on import, in the order tables list them
from ipb_ray.methods import supervised as _supervised  # noqa: E402,F401,I001
from ipb_ray.methods import mpl as _mpl  # noqa: E402,F401,I001
from ipb_ray.methods import pseudo_label as _pseudo_label  # noqa: E402,F401,I001
from ipb_ray.methods import fixmatch as _fixmatch  # noqa: E402,F401,I001
from ipb_ray.methods import simclr as _simclr  # noqa: E402,F401,I001

__all__ = ["BALANCERS", "METHODS", "Balancer", "Method", "Stage", "finetune_stage", "get_balancer", "get_method",
           "list_balancers", "list_methods", "param_sections", "register_balancer", "register_method", "total_epochs"]


def param_sections() -> dict[str, type]:
    """``{section: Params dataclass}`` of every registered method and balancer that has its
    own hyperparameters, in registration order (methods first): the ``method.<section>.*``
    keys of the configuration. Classes sharing a section must share its dataclass."""
    out: dict[str, type] = {}
    for registry in (METHODS, BALANCERS):
        for name in registry.names():
            cls = registry.get(name)
            if cls.params is None:
                continue
            taken = out.setdefault(cls.section, cls.params)
            if taken is not cls.params:
                raise TypeError(f"{registry.kind} {name!r} declares section {cls.section!r} with "
                                f"{cls.params.__qualname__}, but it is already {taken.__qualname__}; "
                                "give it another section name")
    return out
