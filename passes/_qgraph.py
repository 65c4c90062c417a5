"""Graph side of quantization, shared by quantize-weights and quantize-static.

What's here: spotting an already quantized model, folding ``Transpose`` of a constant weight (legacy
exporters put MatMul weights behind one, which hides them from onnxruntime.quantization), adding
DequantizeLinear nodes for quantized weights, ``exclude=`` matching, and upgrading a model's opset
with onnx's version converter, verified with onnxruntime before it is accepted.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

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


def add_dequantize(graph: ir.Graph, before: ir.Node, qw: QuantizedWeight, base: str, names: NameSet, pass_name: str, *, with_zero_point: bool = True) -> ir.Value:
    """Initializers for ``qw`` and a DequantizeLinear reading them, inserted before ``before``; returns its output."""
    q = add_initializer(graph, ir.Tensor(np.require(qw.q, requirements="C"), dtype=qw.qt.dtype), base + "_quantized", names)
    scale = add_initializer(graph, np.require(qw.scale, dtype=np.float32, requirements="C"), base + "_scale", names)  # 0-d stays 0-d
    inputs = [q, scale]
    if with_zero_point:
        inputs.append(add_initializer(graph, ir.Tensor(np.require(qw.zero_point, requirements="C"), dtype=qw.qt.dtype), base + "_zero_point", names))
    attributes = {}
    if qw.axis is not None and qw.scale.ndim > 0:
        attributes["axis"] = qw.axis
    if qw.block_size:
        attributes["block_size"] = qw.block_size
    return add_node(graph, before, "DequantizeLinear", inputs, attributes, base + "_dequantized", names, pass_name, dtype=None)


def add_node(
    graph: ir.Graph, before: ir.Node, op: str, inputs: Sequence[ir.Value | None], attributes: dict, out_base: str, names: NameSet, pass_name: str,
    shape: ir.Shape | None = None, domain: str = "", dtype: ir.DataType | None = ir.DataType.FLOAT,
) -> ir.Value:
    """One new single-output node, tagged as ours, inserted before ``before``."""
    out = ir.Value(name=names.fresh(out_base), shape=shape, type=ir.TensorType(dtype) if dtype is not None else None)
    node = ir.Node(domain, op, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attributes.items()], outputs=[out], name=out.name)
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
