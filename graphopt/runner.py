"""Run a pipeline: each pass timed, measured, checked for signature and validity, and verified.

The steps around a pass are few and fixed (snapshot, run, signature, checker, verify, record),
so they are written out in order here rather than spread over instrumentation hooks; the one
hook, ``progress``, is for the CLI's display.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.errors import GraphoptError, PassFailed, UsageError, VerificationError
from graphopt.edit import all_graphs, iter_tensors
from graphopt.metrics import Tolerance
from graphopt.passbase import Calibration, GraphPass, PassResult
from graphopt.pipeline import Element, Repeat
from graphopt.report import ModelStats, PassRecord
from graphopt.verify import Verifier

logger = logging.getLogger(__name__)

OnViolation = Literal["fail", "rollback"]


@dataclasses.dataclass
class RunSettings:
    on_violation: OnViolation = "fail"
    tolerance: Tolerance | None = None  # default budget for lossy passes (``--tolerance``)
    calibration: Calibration | None = None
    check_model: bool = True  # onnx.checker after every modifying pass
    keep_partial: bool = False  # on failure, attach the last good model to the error as ``.partial``
    progress: Callable[[str], None] | None = None


def run_pipeline(
    model: ir.Model, pipeline: Sequence[Element], verifier: Verifier | None, settings: RunSettings
) -> tuple[ir.Model, list[PassRecord]]:
    """Run every element in order; returns the final model and one record per pass run."""
    records: list[PassRecord] = []
    for element in pipeline:
        model = _run_element(model, element, verifier, settings, records, iteration=None)
    return model, records


def _run_element(
    model: ir.Model, element: Element, verifier: Verifier | None, settings: RunSettings, records: list[PassRecord], iteration: int | None
) -> ir.Model:
    if isinstance(element, Repeat):
        for i in range(element.n):
            start = len(records)
            for inner in element.body:
                model = _run_element(model, inner, verifier, settings, records, iteration=i + 1)
            if not any(r.modified and r.verdict != "rolled-back" for r in records[start:]):
                break
        return model
    return _run_pass(model, element, verifier, settings, records, iteration)


def _run_pass(
    model: ir.Model, p: GraphPass, verifier: Verifier | None, settings: RunSettings, records: list[PassRecord], iteration: int | None
) -> ir.Model:
    if settings.progress:
        settings.progress(p.name)
    before = records[-1].after if records and records[-1].verdict != "rolled-back" else ModelStats.of(model)
    snapshot = model.clone() if settings.on_violation == "rollback" or settings.keep_partial else None
    try:
        return _run_checked(model, p, snapshot, before, verifier, settings, records, iteration)
    except (PassFailed, VerificationError) as e:
        e.partial = snapshot  # type: ignore[attr-defined]
        raise


def _run_checked(
    model: ir.Model,
    p: GraphPass,
    snapshot: ir.Model | None,
    before: ModelStats,
    verifier: Verifier | None,
    settings: RunSettings,
    records: list[PassRecord],
    iteration: int | None,
) -> ir.Model:
    signature = _signature(model)
    budget = p.budget(settings.tolerance)
    if verifier is not None and not p.lossless and budget.max_accuracy_drop is not None and (why := verifier.can_judge_accuracy()):
        raise UsageError(f"pass '{p.name}': {why}")
    p.calibration = settings.calibration if p.uses_data else None
    p.default_budget = settings.tolerance  # so a pass that searches for its budget (quantize-static) aims at the one it is held to
    mapped = _external(model)
    start = time.perf_counter()
    try:
        result = p(model)
    except GraphoptError:
        raise
    except Exception as e:
        raise PassFailed(f"pass '{p.name}' raised {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    finally:
        p.calibration = None
        p.default_budget = None
        for tensor in mapped + _external(model):  # unmap what the pass read: pages of weights it replaced
            tensor.release()  # would otherwise stay resident (tensors are shared with the caller's model)
    seconds = time.perf_counter() - start
    stats = result.stats if isinstance(result, PassResult) else {}
    layers = result.layers if isinstance(result, PassResult) else []
    record = PassRecord(
        p.name, p.options(), p.lossless, before, before, seconds, modified=result.modified, budget=str(budget), stats=stats, layers=layers, iteration=iteration, source=p
    )
    records.append(record)
    if not result.modified:
        return model
    if (changed := _signature(model)) != signature:
        raise PassFailed(f"pass '{p.name}' changed the model signature: {_diff(signature, changed)}")
    if settings.check_model:
        _check_valid(model, p.name)
    record.after = ModelStats.of(model)
    if verifier is None:
        record.verdict = "not-verified"
        return model
    start = time.perf_counter()
    check = verifier.check(model, lossless=p.lossless, budget=budget, stepwise=p.stepwise)
    record.verify_seconds = time.perf_counter() - start
    record.exact, record.deploy, record.vs_previous = check.exact, check.deploy, check.vs_previous
    record.violations, record.unverified = check.violations, check.unverified
    if check.accuracy is not None and verifier.reference_accuracy is not None:
        record.accuracy = (verifier.reference_accuracy.accuracy, check.accuracy.accuracy)
    if check.unverified:
        record.verdict = "unverified"
    elif not check.violations:
        record.verdict = "ok"
    elif snapshot is None or settings.on_violation == "fail":
        raise VerificationError(f"pass '{p.name}' broke its budget ({budget}): {check.violations[0]}{_worst_layer(layers)}")
    else:
        logger.warning("rolling back %s: %s%s", p.name, check.violations[0], _worst_layer(layers))
        record.verdict = "rolled-back"
        record.after = before
        return snapshot
    return model


def _worst_layer(layers: Sequence[dict]) -> str:
    """For lossy passes that report per-layer ``sqnr_db``: the layer with the lowest, to name in a failure."""
    scored = [r for r in layers if isinstance(r.get("sqnr_db"), (int, float))]
    if not scored:
        return ""
    w = min(scored, key=lambda r: r["sqnr_db"])
    return f"; lowest layer SQNR of the {len(scored)} changed: layer '{w.get('layer', '?')}' {w['sqnr_db']:.2f} dB"


def _external(model: ir.Model) -> list[ir.ExternalTensor]:
    return [t for t in iter_tensors(model) if isinstance(t, ir.ExternalTensor)]


def _signature(model: ir.Model) -> list[tuple[str, str, str]]:
    graph = model.graph
    return [("input", v.name or "", str(v.dtype)) for v in graph.inputs] + [("output", v.name or "", str(v.dtype)) for v in graph.outputs]


def _diff(a: list[tuple[str, str, str]], b: list[tuple[str, str, str]]) -> str:
    gone = [f"{k} '{n}' ({t})" for k, n, t in a if (k, n, t) not in b]
    new = [f"{k} '{n}' ({t})" for k, n, t in b if (k, n, t) not in a]
    return "; ".join(filter(None, ["lost " + ", ".join(gone) if gone else "", "added " + ", ".join(new) if new else ""])) or "order changed"


def _check_valid(model: ir.Model, pass_name: str) -> None:
    try:
        onnx.checker.check_model(ir.to_proto(skeleton(model)))
    except Exception as e:
        raise PassFailed(f"pass '{pass_name}' produced an invalid model: {' '.join(str(e).split())[:300]}") from None


SKELETON_BYTES = 1 << 20
"""Tensors above this size (and every externally stored one) are left out of the checker's copy."""


def skeleton(model: ir.Model) -> ir.Model:
    """``model``, or a copy whose big and external tensors are empty stand-ins of the same dtype.

    The checker's structural checks don't need the weights; serializing them would copy every
    in-memory tensor, and an in-memory proto's external-data paths would resolve against the
    current directory instead of the model's.
    """
    if not any(_heavy(t) for t in iter_tensors(model)):
        return model
    copy = model.clone()  # tensors are shared, so the stand-ins are set on the copy's values only
    graphs: list[ir.Graph | ir.Function] = [*all_graphs(copy), *copy.functions.values()]
    for graph in graphs:
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                if value.const_value is not None and _heavy(value.const_value):
                    value.const_value = _stand_in(value.const_value)
        for node in graph:
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and _heavy(attr.as_tensor()):
                    node.attributes[name] = ir.AttrTensor(name, _stand_in(attr.as_tensor()))
    return copy


def _heavy(tensor: ir.TensorProtocol) -> bool:
    return isinstance(tensor, ir.ExternalTensor) or tensor.nbytes > SKELETON_BYTES


def _stand_in(tensor: ir.TensorProtocol) -> ir.Tensor:
    return ir.Tensor(np.empty(0, tensor.dtype.numpy()), dtype=tensor.dtype, name=tensor.name)

