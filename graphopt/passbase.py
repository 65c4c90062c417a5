"""The pass base: options as dataclass fields, a name, a contract (lossless or a budget), stats.

A pass is a dataclass subclass of :class:`GraphPass`, itself an ``onnx_ir`` ``InPlacePass``,
so it can also run inside ``onnx_ir.passes.PassManager``. Options are fields declared with
:func:`option` (default + one-line doc): the registry, the pipeline text and ``graphopt passes``
all read that one declaration. Passes keep no state between runs and print nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from graphopt.metrics import Tolerance

TAG = "graphopt.made_by"
"""``metadata_props`` key on nodes a pass created, so a second run can leave them alone."""


def option(default: Any, doc: str) -> Any:
    """Declare a pass option: a dataclass field with a default and a one-line description."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """``onnx_ir``'s result plus what the pass counted and, for lossy passes, per-layer records."""

    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Sample inputs a data-aware pass may run through the model (the verification inputs by default),
    and their task labels when the data has them (one per row of all samples concatenated): with a
    task budget, the quantization searches hold their candidates to it on these."""

    samples: tuple[Mapping[str, np.ndarray], ...]
    labels: np.ndarray | None = None


@dataclasses.dataclass
class GraphPass(ir.passes.InPlacePass):
    """Base of every graphopt pass.

    Class attributes a pass sets:
      ``name``: kebab-case registry name; ``lossless``: whether outputs must stay bit-exact;
      ``tolerance``: the default budget (checked at ORT's deploy level for lossy passes).

    Every pass also takes the budget options below, which override its default budget.
    """

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    tolerance: ClassVar[Tolerance] = Tolerance.exact()
    uses_data: ClassVar[bool] = False
    """True when the pass reads ``self.calibration`` (data-aware modes)."""
    stepwise: ClassVar[bool] = False
    """For a lossy pass: its budget bounds its own change (compared with the previous step at the same
    ORT level, as a lossless pass is) instead of the distance to the input model. For float-rounding
    folds, whose budget is a noise floor: earlier lossy passes' error and ORT's fusion noise aren't theirs."""

    budget_max_abs: float | None = option(None, "verification budget: max abs error (overrides the pass default)")
    budget_min_sqnr: float | None = option(None, "verification budget: SQNR floor in dB")
    budget_min_cosine: float | None = option(None, "verification budget: cosine similarity floor")
    budget_max_accuracy_drop: float | None = option(
        None, "verification budget: task accuracy may drop by at most this many points (needs labels; replaces the default output-error budget)"
    )

    def __post_init__(self) -> None:
        self.calibration: Calibration | None = None  # set by the runner, never part of the options
        self.default_budget: Tolerance | None = None  # the runner's default for lossy passes (``--tolerance``), set while it runs the pass

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def budget(self, default: Tolerance | None = None) -> Tolerance:
        """The tolerance this pass is held to: its own, then ``default`` (e.g. ``--tolerance``), then its options.

        A task budget (accuracy drop) on a lossy pass replaces the pass's default output-error
        criteria: a user who states the accuracy they can give up shouldn't also be held to an SQNR
        they never asked for. Output criteria set explicitly (``default`` or options) still apply."""
        own = Tolerance(max_abs=self.budget_max_abs, min_sqnr_db=self.budget_min_sqnr, min_cosine=self.budget_min_cosine,
                        max_accuracy_drop=self.budget_max_accuracy_drop)  # fmt: skip
        if self.lossless:
            return self.default_tolerance().merged(own)
        asked = (default or Tolerance()).merged(own)
        base = self.default_tolerance()
        return (base.without_output_criteria() if asked.max_accuracy_drop is not None else base).merged(asked)

    def default_tolerance(self) -> Tolerance:
        """The pass's own budget before any override: the class ``tolerance``, unless it depends on
        the options (quantize-weights' bits)."""
        return self.tolerance

    def options(self, *, full: bool = False) -> dict[str, Any]:
        """Option values by field name; non-default ones only unless ``full`` (which still leaves out
        unset budget options: they only restate the pass's default budget)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if value != default or (full and f.name not in _BUDGET_FIELDS):
                out[f.name] = value
        return out

    def call(self, model: ir.Model) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


_BUDGET_FIELDS = {f.name for f in dataclasses.fields(GraphPass)}
