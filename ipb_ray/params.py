"""The parts of a configuration section that every room may use: the error, the field
with its range and meaning, and the base of a method's or balancer's own section.

A leaf module (it imports nothing of ``ipb_ray``): :mod:`ipb_ray.config` builds the
experiment tree from it, and the method and balancer registries declare their own sections
with it, so neither has to import the other's room.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Sequence

__all__ = ["ConfigError", "Params", "check_fields", "check_value", "field_spec", "param"]


class ConfigError(ValueError):
    """A configuration problem, with the dotted key and the source it came from."""

    def __init__(self, message: str, key: str = "", source: str = ""):
        self.key = key
        self.source = source
        self.detail = message
        where = f"{source}: " if source else ""
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{message}")

    def under(self, prefix: str) -> "ConfigError":
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(self.detail, key=key, source=self.source)


def field_spec(default: Any, *, lo: float | None = None, hi: float | None = None,
               choices: Sequence[Any] | None = None, odd: bool = False, doc: str = "") -> Any:
    """A field with its allowed range; ``lo``/``hi`` are inclusive."""
    meta = {"lo": lo, "hi": hi, "choices": tuple(choices) if choices else None,
            "odd": odd, "doc": doc}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in configs")
    return field(default=default, metadata=meta)


def param(default: Any, *, lo: float | None = None, hi: float | None = None,
          choices: Sequence[Any] | None = None, doc: str = "") -> Any:
    """A field of a method's or balancer's own hyperparameter section (see :class:`Params`),
    with its allowed range (``lo``/``hi`` inclusive) or choices and its meaning."""
    return field_spec(default, lo=lo, hi=hi, choices=choices, doc=doc)


class Params:
    """Base of a method's (or balancer's) own hyperparameter section: a frozen dataclass of
    :func:`param` fields, range-checked like every other section. A registered class names
    it as ``params``; its keys are then ``method.<section>.<key>`` (e.g.
    ``method.mpl.threshold``), validated, listed by ``ipb config reference`` and searchable
    by ``ipb tune``."""

    def __post_init__(self) -> None:
        check_fields(self)


def check_fields(obj: Any) -> None:
    """Range/choice checks declared with :func:`field_spec`, run from every ``__post_init__``."""
    for f in dataclasses.fields(obj):
        check_value(f, getattr(obj, f.name), key=f.name)


def check_value(f: dataclasses.Field, value: Any, key: str) -> None:
    """The :func:`field_spec` range/choice checks of one field; errors carry ``key``."""
    meta = f.metadata
    if value is None or dataclasses.is_dataclass(value):
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{value!r} is not allowed; choose one of {', '.join(map(str, choices))}",
                          key=key)
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            raise ConfigError(f"{value!r} is out of range; allowed [{lo_s}, {hi_s}]", key=key)
        if meta.get("odd") and int(value) % 2 == 0:
            raise ConfigError(f"{value!r} must be an odd number", key=key)
