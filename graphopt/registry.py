"""One registry of passes by kebab-case name, and per-op dispatch tables keyed by opset range."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from graphopt.errors import PipelineError, RegistryError, unknown
from graphopt.passbase import GraphPass

P = TypeVar("P", bound=type[GraphPass])
F = TypeVar("F")

_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_PASSES: dict[str, type[GraphPass]] = {}


def register(cls: P) -> P:
    """Class decorator: add a pass under its ``name``; bad or duplicate names are refused."""
    if not _NAME.fullmatch(cls.name or ""):
        raise RegistryError(f"pass name '{cls.name}' of {cls.__qualname__} is not kebab-case")
    if (old := _PASSES.get(cls.name)) is not None and old is not cls:
        raise RegistryError(f"pass '{cls.name}' is already registered by {old.__module__}.{old.__qualname__}")
    if not dataclasses.is_dataclass(cls):
        raise RegistryError(f"pass '{cls.name}' must be a dataclass")
    for f in dataclasses.fields(cls):
        if "doc" not in f.metadata:
            raise RegistryError(f"option '{f.name}' of pass '{cls.name}' has no doc: declare it with option()")
    _PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> type[GraphPass]:
    _load_builtin_passes()
    try:
        return _PASSES[name]
    except KeyError:
        raise unknown("pass", name, list(_PASSES) + list(presets())) from None


def all_passes() -> dict[str, type[GraphPass]]:
    _load_builtin_passes()
    return dict(sorted(_PASSES.items()))


def presets() -> dict[str, str]:
    """Named pipelines, expanded where their name appears in a pipeline text."""
    _load_builtin_passes()
    from graphopt.passes import PRESETS

    return dict(PRESETS)


@dataclasses.dataclass(frozen=True)
class OptionDoc:
    name: str  # kebab-case, as written in pipeline text
    type: str
    default: Any
    doc: str


def field_types(cls: type[GraphPass]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe(cls: type[GraphPass]) -> list[OptionDoc]:
    """The options of a pass as ``graphopt passes`` prints them."""
    hints = field_types(cls)
    docs = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        docs.append(OptionDoc(f.name.replace("_", "-"), type_name(hints[f.name]), default, f.metadata["doc"]))
    return docs


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return type_name(args[0]) + "?"
    if typing.get_origin(tp) in (list, tuple):
        return f"[{type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


class OpTable(Generic[F]):
    """Handlers keyed by ``(domain, op_type)`` with inclusive, non-overlapping opset ranges."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], list[tuple[int, int, F]]] = {}

    def register(self, op_type: str, *, since: int = 1, until: int = 10_000, domain: str = "") -> Callable[[F], F]:
        def add(handler: F) -> F:
            ranges = self._entries.setdefault((domain, op_type), [])
            for lo, hi, _ in ranges:
                if since <= hi and lo <= until:
                    raise RegistryError(f"{op_type} opsets {since}-{until} overlap {lo}-{hi}")
            ranges.append((since, until, handler))
            return handler

        return add

    def lookup(self, domain: str, op_type: str, opset: int) -> F | None:
        for lo, hi, handler in self._entries.get((domain, op_type), ()):
            if lo <= opset <= hi:
                return handler
        return None


def _load_builtin_passes() -> None:
    import graphopt.passes  # noqa: F401  (registers on import)


__all__ = ["OpTable", "OptionDoc", "PipelineError", "all_passes", "describe", "get_pass", "presets", "register"]
