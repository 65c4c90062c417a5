"""Pipeline text: parse/format round trip for every pass, and the one-line errors."""

from __future__ import annotations

import dataclasses

import pytest

from graphopt.errors import PipelineError, RegistryError
from graphopt.passbase import GraphPass, option
from graphopt.pipeline import Repeat, format_pipeline, parse_pipeline
from graphopt.registry import all_passes, describe, get_pass, register


@pytest.mark.parametrize("name", sorted(all_passes()))
def test_round_trip_every_pass(name: str) -> None:
    cls = all_passes()[name]
    default = cls()
    for full in (False, True):
        text = format_pipeline([default], full=full)
        assert parse_pipeline(text) == [default]
    assert cls.summary(), f"{name} has no one-line description"
    for opt in describe(cls):
        assert opt.doc


def test_round_trip_options_and_repeat() -> None:
    text = "dce,lift-constants{min-elements=4,all-forms=true},repeat{n=2}(dce,lift-constants{budget-min-sqnr=30.5})"
    pipeline = parse_pipeline(text)
    assert isinstance(pipeline[2], Repeat) and pipeline[2].n == 2
    assert pipeline[1].min_elements == 4 and pipeline[1].all_forms is True
    assert format_pipeline(pipeline) == text
    assert parse_pipeline(format_pipeline(pipeline, full=True)) == pipeline


def test_whitespace_and_comments() -> None:
    text = """
    # cleanup first
    dce ,
    lift-constants { min-elements = 8 }   # then lift
    """
    assert format_pipeline(parse_pipeline(text)) == "dce,lift-constants{min-elements=8}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dcee", "unknown pass 'dcee' at column 1; did you mean 'dce'?"),
        ("dce,lift-constant", "unknown pass 'lift-constant' at column 5; did you mean 'lift-constants'?"),
        ("lift-constants{min-elemnts=3}", "unknown lift-constants option 'min-elemnts' at column 16; did you mean 'min-elements'?"),
        ("lift-constants{all-forms=yes}", "bad value for lift-constants option 'all-forms' at column 16: expected true or false, got 'yes'"),
        ("lift-constants{min-elements=1.5}", "expected an integer, got '1.5'"),
        ("lift-constants{min-elements=3,min-elements=4}", "option 'min-elements' given twice"),
        ("dce,", "expected a pass name at column 5, found end of text"),
        ("dce(x)", "unexpected '(' at column 4"),
        ("repeat{n=0}(dce)", "needs a positive integer"),
        ("repeat{m=2}(dce)", "unknown repeat option 'm'"),
        ("lift-constants{min-elements=3", "expected '}'"),
        ("", "empty pipeline"),
    ],
)
def test_errors_are_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_registry_refuses_duplicates_and_bad_names() -> None:
    with pytest.raises(RegistryError, match="already registered"):

        @register
        @dataclasses.dataclass
        class Again(GraphPass):
            """Duplicate."""

            name = "dce"

    with pytest.raises(RegistryError, match="not kebab-case"):

        @register
        @dataclasses.dataclass
        class Bad(GraphPass):
            """Bad name."""

            name = "Bad_Name"

    with pytest.raises(RegistryError, match="has no doc"):

        @register
        @dataclasses.dataclass
        class NoDoc(GraphPass):
            """Option without doc."""

            name = "no-doc-option"
            level: int = 3

    assert "no-doc-option" not in all_passes()


def test_get_pass_unknown_suggests() -> None:
    with pytest.raises(PipelineError, match="did you mean 'dce'"):
        get_pass("dec")


def test_option_types_convert() -> None:
    @dataclasses.dataclass
    class Typed(GraphPass):
        """Typed options (not registered)."""

        name = "typed-options"
        mode: str = option("a", "a word")
        limit: float | None = option(None, "optional number")
        names: list[str] = option([], "patterns")

    from graphopt.pipeline import convert
    from typing import Literal

    assert convert("none", float | None) is None
    assert convert("2.5", float | None) == 2.5
    assert convert(["a", "b*"], list[str]) == ["a", "b*"]
    assert convert("x", list[str]) == ["x"]
    assert convert("int8", Literal["int8", "uint8"]) == "int8"
    with pytest.raises(ValueError, match="not one of int8, uint8"):
        convert("int4", Literal["int8", "uint8"])
    t = Typed(names=["layer.*", "a b"])
    assert format_pipeline([t]) == "typed-options{names=[layer.*,'a b']}"
