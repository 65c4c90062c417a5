"""Run models with onnxruntime and hold each pass to its budget.

Two optimization levels are run (see DEVELOPERS.md): ``exact`` (``ORT_DISABLE_ALL``: the graph's
own meaning, so ORT's rewrites can't hide our bugs) and ``deploy`` (``ORT_ENABLE_ALL``, ORT's
default: what users run, where fusions may change numbers). References come once from the input
model at the exact level; every later figure is measured against them, so error can't creep up
pass by pass unseen.

Contracts: a lossless pass must meet its tolerance (bit-exact unless the pass states otherwise) at
the exact level, and at the deploy level stay within :data:`DEPLOY_NOISE` (float sums reordered by
ORT's fusions); float16 outputs at both levels within :data:`HALF_NOISE_ULPS` float16 steps and
:data:`HALF_NOISE_DB` (ORT places float16 roundings by graph structure). A lossy pass's budget
applies at the deploy level.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphopt import sparse
from graphopt.data import Sample, batch_rows
from graphopt.edit import iter_tensors
from graphopt.io import EXTERNAL_THRESHOLD
from graphopt.metrics import OutputError, TaskAccuracy, Tolerance, compare_outputs, task_accuracy
from graphopt.progress import track

logger = logging.getLogger(__name__)

Level = Literal["exact", "deploy"]
_ORT_LEVEL = {"exact": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "deploy": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}

DEPLOY_NOISE = Tolerance(min_sqnr_db=80.0)
"""What a lossless change may move outputs at ORT's default level: float reassociation noise
sits far above 80 dB (1e-4 relative RMS), a real change of meaning far below."""


HALF_NOISE_ULPS = 8
HALF_NOISE_DB = 50.0
"""What a lossless change may move a float16 output (at each level): at most this many float16
steps at the output's largest magnitude, and SQNR at least this. onnxruntime's CPU runs most float16
ops in float32 between Casts it inserts and drops the Casts between two such ops, so where nodes sit
moves where the rounding to float16 happens: remove-identity on a torch float16 BERT export (19
Identities and two no-op Reshapes gone) moved its output by 1.5 steps (0.0059 at 4.1), 64 dB. A
change of meaning is far outside this."""


class OrtFailure(Exception):
    """onnxruntime could not load or run a model; the message says why (one line)."""


def session_options(level: Level, threads: int | None = None, *, arena: bool = True) -> ort.SessionOptions:
    """``arena=False`` turns off ORT's CPU memory arena: a few verification runs don't need its
    speed, and what it caches (every dequantized weight, say) stays in the process after the session."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = _ORT_LEVEL[level]
    options.log_severity_level = 4  # errors come back as exceptions; ORT's own log lines would break the one-line CLI error
    if level == "exact":
        # MatMul/Gemm/Conv kernels prepack constant weights and then sum in another order than for the same
        # weight computed in the graph; off here, so bit-exactness doesn't depend on how a weight is stored.
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    return options


def make_session(model: ir.Model, level: Level, threads: int | None = None, *, arena: bool = True) -> ort.InferenceSession:
    """A CPU session for a model. Tensors still in their input files are read by ORT from there (no
    copy); only when the in-memory tensors pass 2 GB does the model go through a temp file."""
    options = session_options(level, threads, arena=arena)
    try:
        in_memory, base_dirs = 0, set()
        for tensor in iter_tensors(model):
            if isinstance(tensor, ir.ExternalTensor) and not Path(tensor.location).is_absolute():
                base_dirs.add(str(tensor.base_dir))
            else:
                in_memory += tensor.nbytes
        if in_memory < EXTERNAL_THRESHOLD and len(base_dirs) <= 1:
            if base_dirs:  # relative locations resolve against the input model's folder
                options.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dirs.pop())
            return ort.InferenceSession(sparse.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory(prefix="graphopt-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise OrtFailure(_one_line(e)) from e


def run(model: ir.Model, samples: Sequence[Sample], level: Level) -> list[dict[str, np.ndarray]]:
    """Outputs per sample, keyed by output name (bfloat16/float8/int4 ones widened exactly, see :func:`exchangeable`)."""
    model, widened = exchangeable(model)
    session = make_session(model, level, arena=False)
    names = [o.name for o in session.get_outputs()]
    outputs = []
    for sample in track(samples, f"onnxruntime ({level} level)"):
        feed = {k: np.asarray(v).astype(widened[k]) if k in widened else v for k, v in sample.items()}
        options = ort.RunOptions()
        timer = threading.Timer(_time_limit[0], lambda: setattr(options, "terminate", True)) if _time_limit[0] else None
        try:
            if timer:
                timer.start()
            values = session.run(names, feed, options)
        except Exception as e:
            if options.terminate:
                raise OrtFailure(f"onnxruntime did not finish one run within {_time_limit[0]:g} s") from None
            raise OrtFailure(_one_line(e)) from e
        finally:
            if timer:
                timer.cancel()
        outputs.append({n: np.asarray(v) for n, v in zip(names, values)})
    del session
    _trim_heap()
    return outputs


def _trim_heap() -> None:
    """Hand the freed session memory back to the OS. glibc keeps freed blocks under 32 MB (ORT's
    prepacked weights of a mid-size model) in its heaps, so each session would otherwise raise
    the process's resident memory for good."""
    if _libc is not None:
        _libc.malloc_trim(0)


try:
    _libc: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
    _libc.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _libc = None


_time_limit: list[float | None] = [None]


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Within the block, any single onnxruntime run longer than ``seconds`` is stopped and fails
    with :class:`OrtFailure` (a model whose Loop never ends can't hang verification)."""
    old, _time_limit[0] = _time_limit[0], seconds
    try:
        yield
    finally:
        _time_limit[0] = old


_WIDE = {
    **dict.fromkeys(
        ("BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT4E2M1"), ir.DataType.FLOAT
    ),
    "INT4": ir.DataType.INT8,
    "UINT4": ir.DataType.UINT8,
}
"""Element types onnxruntime's Python API can't exchange as numpy arrays, and the exact wider type."""


def exchangeable(model: ir.Model) -> tuple[ir.Model, dict[str, np.dtype]]:
    """``model``, or a copy whose bfloat16/float8/int4 graph inputs and outputs pass through an exact
    ``Cast`` to float32/int8, so ORT can be fed and read from numpy; also the numpy dtype per widened input."""
    graph = model.graph
    narrow = lambda v: v.dtype is not None and v.dtype.name in _WIDE  # noqa: E731
    if not any(narrow(v) for v in [*graph.inputs, *graph.outputs]):
        return model, {}
    copy = model.clone()
    graph, widened = copy.graph, {}
    for i, old in enumerate(list(graph.inputs)):
        if narrow(old) and not old.is_initializer():
            wide = ir.Value(name=old.name, type=ir.TensorType(_WIDE[old.dtype.name]), shape=old.shape)
            old.name = f"{old.name}__graphopt_narrow"
            cast = ir.Node("", "Cast", [wide], attributes=[ir.AttrInt64("to", old.dtype)])
            old.replace_all_uses_with(cast.outputs[0], replace_graph_outputs=True)
            graph.inputs[i] = wide
            if len(graph):
                graph.insert_before(graph[0], cast)
            else:
                graph.append(cast)
            widened[wide.name] = _WIDE[old.dtype.name].numpy()
    for i, old in enumerate(list(graph.outputs)):
        if narrow(old):
            name, old.name = old.name, f"{old.name}__graphopt_narrow_out{i}"
            cast = ir.Node("", "Cast", [old], attributes=[ir.AttrInt64("to", _WIDE[old.dtype.name])])
            cast.outputs[0].name, cast.outputs[0].type = name, ir.TensorType(_WIDE[old.dtype.name])
            graph.append(cast)
            graph.outputs[i] = cast.outputs[0]
    return copy, widened


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"(?:Load model from \S+ failed:)?\s*/onnxruntime_src/\S+:\d+ ")
_OPSET_TOO_NEW = re.compile(r"Opset (\d+) is under development.*Current official support for domain (\S+) is till opset (\d+)")


def _one_line(e: BaseException) -> str:
    """ORT's message without its error-code prefix and C++ source location and signature."""
    text = " ".join(str(e).split())
    text = _ORT_PREFIX.sub("", text)
    if m := _ORT_SOURCE.search(text):
        text = text[: m.start()] + _after_signature(text[m.end() :])
        text = _ORT_PREFIX.sub("", text)  # ORT nests: "FAIL : /src:1 sig(...) [ONNXRuntimeError] : 1 : FAIL : why"
    if m := _OPSET_TOO_NEW.search(text):
        return f"the model's {m.group(2)} opset {m.group(1)} is newer than onnxruntime {ort.__version__} supports ({m.group(3)})"
    text = text.strip()
    return text[:400] if text else type(e).__name__


def _after_signature(text: str) -> str:
    """Drop a leading C++ function signature ``ret ns::f(args...)`` (balanced parentheses)."""
    start = text.find("(")
    if start < 0 or " " not in text[:start] and "::" not in text[:start]:
        return text
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[i + 1 :].lstrip()
    return text


@dataclasses.dataclass
class Check:
    """What one verification found: figures at both levels and against the previous step."""

    exact: list[OutputError]
    deploy: list[OutputError] | None
    vs_previous: list[OutputError]
    violations: list[str]
    unverified: str = ""  # why ORT could not check this model, if it could not
    accuracy: TaskAccuracy | None = None  # with labels: at the level the budget is judged on


class Verifier:
    """Reference outputs of the input model, and the check every modified model must pass.

    When onnxruntime cannot run the input model because of ops it has no kernel for (a custom
    domain, say), the outputs that don't depend on them are still checked: ``unchecked`` names
    the others and why. ``unavailable`` says why nothing at all could be checked.
    """

    def __init__(self, model: ir.Model, samples: Sequence[Sample], *, deploy: bool = True, labels: np.ndarray | None = None) -> None:
        self.samples = list(samples)
        self.labels = labels
        self.deploy = deploy
        self.unavailable = ""
        self.unchecked: dict[str, str] = {}
        self.reference: list[dict[str, np.ndarray]] = []
        try:
            self.reference = run(model, self.samples, "exact")
        except OrtFailure as e:
            blocked = unsupported_outputs(model)
            if blocked and len(blocked) < len(model.graph.outputs):
                self.unchecked = blocked
                try:
                    self.reference = run(self.checkable(model), self.samples, "exact")
                except OrtFailure as e2:
                    self.unchecked = {}
                    self.unavailable = f"onnxruntime cannot run the input model: {e2}"
            else:
                self.unavailable = f"onnxruntime cannot run the input model: {next(iter(blocked.values()), e)}"
        self.previous = self.reference
        self.previous_deploy: list[dict[str, np.ndarray]] | None = None
        self.baseline: list[OutputError] | None = None
        if deploy and not self.unavailable:
            try:
                self.previous_deploy = run(self.checkable(model), self.samples, "deploy")
                self.baseline = compare_outputs(self.reference, self.previous_deploy)
            except OrtFailure as e:
                logger.warning("deploy-level run of the input model failed: %s", e)
        self.rows = batch_rows(self.samples)
        self.half_scale = {k: float(np.abs(np.concatenate([s[k].ravel() for s in self.reference]).astype(np.float32)).max(initial=0.0))
                           for k, v in (self.reference[0].items() if self.reference else ()) if v.dtype == np.float16}  # fmt: skip
        self.reference_accuracy = task_accuracy(self.reference, labels, self.rows) if labels is not None and self.reference else None

    def can_judge_accuracy(self) -> str:
        """Empty when task accuracy can be checked; else why not (one line)."""
        if self.labels is None:
            return "a task-accuracy budget needs labels: give verification inputs (--inputs) an .npz with a 'labels' key"
        if self.reference_accuracy is None and self.reference:
            shapes = ", ".join(f"'{k}' {list(v.shape)}" for k, v in self.reference[0].items())
            return f"no model output predicts labels of shape {list(np.shape(self.labels))} (outputs: {shapes})"
        return ""

    @property
    def status(self) -> str:
        """``"on"``, or one line saying what could not be verified and why."""
        if self.unavailable:
            return self.unavailable
        if self.unchecked:
            names = ", ".join(f"'{n}'" for n in self.unchecked)
            return f"output{'s' if len(self.unchecked) > 1 else ''} {names} not checked: {next(iter(self.unchecked.values()))}"
        return "on"

    def checkable(self, model: ir.Model) -> ir.Model:
        """``model`` restricted to the outputs onnxruntime can check (itself when that is all of them)."""
        if not self.unchecked:
            return model
        return keep_outputs(model, [v.name for v in model.graph.outputs if v.name not in self.unchecked])

    def check(self, model: ir.Model, *, lossless: bool, budget: Tolerance, stepwise: bool = False) -> Check:
        """Run ``model`` and hold it to ``budget``: a lossless or ``stepwise`` pass on its own change
        (against the last accepted step, at each level), any other lossy pass on the distance to
        the input model at the deploy level."""
        if self.unavailable:
            return Check([], None, [], [], unverified=self.unavailable)
        model = self.checkable(model)
        try:
            exact_out = run(model, self.samples, "exact")
        except OrtFailure as e:  # the input model ran, so the pass broke that: a violation, never "unverified"
            return Check([], None, [], [f"onnxruntime cannot run the model any more: {e}"])
        own = lossless or stepwise
        exact_tol = budget if own else None
        exact = compare_outputs(self.reference, exact_out, exact_tol)
        # A pass judged on its own change answers against the last accepted outputs (the reference
        # itself unless a lossy pass ran before), so `lossy,dce` doesn't hold dce to the lossy pass's error.
        vs_previous = compare_outputs(self.previous, exact_out, (lambda name: self._own_budget(name, budget, lossless)) if own else None)
        deploy = None
        own_deploy = None
        deploy_tol = DEPLOY_NOISE if lossless else budget
        if self.deploy:
            try:
                deploy_out = run(model, self.samples, "deploy")
            except OrtFailure as e:
                return Check(exact, None, vs_previous, [f"deploy-level session fails: {e}"])
            deploy = compare_outputs(self.reference, deploy_out, deploy_tol)
            # At the deploy level such a pass is compared with the previous model *at the same level*:
            # ORT's fusions (e.g. DequantizeLinear->MatMul into MatMulNBits) move deploy outputs away from
            # the exact ones by themselves, and that is not this pass's doing.
            own_deploy = deploy
            if own:
                own_deploy = compare_outputs(self.previous_deploy or self.previous, deploy_out, deploy_tol)
        violations = []
        if own:
            violations += [f"output '{e.output}' (exact level): {v}" for e in vs_previous for v in e.violations(self._own_budget(e.output, budget, lossless))]
        if own_deploy is not None:
            violations += [f"output '{e.output}' (deploy level): {v}" for e in own_deploy for v in e.violations(self._own_budget(e.output, deploy_tol, lossless))]
        elif not own:  # no deploy run asked for: the budget falls back to the exact level
            violations += [f"output '{e.output}' (exact level): {v}" for e in exact for v in e.violations(budget)]
        accuracy = None
        if self.reference_accuracy is not None:
            level = "deploy" if self.deploy else "exact"
            accuracy = task_accuracy(deploy_out if self.deploy else exact_out, self.labels, self.rows)  # type: ignore[arg-type]
            drop = 100.0 * (self.reference_accuracy.accuracy - accuracy.accuracy) if accuracy else float("inf")
            if budget.max_accuracy_drop is not None and not lossless and drop > budget.max_accuracy_drop:
                violations.append(f"output '{self.reference_accuracy.output}' ({level} level): task accuracy "
                                  f"{accuracy.accuracy if accuracy else float('nan'):.4f} vs {self.reference_accuracy.accuracy:.4f}, "
                                  f"a drop of {drop:.2f} points > {budget.max_accuracy_drop:g}")  # fmt: skip
        if not violations:
            self.previous = exact_out
            if self.deploy:
                self.previous_deploy = deploy_out
        return Check(exact, deploy, vs_previous, violations, accuracy=accuracy)

    def _own_budget(self, output: str, budget: Tolerance, lossless: bool) -> Tolerance:
        """A lossless pass's budget for one output (its own, or :data:`DEPLOY_NOISE` at the deploy
        level): float16 outputs get :data:`HALF_NOISE_ULPS` steps and :data:`HALF_NOISE_DB` instead
        (bit-exactness, or 80 dB, is not onnxruntime's to give there)."""
        if not lossless or output not in self.half_scale:
            return budget
        step = 2.0 ** (np.floor(np.log2(self.half_scale[output])) - 10) if self.half_scale[output] > 0 else 0.0
        return Tolerance(max_abs=HALF_NOISE_ULPS * step, min_sqnr_db=HALF_NOISE_DB)


def _ort_kernels() -> set[tuple[str, str]]:
    from onnxruntime.capi import _pybind_state

    return {(d.domain, d.op_name) for d in _pybind_state.get_all_opkernel_def()}


def _ort_can_run(node: ir.Node, model: ir.Model, kernels: set[tuple[str, str]]) -> str:
    """Empty when onnxruntime has a kernel (or a function body) for ``node`` and its subgraphs; else why not."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    function = model.functions.get((node.domain, node.op_type, node.overload))
    inner = [n for g in _subgraphs(node) for n in g] + (list(function) if function is not None else [])
    for n in inner:
        if why := _ort_can_run(n, model, kernels):
            return why
    if function is not None or (domain, node.op_type) in kernels or (domain, node.op_type) == ("", "Constant"):
        return ""
    try:
        schema = onnx.defs.get_schema(node.op_type, domain=domain)
        if schema.has_function or schema.has_context_dependent_function:
            return ""  # onnxruntime expands the schema's function body
    except onnx.defs.SchemaError:
        pass
    return f"onnxruntime has no kernel for {domain or 'ai.onnx'}::{node.op_type}"


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def unsupported_outputs(model: ir.Model) -> dict[str, str]:
    """Graph outputs that depend on a node onnxruntime has no kernel for, each with the reason."""
    kernels = _ort_kernels()
    out = {}
    for output in model.graph.outputs:
        seen: set[int] = set()
        stack = [output]
        while stack:
            node = stack.pop().producer()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if why := _ort_can_run(node, model, kernels):
                out[output.name or ""] = why
                break
            stack.extend(v for v in node.inputs if v is not None)
            stack.extend(v for g in _subgraphs(node) for n in ir.traversal.RecursiveGraphIterator(g) for v in n.inputs if v is not None)
    return out


def keep_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` (tensors shared) computing only the named outputs."""
    from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass

    copy = model.clone()
    kept = [v for v in copy.graph.outputs if v.name in names]
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(kept)
    RemoveUnusedNodesPass()(copy)
    RemoveUnusedFunctionsPass()(copy)
    return copy
