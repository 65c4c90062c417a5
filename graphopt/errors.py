"""Errors with one-line messages and the CLI exit code each maps to.

`graphopt.cli` is the only place that turns these into text; everything else raises.
Exit codes (documented in the README):

==  =====================================================================
0   success
1   unexpected internal error (a bug: please report it)
2   usage: bad flags, pipeline text, option values; an output path that is the input, its data,
    a directory, or can't be written
3   the model or the input data cannot be read or is invalid
4   a pass raised or broke an invariant (signature changed, invalid graph)
5   verification failed: a pass went over its budget, or onnxruntime can no longer run the
    model after it (on-violation=fail)
6   the output was written, but some outputs could not be verified: onnxruntime has no kernel
    for an op (the outputs that don't need it are still checked), doesn't support the opset,
    or a run exceeded --ort-timeout (see --allow-unverified)
130 interrupted (SIGINT/SIGTERM); nothing was written (or the complete output, if the
    interrupt came after the save)
==  =====================================================================
"""

from __future__ import annotations

from typing import ClassVar


class GraphoptError(Exception):
    """Base of every error graphopt raises on purpose."""

    exit_code: ClassVar[int] = 1


class UsageError(GraphoptError):
    exit_code = 2


class PipelineError(UsageError):
    """Unknown pass or option, or a malformed pipeline text."""


class RegistryError(GraphoptError):
    """A pass was declared wrongly (bad or duplicate name): a programming error."""


class ModelError(GraphoptError):
    exit_code = 3


class InputDataError(ModelError):
    """User-provided or generated inputs don't fit the model's signature."""


class PassFailed(GraphoptError):
    exit_code = 4


class VerificationError(GraphoptError):
    exit_code = 5


class UnverifiedError(GraphoptError):
    """Some outputs could not be checked with onnxruntime."""

    exit_code = 6


class Interrupted(GraphoptError):
    exit_code = 130


def unknown(kind: str, name: str, known: list[str], col: int | None = None) -> PipelineError:
    """``unknown pass 'svd-spilt' at column 20; did you mean 'svd-split'?``"""
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(known))}"
    where = f" at column {col}" if col is not None else ""
    return PipelineError(f"unknown {kind} '{name}'{where}; {hint}")
