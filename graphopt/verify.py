"""Run models with onnxruntime and hold each pass to its budget.

Two optimization levels are run (see DEVELOPERS.md): ``exact`` (``ORT_DISABLE_ALL``: the graph's
own meaning, so ORT's rewrites can't hide our bugs) and ``deploy`` (``ORT_ENABLE_ALL``, ORT's
default: what users run, where fusions may change numbers). References come once from the input
model at the exact level; every later figure is measured against them, so error can't creep up
pass by pass unseen.

Contracts: a lossless pass must meet its tolerance (bit-exact unless the pass states otherwise) at
the exact level, and at the deploy level stay within :data:`DEPLOY_NOISE` (float sums reordered by
ORT's fusions). A lossy pass's budget applies at the deploy level.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphopt.data import Sample
from graphopt.io import EXTERNAL_THRESHOLD, tensor_bytes
from graphopt.metrics import OutputError, Tolerance, compare_outputs

logger = logging.getLogger(__name__)

Level = Literal["exact", "deploy"]
_ORT_LEVEL = {"exact": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "deploy": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}

DEPLOY_NOISE = Tolerance(min_sqnr_db=80.0)
"""What a lossless change may move outputs at ORT's default level: float reassociation noise
sits far above 80 dB (1e-4 relative RMS), a real change of meaning far below."""


class OrtFailure(Exception):
    """onnxruntime could not load or run a model; the message says why (one line)."""


def session_options(level: Level, threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = _ORT_LEVEL[level]
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def make_session(model: ir.Model, level: Level, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session for an in-memory model; big or externally stored models go through a temp file."""
    options = session_options(level, threads)
    try:
        if tensor_bytes(model) < EXTERNAL_THRESHOLD and not _has_external(model):
            return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory(prefix="graphopt-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise OrtFailure(_one_line(e)) from e


def _has_external(model: ir.Model) -> bool:
    from graphopt.edit import iter_tensors

    return any(isinstance(t, ir.ExternalTensor) for t in iter_tensors(model))


def run(model: ir.Model, samples: Sequence[Sample], level: Level) -> list[dict[str, np.ndarray]]:
    """Outputs per sample, keyed by output name."""
    session = make_session(model, level)
    names = [o.name for o in session.get_outputs()]
    outputs = []
    for sample in samples:
        try:
            values = session.run(names, dict(sample))
        except Exception as e:
            raise OrtFailure(_one_line(e)) from e
        outputs.append({n: np.asarray(v) for n, v in zip(names, values)})
    return outputs


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:400] if text else type(e).__name__


@dataclasses.dataclass
class Check:
    """What one verification found: figures at both levels and against the previous step."""

    exact: list[OutputError]
    deploy: list[OutputError] | None
    vs_previous: list[OutputError]
    violations: list[str]
    unverified: str = ""  # why ORT could not check this model, if it could not


class Verifier:
    """Reference outputs of the input model, and the check every modified model must pass."""

    def __init__(self, model: ir.Model, samples: Sequence[Sample], *, deploy: bool = True) -> None:
        self.samples = list(samples)
        self.deploy = deploy
        self.unavailable = ""
        try:
            self.reference = run(model, self.samples, "exact")
        except OrtFailure as e:
            self.reference = []
            self.unavailable = f"onnxruntime cannot run the input model: {e}"
        self.previous = self.reference
        self.baseline: list[OutputError] | None = None
        if deploy and not self.unavailable:
            try:
                self.baseline = compare_outputs(self.reference, run(model, self.samples, "deploy"))
            except OrtFailure as e:
                logger.warning("deploy-level run of the input model failed: %s", e)

    def check(self, model: ir.Model, *, lossless: bool, budget: Tolerance) -> Check:
        if self.unavailable:
            return Check([], None, [], [], unverified=self.unavailable)
        try:
            exact_out = run(model, self.samples, "exact")
        except OrtFailure as e:
            return Check([], None, [], [], unverified=f"onnxruntime cannot run the model: {e}")
        exact_tol = budget if lossless else None
        exact = compare_outputs(self.reference, exact_out, exact_tol)
        vs_previous = compare_outputs(self.previous, exact_out)
        deploy = None
        deploy_tol = DEPLOY_NOISE if lossless else budget
        if self.deploy:
            try:
                deploy = compare_outputs(self.reference, run(model, self.samples, "deploy"), deploy_tol)
            except OrtFailure as e:
                return Check(exact, None, vs_previous, [f"deploy-level session fails: {e}"])
        violations = []
        if lossless:
            violations += [f"output '{e.output}' (exact level): {v}" for e in exact for v in e.violations(budget)]
        if deploy is not None:
            violations += [f"output '{e.output}' (deploy level): {v}" for e in deploy for v in e.violations(deploy_tol)]
        elif not lossless:  # no deploy run asked for: the budget falls back to the exact level
            violations += [f"output '{e.output}' (exact level): {v}" for e in exact for v in e.violations(budget)]
        if not violations:
            self.previous = exact_out
        return Check(exact, deploy, vs_previous, violations)

