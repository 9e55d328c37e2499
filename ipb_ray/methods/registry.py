"""The registries' machinery: named classes of one kind (methods, balancers) and the
hyperparameter section each may declare. Nothing of ``ipb_ray`` is imported here, so the
method base (:mod:`ipb_ray.methods.base`) and the balancers
(:mod:`ipb_ray.methods.balancers`) each build on it without importing one another."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

__all__ = ["Registry", "own_keys", "own_params"]


class Registry:
    """Named classes of one kind (methods, balancers): registration by decorator, lookup
    with a did-you-mean message, registration order kept."""

    def __init__(self, kind: str, base: type, decorator: str):
        self.kind, self.base, self.decorator = kind, base, decorator
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def wrap(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"@{self.decorator}({name!r}) decorates a subclass of {self.base.__module__}."
                                f"{self.base.__qualname__}, got {cls!r}")
            taken = self._classes.get(name)
            if taken is not None and taken is not cls:
                raise ValueError(f"a {self.kind} named {name!r} is already registered ({taken.__module__}."
                                 f"{taken.__qualname__}); choose another name")
            cls.name = name
            if getattr(cls, "params", None) is not None and not getattr(cls, "section", ""):
                cls.section = name
            self._classes[name] = cls
            return cls

        return wrap

    def names(self) -> list[str]:
        return list(self._classes)

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self._classes), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"{name!r} is not a registered {self.kind}{hint}; registered: "
                             f"{', '.join(self._classes)} (add your own with @ipb_ray.methods.{self.decorator})"
                             ) from None

    def remove(self, name: str) -> None:
        """Forget ``name`` (a notebook redefining a class, a test's temporary entry)."""
        self._classes.pop(name, None)


def own_keys(cls: type) -> tuple[str, ...]:
    """A registered method's or balancer's own keys, relative to ``method.`` (``"mpl.threshold"``)."""
    if getattr(cls, "params", None) is None:
        return ()
    return tuple(f"{cls.section}.{f.name}" for f in dataclasses.fields(cls.params))


def own_params(cls: type, cfg: Any) -> Any:
    """``cfg``'s section of a registered method's or balancer's own hyperparameters (None without)."""
    return getattr(cfg.method, cls.section) if getattr(cls, "params", None) is not None else None
