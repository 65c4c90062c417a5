"""The pipeline text form and its objects: ``dce,remove-dropout,svd-split{energy=0.98}``.

Grammar (MLIR's textual pipelines, trimmed; ``(...)`` only after ``repeat``)::

    pipeline ::= element (',' element)*
    element  ::= name options? ('(' pipeline ')')?
    options  ::= '{' key '=' value (',' key '=' value)* '}'
    name,key ::= [a-z][a-z0-9]*(-[a-z0-9]+)*        # key per-channel <-> field per_channel
    value    ::= true | false | none | number | word | 'quoted' | '[' value (',' value)* ']'

Whitespace and newlines are free; ``#`` starts a comment to the end of the line (pipeline files).
Preset names (``cleanup``) expand in place. :func:`format_pipeline` prints what
:func:`parse_pipeline` reads: ``parse(format(p)) == p`` for every pipeline.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from graphopt.errors import PipelineError, UsageError, unknown
from graphopt.passbase import GraphPass
from graphopt.registry import field_types, get_pass, presets


@dataclasses.dataclass(frozen=True)
class Repeat:
    """Run ``body`` up to ``n`` times, stopping early once a round modifies nothing."""

    n: int
    body: tuple[Element, ...]


Element = Union[GraphPass, Repeat]
Pipeline = list[Element]

_WORD = re.compile(r"[A-Za-z0-9_.+\-*/:^$?]+")
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip(self) -> None:
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c.isspace():
                self.pos += 1
            elif c == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                break

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    @property
    def col(self) -> int:
        return self.pos + 1

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise PipelineError(f"expected '{char}' at column {self.col}, found {found}")
        self.pos += 1

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        self.skip()
        m = pattern.match(self.text, self.pos)
        if not m:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            raise PipelineError(f"expected {what} at column {self.col}, found {found}")
        self.pos = m.end()
        return m.group()


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text into pass objects; errors name the column and the closest known name."""
    reader = _Reader(text)
    if not reader.peek():
        raise PipelineError("empty pipeline")
    pipeline = _parse_sequence(reader)
    if reader.peek():
        raise PipelineError(f"unexpected '{reader.peek()}' at column {reader.col}")
    return pipeline


def read_pipeline_arg(arg: str) -> str:
    """``@file.txt`` reads the pipeline from a file; anything else is the text itself."""
    if not arg.startswith("@"):
        return arg
    path = Path(arg[1:])
    try:
        return path.read_text()
    except OSError as e:
        raise UsageError(f"cannot read pipeline file '{path}': {e.strerror or e}") from None


def _parse_sequence(reader: _Reader) -> Pipeline:
    elements = _parse_element(reader)
    while reader.peek() == ",":
        reader.pos += 1
        elements += _parse_element(reader)
    return elements


def _parse_element(reader: _Reader) -> list[Element]:
    col = reader.col if reader.peek() else reader.pos + 1
    name = reader.match(_NAME, "a pass name")
    raw: dict[str, tuple[Any, int]] = {}
    if reader.peek() == "{":
        reader.pos += 1
        while True:
            key_col = reader.col
            key = reader.match(_NAME, "an option name")
            reader.expect("=")
            if key in raw:
                raise PipelineError(f"option '{key}' given twice at column {key_col}")
            raw[key] = (_parse_value(reader), key_col)
            if reader.peek() == ",":
                reader.pos += 1
                continue
            reader.expect("}")
            break
    if name == "repeat":
        extra = [k for k in raw if k != "n"]
        if extra:
            raise unknown("repeat option", extra[0], ["n"], raw[extra[0]][1])
        n = raw.get("n", ("3", col))[0]
        if not isinstance(n, str) or not n.isdigit() or int(n) < 1:
            raise PipelineError(f"repeat{{n=...}} at column {col} needs a positive integer, got '{n}'")
        reader.expect("(")
        body = _parse_sequence(reader)
        reader.expect(")")
        return [Repeat(int(n), tuple(body))]
    if name in presets():
        if raw:
            raise PipelineError(f"preset '{name}' at column {col} takes no options")
        return parse_pipeline(presets()[name])
    cls = get_pass_at(name, col)
    return [make_pass(cls, raw)]


def get_pass_at(name: str, col: int) -> type[GraphPass]:
    try:
        return get_pass(name)
    except PipelineError as e:
        raise PipelineError(str(e).replace(f"'{name}';", f"'{name}' at column {col};", 1)) from None


def _parse_value(reader: _Reader) -> Any:
    c = reader.peek()
    if c == "[":
        reader.pos += 1
        items: list[Any] = []
        if reader.peek() != "]":
            items.append(_parse_value(reader))
            while reader.peek() == ",":
                reader.pos += 1
                items.append(_parse_value(reader))
        reader.expect("]")
        return items
    if c == "'":
        end = reader.text.find("'", reader.pos + 1)
        if end < 0:
            raise PipelineError(f"unterminated quote at column {reader.col}")
        value = reader.text[reader.pos + 1 : end]
        reader.pos = end + 1
        return _Quoted(value)
    return reader.match(_WORD, "a value")


class _Quoted(str):
    """A value written in quotes: always a string, never a number or boolean."""


def make_pass(cls: type[GraphPass], raw: dict[str, tuple[Any, int]]) -> GraphPass:
    """Build a pass from text values, converting each by its field's declared type."""
    hints = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, (value, col) in raw.items():
        attr = key.replace("-", "_")
        if attr not in fields:
            raise unknown(f"{cls.name} option", key, [f.replace("_", "-") for f in fields], col)
        try:
            kwargs[attr] = convert(value, hints[attr])
        except ValueError as e:
            raise PipelineError(f"bad value for {cls.name} option '{key}' at column {col}: {e}") from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise PipelineError(f"{cls.name}: {e}") from None


def convert(value: Any, tp: Any) -> Any:
    """Text value -> Python value of type ``tp`` (bool, int, float, str, Literal, Optional, list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value == "none" and not isinstance(value, _Quoted):
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return convert(value, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == value:
                return choice
        raise ValueError(f"'{value}' is not one of {', '.join(str(a) for a in args)}")
    if origin in (list, tuple):
        items = value if isinstance(value, list) else [value]
        converted = [convert(v, args[0]) for v in items]
        return converted if origin is list else tuple(converted)
    if isinstance(value, list):
        raise ValueError(f"expected a single {getattr(tp, '__name__', tp)}, got a list")
    if tp is bool:
        if value in ("true", "false") and not isinstance(value, _Quoted):
            return value == "true"
        raise ValueError(f"expected true or false, got '{value}'")
    if tp is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got '{value}'") from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got '{value}'") from None
    if tp is str:
        return str(value)
    raise ValueError(f"unsupported option type {tp}")


def format_pipeline(pipeline: Sequence[Element], *, full: bool = False) -> str:
    """The text form; non-default options only unless ``full`` (what goes into the model's metadata)."""
    return ",".join(_format_element(e, full) for e in pipeline)


def _format_element(element: Element, full: bool) -> str:
    if isinstance(element, Repeat):
        return f"repeat{{n={element.n}}}({format_pipeline(element.body, full=full)})"
    options = element.options(full=full)
    if not options:
        return element.name
    body = ",".join(f"{k.replace('_', '-')}={_format_value(v)}" for k, v in options.items())
    return f"{element.name}{{{body}}}"


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if isinstance(value, str) and (not _WORD.fullmatch(text) or text in ("true", "false", "none") or _is_number(text)):
        if "'" in text:
            raise PipelineError(f"option value {text!r} cannot be written in pipeline text (contains a quote)")
        return f"'{text}'"
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def flatten(pipeline: Sequence[Element]) -> list[GraphPass]:
    """Every pass object in the pipeline, repeat bodies included once each."""
    out: list[GraphPass] = []
    for e in pipeline:
        out.extend(flatten(e.body) if isinstance(e, Repeat) else [e])
    return out
