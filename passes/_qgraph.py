"""Graph side of quantization, shared by the quantize passes.

What's here: spotting an already quantized model, folding ``Transpose`` of a constant weight (legacy
exporters put MatMul weights behind one, which hides them from onnxruntime.quantization) and other
constant subgraphs that compute a weight (torch's LSTM export slices and concatenates W, R and B per
gate), adding
DequantizeLinear nodes for quantized weights, ``exclude=`` matching, and upgrading a model's opset
with onnx's version converter, verified with onnxruntime before it is accepted.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir

from graphopt.data import Sample, generate
from graphopt.edit import NameSet, add_initializer, constant_array, drop_if_unused, is_onnx_op, onnx_opset
from graphopt.metrics import compare_outputs
from graphopt.passbase import TAG
from graphopt.verify import OrtFailure, run
from graphopt.passes._qmath import QuantizedWeight
from graphopt.passes.folding import NEVER, FoldConstants

logger = logging.getLogger(__name__)

QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "MatMulNBits",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM",
    "GatherBlockQuantized",
}
"""Ops whose presence means someone already quantized the model: the quantize passes leave it alone."""

CONVERSION_MIN_SQNR = 100.0
"""An opset conversion is accepted only if ORT's outputs stay within float noise of the original's."""


def is_quantized(model: ir.Model) -> bool:
    return any(node.op_type in QUANTIZED_OPS for node in ir.traversal.RecursiveGraphIterator(model.graph))


def matches(node: ir.Node, patterns: Sequence[str], weight: ir.Value | None = None) -> bool:
    """True when a pattern (fnmatch, case-sensitive) matches the node's name, op type, an output name or the weight's name."""
    keys = [node.name or "", node.op_type, *(v.name or "" for v in node.outputs)]
    if weight is not None:
        keys.append(weight.name or "")
    return any(fnmatch.fnmatchcase(k, p) for p in patterns for k in keys if k)


def fold_transposed_weights(model: ir.Model, names: NameSet, ops: Sequence[str] = ("MatMul", "Gemm")) -> int:
    """Replace ``Transpose(constant)`` feeding a MatMul/Gemm weight input by the transposed constant.

    Lossless (a data move). The Transpose stays when something else reads it. Returns how many
    weights were folded.
    """
    folded = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if not is_onnx_op(node, tuple(ops)) or len(node.inputs) < 2:
            continue
        for index in (1, 0) if node.op_type == "MatMul" else (1,):
            value = node.inputs[index]
            producer = value.producer() if value is not None else None
            if producer is None or not is_onnx_op(producer, "Transpose") or producer.graph is not node.graph:
                continue
            source = constant_array(producer.inputs[0])
            if source is None or source.dtype.kind != "f" or source.ndim != 2:
                continue
            if node.op_type == "MatMul" and constant_array(node.inputs[1 - index]) is not None:
                continue  # constant @ constant: not a weight, leave it to constant folding
            perm = producer.attributes.get_ints("perm", None)
            array = np.ascontiguousarray(np.transpose(source, perm) if perm is not None else source.T)
            new = add_initializer(node.graph, array, (producer.inputs[0].name or "w") + "_t", names)
            node.replace_input_with(index, new)
            if not (value.uses() or value.is_graph_output()):
                old = producer.inputs[0]
                node.graph.remove(producer, safe=True)
                drop_if_unused(old)
            folded += 1
    return folded


WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (1, 0), "Gemm": (1,), "Conv": (1,), "ConvTranspose": (1,), "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2), "Gather": (0,),
}  # fmt: skip
"""The inputs of each op that the quantize passes treat as weights when they are constant."""


def fold_weight_chains(model: ir.Model, ops: Sequence[str]) -> int:
    """Fold the constant subgraphs that compute a weight input of ``ops`` (not a constant itself, but
    computed from constants only) with fold-constants (bit-exact; its size caps apply); returns the
    number of nodes folded. Without this, a weight behind Slice/Concat/Unsqueeze is invisible to
    the quantizers, as it is to onnxruntime.quantization."""
    memo: dict[int, bool] = {}
    hidden = (
        v
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.domain in ("", "ai.onnx") and node.op_type in ops
        for i in WEIGHT_INPUTS.get(node.op_type, ())
        if len(node.inputs) > i and (v := node.inputs[i]) is not None and v.producer() is not None and constant_array(v) is None
    )
    if not any(_from_constants(v, memo) for v in hidden):
        return 0
    return int(FoldConstants().call(model).stats.get("folded", 0))


def _from_constants(v: ir.Value, memo: dict[int, bool], depth: int = 0) -> bool:
    """Is ``v`` computed from constants only, by ops fold-constants evaluates (within 64 producers)?"""
    if constant_array(v) is not None:
        return True
    node = v.producer()
    if node is None or depth > 64 or node.domain not in ("", "ai.onnx") or node.op_type in NEVER:
        return False
    if id(node) not in memo:
        memo[id(node)] = not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()) and all(
            i is None or _from_constants(i, memo, depth + 1) for i in node.inputs
        )
    return memo[id(node)]


def add_dequantize(graph: ir.Graph, before: ir.Node, qw: QuantizedWeight, base: str, names: NameSet, pass_name: str, *, with_zero_point: bool | None = None) -> ir.Value:
    """Initializers for ``qw`` and a DequantizeLinear reading them, inserted before ``before``; returns its output.

    Kept small on disk: names are ``<base>_q``, ``_s``, ``_zp`` and ``_dq``, the node has no name of
    its own and no tag (a quantized model is recognized by its ops, :func:`is_quantized`), and the
    zero point (``with_zero_point=None``) is left out when it is all zeros of a signed type: a
    DequantizeLinear without one uses 0 of the input's type, the same result. ``True`` always
    writes it (some ORT fusions want it), ``False`` never (the caller knows it is the default).
    """
    q = add_initializer(graph, ir.Tensor(np.require(qw.q, requirements="C"), dtype=qw.qt.dtype), base + "_q", names)
    half = np.asarray(qw.scale).dtype == np.float16  # the scale's type is the output's: float16 weights keep float16 scales
    scale = add_initializer(graph, np.require(qw.scale, dtype=np.float16 if half else np.float32, requirements="C"), base + "_s", names)  # 0-d stays 0-d
    inputs = [q, scale]
    if with_zero_point is None:
        with_zero_point = not (qw.qt.signed and not np.any(np.asarray(qw.zero_point)))
    if with_zero_point:
        inputs.append(add_initializer(graph, ir.Tensor(np.require(qw.zero_point, requirements="C"), dtype=qw.qt.dtype), base + "_zp", names))
    attributes = {}
    if qw.axis is not None and qw.scale.ndim > 0:
        attributes["axis"] = qw.axis
    if qw.block_size:
        attributes["block_size"] = qw.block_size
    return add_node(graph, before, "DequantizeLinear", inputs, attributes, base + "_dq", names, pass_name, dtype=None, named=False, tagged=False)


def share_initializers(graph: ir.Graph, values: Iterable[ir.Value], max_bytes: int = 4096) -> int:
    """Make the readers of identical small initializers among ``values`` (same type, shape and
    bytes: scales, zero points) read one of them, and drop the others. Returns how many were dropped."""
    first: dict[tuple, ir.Value] = {}
    dropped = 0
    for v in values:
        t = v.const_value
        if t is None or v.name not in graph.initializers or v.is_graph_input() or v.is_graph_output() or t.nbytes > max_bytes:
            continue
        key = (t.dtype, tuple(t.shape), t.tobytes())
        keep = first.setdefault(key, v)
        if keep is v:
            continue
        v.replace_all_uses_with(keep)
        drop_if_unused(v)
        dropped += 1
    return dropped


def add_node(
    graph: ir.Graph, before: ir.Node, op: str, inputs: Sequence[ir.Value | None], attributes: dict, out_base: str, names: NameSet, pass_name: str,
    shape: ir.Shape | None = None, domain: str = "", dtype: ir.DataType | None = ir.DataType.FLOAT, named: bool = True, tagged: bool = True,
) -> ir.Value:
    """One new single-output node, tagged as ours (unless ``tagged=False``), inserted before ``before``."""
    out = ir.Value(name=names.fresh(out_base), shape=shape, type=ir.TensorType(dtype) if dtype is not None else None)
    node = ir.Node(domain, op, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attributes.items()], outputs=[out], name=out.name if named else "")  # "": no name (None gets one made up)
    if tagged:
        node.metadata_props[TAG] = pass_name
    graph.insert_before(before, node)
    return out


def upgrade_opset(model: ir.Model, target: int, samples: Sequence[Sample] | None) -> str:
    """Bring the default-domain opset up to ``target`` in place; "" on success, else why not.

    onnx's version converter does the rewrite; the result must pass the checker and give the same
    outputs under onnxruntime (exact level, SQNR >= :data:`CONVERSION_MIN_SQNR`) on ``samples`` (or
    generated inputs) before it replaces the model's graph.
    """
    current = onnx_opset(model)
    if current >= target:
        return ""
    try:
        data = list(samples) if samples else generate(model, samples=1)
    except Exception as e:  # dynamic dims we can't fill: no way to verify the conversion
        return f"cannot generate inputs to verify the opset conversion ({e})"
    proto = ir.to_proto(model)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
        converted.ir_version = max(converted.ir_version, onnx.helper.find_min_ir_version_for(list(converted.opset_import), True))
        onnx.checker.check_model(converted)
    except Exception as e:
        return f"onnx version converter {current}->{target} failed: {' '.join(str(e).split())[:200]}"
    new = ir.from_proto(converted)
    _keep_own_value_info(model, new)
    try:
        before, after = run(model, data, "exact"), run(new, data, "exact")
    except OrtFailure as e:
        return f"onnxruntime cannot run the opset-{target} model: {e}"
    errors = compare_outputs(before, after)
    if any(e.mismatch or e.sqnr_db < CONVERSION_MIN_SQNR for e in errors):
        return f"opset {current}->{target} conversion changes outputs (SQNR {min(e.sqnr_db for e in errors):.1f} dB)"
    model.graph = new.graph
    model.ir_version = new.ir_version
    logger.info("upgraded opset %d -> %d", current, target)
    return ""


def _keep_own_value_info(old: ir.Model, new: ir.Model) -> None:
    """Give ``new``'s intermediate values the shapes and types ``old`` had under the same name, none
    for the rest: the version converter writes inferred ``value_info`` for every value, which made
    PP-OCR cls's int8 file 5% bigger and can sway onnxruntime's fusions (see ``_util.inferred_shapes``)."""
    own = {v.name: (v.shape, v.type) for graph in old.graphs() for node in graph for v in node.outputs}
    for graph in new.graphs():
        outputs = set(graph.outputs)
        for node in graph:
            for v in node.outputs:
                if v not in outputs:
                    v.shape, v.type = own.get(v.name, (None, None))


@functools.lru_cache(maxsize=None)
def _ort_runs_qdq(opset: int, dtype: ir.DataType, layout: str, op: str) -> bool:
    """Does this onnxruntime build load a model at ``opset`` holding ``op`` (DequantizeLinear, or a
    QuantizeLinear -> DequantizeLinear pair) of ``dtype`` with scales per ``layout`` ("tensor",
    "axis" or "blocked")? One tiny session."""
    import onnxruntime as ort

    h, T = onnx.helper, onnx.TensorProto
    elem = int(dtype)
    if op == "DequantizeLinear":
        attrs, dims = {"tensor": ({}, []), "axis": ({"axis": 1}, [4]), "blocked": ({"axis": 0, "block_size": 16}, [2, 4])}[layout]
        scale = h.make_tensor("s", T.FLOAT, dims, [0.5] * int(np.prod(dims)))
        q = h.make_tensor("w", elem, [32, 4], [1] * 128)
        nodes = [h.make_node("DequantizeLinear", ["w", "s"], ["y"], **attrs)]
        inits, inputs = [q, scale], []
    else:
        inits = [h.make_tensor("s", T.FLOAT, [], [0.5]), h.make_tensor("z", elem, [], [0])]
        nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
        inputs = [h.make_tensor_value_info("x", T.FLOAT, [32, 4])]
    graph = h.make_graph(nodes, "probe", inputs, [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001  (NOT_IMPLEMENTED: no kernel for this op version)
        return False
    return True


def ort_qdq_gap(opset: int, dtype: ir.DataType, *, layout: str = "axis", activations: bool = False) -> tuple[str, int]:
    """("", opset) when onnxruntime runs the Q/DQ we would write at ``opset``; else (why not, the
    highest opset <= ``opset`` at which it does, 0 if none).

    onnx defines QuantizeLinear/DequantizeLinear versions (e.g. 28 in onnx 1.23) that an older
    onnxruntime has no kernel for; a model's default-domain opset fixes the version of every op in
    it, so the passes refuse such models instead of writing nodes ORT can't load.
    """
    op = "QuantizeLinear" if activations else "DequantizeLinear"
    layout = "tensor" if activations else layout
    if _ort_runs_qdq(opset, dtype, layout, op):
        return "", opset
    versions = sorted({s.since_version for s in onnx.defs.get_all_schemas_with_history() if s.name == op and s.domain == "" and s.since_version <= opset}, reverse=True)
    since = versions[0] if versions else opset
    best = next((v for v in versions[1:] if _ort_runs_qdq(v, dtype, layout, op)), 0)
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} has no {op}-{since} kernel for {dtype.name} per {layout} (the model's opset {opset}); it runs up to {op}-{best}", best
