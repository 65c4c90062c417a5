"""The Python API: ``optimize`` a model with a pipeline, ``verify`` one model against another."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import io, sparse
from graphopt.data import LABELS_KEY, Sample, ShapeSpec, generate, load_npz
from graphopt.errors import GraphoptError, ModelError, UsageError
from graphopt.metrics import OutputError, Tolerance, compare_outputs
from graphopt.passbase import Calibration
from graphopt.pipeline import Element, Repeat, format_pipeline, parse_pipeline
from graphopt.report import ModelStats, PassRecord, Report
from graphopt.runner import OnViolation, RunSettings, run_pipeline
from graphopt.verify import OrtFailure, Verifier, run

ModelLike = Union[str, os.PathLike, onnx.ModelProto, ir.Model]
InputsLike = Union[str, os.PathLike, Mapping[str, np.ndarray], Sequence[Mapping[str, np.ndarray]], None]

PIPELINE_KEY = "graphopt.pipeline"
VERSION_KEY = "graphopt.version"
VERIFIED_KEY = "graphopt.verified"
PARTIAL_KEY = "graphopt.partial"
"""On a model saved with --keep-partial: the error that stopped the pipeline."""


def as_model(model: ModelLike) -> ir.Model:
    """An ``ir.Model`` the caller's object won't see changes of (tensors are shared, never written)."""
    if isinstance(model, ir.Model):
        return model.clone()
    if isinstance(model, onnx.ModelProto):
        return sparse.from_proto(model)
    if isinstance(model, (str, os.PathLike)):
        return io.load(model)
    raise UsageError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def prepare_inputs(
    model: ir.Model, inputs: InputsLike, *, input_shape: Sequence[str] | ShapeSpec = (), samples: int = 2, seed: int = 0
) -> tuple[list[Sample], np.ndarray | None]:
    """Samples for verification, and task labels when the data carries them (a ``labels`` key in the
    .npz or in each sample mapping)."""
    if inputs is None:
        spec = input_shape if isinstance(input_shape, ShapeSpec) else ShapeSpec.parse(input_shape)
        return generate(model, spec=spec, samples=samples, seed=seed), None
    if isinstance(inputs, (str, os.PathLike)):
        return load_npz(inputs, model)
    samples_in = [dict(inputs)] if isinstance(inputs, Mapping) else [dict(s) for s in inputs]
    labels = [s.pop(LABELS_KEY) for s in samples_in if LABELS_KEY in s]
    if labels and len(labels) != len(samples_in):
        raise UsageError(f"'{LABELS_KEY}' is in some input samples only: give it with every sample or none")
    return samples_in, np.concatenate([np.atleast_1d(np.asarray(a)) for a in labels]) if labels else None


def optimize(
    model: ModelLike,
    pipeline: str | Sequence[Element],
    *,
    inputs: InputsLike = None,
    input_shape: Sequence[str] = (),
    samples: int = 2,
    seed: int = 0,
    calibration: InputsLike = None,
    on_violation: OnViolation = "fail",
    tolerance: Tolerance | None = None,
    verify: bool = True,
    deploy_check: bool = True,
    keep_partial: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[ir.Model, Report]:
    """Run ``pipeline`` on ``model``, verifying after every pass; the input is never modified.

    Returns the optimized model and the :class:`~graphopt.report.Report`. Raises
    :class:`~graphopt.errors.VerificationError` when a pass breaks its budget and
    ``on_violation="fail"``; with ``"rollback"`` that pass is undone and the rest go on.
    With ``keep_partial``, a failing pass's error carries ``.partial``: the model from before it.
    """
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    name = str(model) if isinstance(model, (str, os.PathLike)) else "<in-memory>"
    work = as_model(model)
    original = ModelStats.of(work)
    verifier = None
    verification = "off"
    data: list[Sample] = []
    labels = None
    if verify:
        data, labels = prepare_inputs(work, inputs, input_shape=input_shape, samples=samples, seed=seed)
        verifier = Verifier(work, data, deploy=deploy_check, labels=labels)
        verification = verifier.status
    calib = None
    if calibration is not None:
        calib_data, calib_labels = prepare_inputs(work, calibration, input_shape=input_shape, samples=max(samples, 8), seed=seed + 1)
        calib = Calibration(tuple(calib_data), calib_labels)
    elif data:
        calib = Calibration(tuple(data), labels)
    settings = RunSettings(on_violation=on_violation, tolerance=tolerance, calibration=calib, keep_partial=keep_partial, progress=progress)
    try:
        result, records = run_pipeline(work, passes, verifier, settings)
    except GraphoptError as e:
        if (partial := getattr(e, "partial", None)) is not None:
            partial.metadata_props[PARTIAL_KEY] = str(e)
        raise
    kept = [r for r in records if r.verdict != "rolled-back"]
    applied = format_pipeline(_without_rolled_back(passes, records), full=True)
    stamp(result, applied, verified=verification == "on" and all(r.verified for r in records))
    report = Report(
        model=name,
        pipeline=format_pipeline(passes),
        records=records,
        original=original,
        final=records[-1].after if kept else original,
        reference_samples=len(data),
        verification=verification,
        baseline_deploy=verifier.baseline if verifier else None,
    )
    return result, report


def _without_rolled_back(passes: Sequence[Element], records: Sequence[PassRecord]) -> list[Element]:
    """The pipeline minus passes whose every run was rolled back (what the output really had applied)."""
    rolled = {id(r.source) for r in records if r.verdict == "rolled-back"}
    rolled -= {id(r.source) for r in records if r.verdict != "rolled-back" and r.modified}
    out: list[Element] = []
    for e in passes:
        if isinstance(e, Repeat):
            body = _without_rolled_back(e.body, records)
            if body:
                out.append(Repeat(e.n, tuple(body)))
        elif id(e) not in rolled:
            out.append(e)
    return out


def stamp(model: ir.Model, pipeline_text: str, *, verified: bool) -> None:
    from graphopt import __version__

    model.metadata_props[PIPELINE_KEY] = pipeline_text
    model.metadata_props[VERSION_KEY] = __version__
    model.metadata_props[VERIFIED_KEY] = "true" if verified else "false"


def verify(
    reference: ModelLike, candidate: ModelLike, *, inputs: InputsLike = None, input_shape: Sequence[str] = (), samples: int = 2, seed: int = 0
) -> dict[str, list[OutputError]]:
    """Run both models on the same inputs; figures per output at both ORT levels vs ``reference`` at the exact level."""
    ref_model, cand_model = as_model(reference), as_model(candidate)
    data, _ = prepare_inputs(ref_model, inputs, input_shape=input_shape, samples=samples, seed=seed)
    try:
        ref_out = run(ref_model, data, "exact")
    except OrtFailure as e:
        raise ModelError(f"onnxruntime cannot run the reference model: {e}") from None
    out = {}
    for level in ("exact", "deploy"):
        try:
            out[level] = compare_outputs(ref_out, run(cand_model, data, level))
        except OrtFailure as e:
            raise ModelError(f"onnxruntime cannot run the candidate model at the {level} level: {e}") from None
    return out


def save(model: ir.Model, path: str | os.PathLike, *, protect: Sequence[str | os.PathLike] = ()) -> list[Path]:
    return io.save(model, path, protect=tuple(Path(p) for p in protect))
