"""Error figures between reference and candidate outputs, and the budgets they are held to.

Pure numpy, no onnxruntime: passes use the same figures for their layer-level searches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A budget. Every criterion that is set must hold; None means "not checked".

    ``max_abs`` and ``max_rel`` combine elementwise as ``|d| <= max_abs + max_rel * |ref|``
    (numpy's allclose form); with only one of them set, the other counts as 0.
    ``max_accuracy_drop`` is in percentage points of task accuracy against labels (see
    :func:`task_accuracy`); it needs labelled verification inputs.
    """

    max_abs: float | None = None
    max_rel: float | None = None
    min_sqnr_db: float | None = None
    min_cosine: float | None = None
    max_accuracy_drop: float | None = None

    @classmethod
    def exact(cls) -> Tolerance:
        return cls(max_abs=0.0, max_rel=0.0)

    def merged(self, override: Tolerance | None) -> Tolerance:
        """This budget with the criteria that ``override`` sets replacing ours."""
        if override is None:
            return self
        changes = {f.name: getattr(override, f.name) for f in dataclasses.fields(self) if getattr(override, f.name) is not None}
        return dataclasses.replace(self, **changes)

    def is_set(self) -> bool:
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self))

    def __str__(self) -> str:
        parts = []
        if self.max_abs is not None or self.max_rel is not None:
            parts.append(f"|d| <= {self.max_abs or 0:g} + {self.max_rel or 0:g}*|ref|")
        if self.min_sqnr_db is not None:
            parts.append(f"sqnr >= {self.min_sqnr_db:g} dB")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {self.max_accuracy_drop:g} points")
        return ", ".join(parts) or "none"

    def without_output_criteria(self) -> Tolerance:
        """Only the task criterion: what a task budget leaves of a pass's default budget."""
        return Tolerance(max_accuracy_drop=self.max_accuracy_drop)


@dataclasses.dataclass(frozen=True)
class OutputError:
    """How far one output is from its reference, over all samples."""

    output: str
    max_abs: float
    max_rel: float  # |ref| floored at 1e-6 * max|ref|, so exact zeros don't give 1e16
    sqnr_db: float  # 10*log10(sum(ref^2) / sum(d^2)); inf when d == 0
    cosine: float
    mismatch: str = ""  # shape/dtype/NaN disagreement: always a failure
    outside_bound: float | None = None  # share of elements outside the elementwise abs/rel bound, when one was given

    def violations(self, tol: Tolerance) -> list[str]:
        """What breaks ``tol``, as short phrases; empty when the output is within budget."""
        if self.mismatch:
            return [self.mismatch]
        out = []
        if tol.max_abs is not None or tol.max_rel is not None:
            atol, rtol = tol.max_abs or 0.0, tol.max_rel or 0.0
            if self.outside_bound is not None:
                ok = self.outside_bound == 0.0
            else:  # figures only: either bound alone is sufficient
                ok = self.max_abs <= atol or (rtol > 0 and self.max_rel <= rtol)
            if not ok:
                out.append(f"max abs error {self.max_abs:.3g} (rel {self.max_rel:.3g}) > {atol:g} + {rtol:g}*|ref|")
        if tol.min_sqnr_db is not None and self.sqnr_db < tol.min_sqnr_db:
            out.append(f"SQNR {self.sqnr_db:.2f} dB < {tol.min_sqnr_db:g} dB")
        if tol.min_cosine is not None and self.cosine < tol.min_cosine:
            out.append(f"cosine {self.cosine:.6f} < {tol.min_cosine:g}")
        return out


def compare_arrays(name: str, ref: Sequence[np.ndarray], got: Sequence[np.ndarray], tol: Tolerance | None = None) -> OutputError:
    """Figures for one output given per-sample reference and candidate arrays."""
    for r, g in zip(ref, got, strict=True):
        if r.shape != g.shape:
            return _mismatch(name, f"shape {list(g.shape)} != reference {list(r.shape)}")
        if r.dtype != g.dtype:
            return _mismatch(name, f"dtype {g.dtype} != reference {r.dtype}")
    if not ref:
        return OutputError(name, 0.0, 0.0, math.inf, 1.0)
    if ref[0].dtype.kind not in "fciub":  # strings, objects: equality only
        equal = all(np.array_equal(r, g) for r, g in zip(ref, got))
        return OutputError(name, 0.0 if equal else math.inf, 0.0 if equal else math.inf, math.inf if equal else -math.inf, 1.0 if equal else 0.0)
    r = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in ref])
    g = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in got])
    r_bad, g_bad = ~np.isfinite(r), ~np.isfinite(g)
    if not np.array_equal(r_bad, g_bad) or not np.array_equal(r[r_bad], g[g_bad], equal_nan=True):
        return _mismatch(name, f"NaN/inf in {int(np.sum(r_bad != g_bad))} places where the reference has none (or vice versa)")
    r, g = r[~r_bad], g[~g_bad]
    if r.size == 0:
        return OutputError(name, 0.0, 0.0, math.inf, 1.0)
    d = g - r
    absd = np.abs(d)
    max_abs = float(absd.max())
    floor = max(float(np.abs(r).max()) * 1e-6, np.finfo(np.float64).tiny)
    max_rel = float((absd / np.maximum(np.abs(r), floor)).max())
    noise = float(np.dot(d, d))
    signal = float(np.dot(r, r))
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    nr, ng = math.sqrt(signal), math.sqrt(float(np.dot(g, g)))
    cosine = 1.0 if noise == 0 else (float(np.dot(r, g)) / (nr * ng) if nr > 0 and ng > 0 else 0.0)
    outside = None
    if tol is not None and (tol.max_abs is not None or tol.max_rel is not None):
        bound = (tol.max_abs or 0.0) + (tol.max_rel or 0.0) * np.abs(r)
        outside = float(np.mean(absd > bound))
    return OutputError(name, max_abs, max_rel, sqnr, cosine, outside_bound=outside)


def compare_outputs(
    ref: Sequence[Mapping[str, np.ndarray]], got: Sequence[Mapping[str, np.ndarray]], tol: Tolerance | Callable[[str], Tolerance] | None = None
) -> list[OutputError]:
    """Compare per-sample output dicts, output by output; a missing output is a mismatch. ``tol``:
    one tolerance for all outputs, or a function giving each output's."""
    errors = []
    for name in ref[0]:
        if any(name not in g for g in got):
            errors.append(_mismatch(name, "output is missing"))
            continue
        errors.append(compare_arrays(name, [s[name] for s in ref], [s[name] for s in got], tol(name) if callable(tol) else tol))
    return errors


@dataclasses.dataclass(frozen=True)
class TaskAccuracy:
    """Top-1 accuracy of one output against the labels."""

    output: str
    accuracy: float


def task_accuracy(outputs: Sequence[Mapping[str, np.ndarray]], labels: np.ndarray, rows: Sequence[int] | None = None) -> TaskAccuracy | None:
    """Accuracy of the first output that predicts ``labels`` (the rows of all samples, concatenated):
    an integer output shaped like the labels is compared directly (classifier labels, e.g.
    skl2onnx's), a float output with one more trailing axis by its argmax (logits, probabilities).
    ``rows``: each sample's batch size; an output must have that many rows per sample, so a shape
    or count output can't pass for predictions. None if no output fits."""
    labels = np.asarray(labels)
    for name in outputs[0] if outputs else ():
        parts = [np.asarray(s[name]) for s in outputs]
        if any(p.ndim == 0 for p in parts) or (rows is not None and [len(p) for p in parts] != list(rows)):
            continue
        got = np.concatenate(parts)
        if got.dtype.kind in "iub" and got.shape == labels.shape:
            return TaskAccuracy(name, float(np.mean(got == labels)))
        if got.dtype.kind == "f" and got.shape[:-1] == labels.shape and got.shape[-1] > 1 and _class_indices(labels, got.shape[-1]):
            return TaskAccuracy(name, float(np.mean(got.argmax(-1) == labels)))
    return None


def _class_indices(labels: np.ndarray, classes: int) -> bool:
    """Labels that can be argmax classes of ``classes`` scores (integers in [0, classes)); other
    labels (e.g. -1 for "no partner" in a retrieval task) are not a classifier's."""
    return labels.dtype.kind in "iu" and labels.size > 0 and int(labels.min()) >= 0 and int(labels.max()) < classes


def worst(errors: Sequence[OutputError]) -> OutputError | None:
    """One line per model: the largest errors and the lowest agreement over its outputs."""
    if not errors:
        return None
    return OutputError(
        output=",".join(e.output for e in errors),
        max_abs=max(e.max_abs for e in errors),
        max_rel=max(e.max_rel for e in errors),
        sqnr_db=min(e.sqnr_db for e in errors),
        cosine=min(e.cosine for e in errors),
        mismatch="; ".join(f"{e.output}: {e.mismatch}" for e in errors if e.mismatch),
        outside_bound=max((e.outside_bound for e in errors if e.outside_bound is not None), default=None),
    )


def _mismatch(name: str, why: str) -> OutputError:
    return OutputError(name, math.inf, math.inf, -math.inf, 0.0, mismatch=why)
