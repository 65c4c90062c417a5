"""Fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it.

With ``a = scale / sqrt(var + eps)`` and ``b = B - mean * a`` (per output channel), the producer's
weight becomes ``W * a`` along its output-channel axis and its bias ``bias * a + b``; both are
computed in float64 and rounded once. The new tensors are new initializers (a weight another node
shares is never written). Folding reorders float arithmetic, so this pass states a tolerance
instead of bit-exactness.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np
import onnx_ir as ir

from graphopt.edit import NameSet, bypass, drop_if_unused, onnx_opset
from graphopt.metrics import Tolerance
from graphopt.passbase import GraphPass, PassResult, option
from graphopt.passes._util import const_or_fill, is_std, legacy_constants, new_constant, rank, replace_input, replace_keeping_name
from graphopt.registry import register

logger = logging.getLogger(__name__)


@register
@dataclasses.dataclass
class FoldBatchnorm(GraphPass):
    """Fold inference BatchNormalization into a preceding Conv/ConvTranspose/Gemm/MatMul with constant weights."""

    name = "fold-batchnorm"
    lossless = False
    stepwise = True
    tolerance = Tolerance(min_sqnr_db=80.0)
    """Float rounding of the folded weights, judged on this pass's own change at both ORT levels.
    An elementwise bound (first tried: 1e-5 + 1e-4*|ref|) doesn't hold through deep nets: on the
    PP-OCR recognizer folding moves a softmax output by 1e-4 (rel 5e-3), as onnxruntime's own
    Conv+BatchNormalization fusion does (its default level moves that model by 7e-5, 108 dB).
    80 dB is the same noise floor a lossless pass is allowed at the deploy level."""
    matmul: bool = option(True, "also fold into a rank-2 MatMul, which becomes a Gemm with the BN shift as bias")
    max_fill_elements: int = option(1024, "read a ConstantOfShape weight or BN parameter of up to this size as a constant")

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        opset = onnx_opset(model)
        legacy = legacy_constants(model)
        names = NameSet(model)
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if is_std(node, "BatchNormalization"):
                stats[_fold(node, opset, legacy, names, self.matmul, self.max_fill_elements)] += 1
        stats = Counter({k: v for k, v in stats.items() if v})
        logger.debug("%s: %s", self.name, dict(stats))
        return PassResult(model, modified=stats["folded"] > 0, stats=dict(stats))


def _fold(bn: ir.Node, opset: int, legacy: bool, names: NameSet, matmul: bool, max_fill: int) -> str:
    if opset < 7:
        return "skipped_opset"
    if bn.attributes.get_int("training_mode", 0) or bn.attributes.get_int("spatial", 1) != 1:
        return "training_or_per_element"
    if any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
        return "statistics_used"
    x = bn.inputs[0]
    params = [const_or_fill(v, legacy, max_fill) for v in bn.inputs[1:5]]
    if x is None or any(p is None for p in params) or len(bn.inputs) < 5:
        return "params_not_constant"
    producer = x.producer()
    if producer is None or producer.graph is not bn.graph or not is_std(producer, ("Conv", "ConvTranspose", "Gemm", "MatMul")):
        return "no_producer"
    if x.is_graph_output() or len(x.uses()) != 1 or producer.outputs[0] is not x:
        return "producer_output_shared"
    weight = const_or_fill(producer.inputs[1], legacy, max_fill) if len(producer.inputs) > 1 else None
    if weight is None:
        return "weight_not_constant"
    if weight.dtype not in (np.float32, np.float64) or any(p.dtype != weight.dtype for p in params):  # type: ignore[union-attr]
        return "skipped_dtype"  # float16: the rounded fold would leave the stated tolerance
    bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
    bias = const_or_fill(bias_value, legacy, max_fill) if bias_value is not None else None
    if bias_value is not None and bias is None:
        return "bias_not_constant"
    scale, shift, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)  # type: ignore[union-attr]
    if not scale.size == shift.size == mean.size == var.size:
        return "shape_mismatch"  # an invalid BN (ORT would reject it too): leave it for the verifier to report
    eps = bn.attributes.get_float("epsilon", 1e-5)
    a = scale / np.sqrt(var + np.float64(np.float32(eps)))
    b = shift - mean * a
    channels = a.size
    w64 = weight.astype(np.float64)
    dtype = weight.dtype
    op = producer.op_type
    if op == "Conv":
        if weight.ndim < 3 or weight.shape[0] != channels:
            return "shape_mismatch"
        new_w = w64 * a.reshape((-1,) + (1,) * (weight.ndim - 1))
        new_b = (np.zeros_like(a) if bias is None else bias.astype(np.float64).reshape(-1)) * a + b
    elif op == "ConvTranspose":
        group = producer.attributes.get_int("group", 1)
        if weight.ndim < 3 or weight.shape[1] * group != channels or weight.shape[0] % group:
            return "shape_mismatch"
        g_shape = (group, weight.shape[0] // group, weight.shape[1]) + weight.shape[2:]
        a_shape = (group, 1, weight.shape[1]) + (1,) * (weight.ndim - 2)
        new_w = (w64.reshape(g_shape) * a.reshape(a_shape)).reshape(weight.shape)
        new_b = (np.zeros_like(a) if bias is None else bias.astype(np.float64).reshape(-1)) * a + b
    elif op == "Gemm":
        return _fold_gemm(bn, producer, a, b, weight, bias, names, legacy)
    else:
        return _fold_matmul(bn, producer, a, b, weight, names, legacy) if matmul else "matmul_disabled"
    replace_input(producer, 1, new_w.astype(dtype), names, as_node=legacy)
    replace_input(producer, 2, new_b.astype(bias.dtype if bias is not None else dtype), names, as_node=legacy)
    return _drop_bn(bn, x)


def _fold_gemm(
    bn: ir.Node, gemm: ir.Node, a: np.ndarray, b: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, names: NameSet, legacy: bool
) -> str:
    if weight.ndim != 2:
        return "shape_mismatch"
    trans_b = gemm.attributes.get_int("transB", 0)
    n = weight.shape[0] if trans_b else weight.shape[1]
    if n != a.size:
        return "shape_mismatch"
    beta = gemm.attributes.get_float("beta", 1.0)
    new_w = weight.astype(np.float64) * (a[:, None] if trans_b else a[None, :])
    c = np.zeros(a.size) if bias is None else beta * bias.astype(np.float64)
    if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, a.size)):
        return "shape_mismatch"
    new_c = c * a + b  # broadcasts along the last axis: output channels of Gemm
    replace_input(gemm, 1, new_w.astype(weight.dtype), names, as_node=legacy)
    replace_input(gemm, 2, new_c.astype(weight.dtype), names, as_node=legacy)
    gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    return _drop_bn(bn, gemm.outputs[0])


def _fold_matmul(bn: ir.Node, mm: ir.Node, a: np.ndarray, b: np.ndarray, weight: np.ndarray, names: NameSet, legacy: bool) -> str:
    """MatMul(A, W) + BN over axis 1 is a Gemm(A, W*a, b) when A and W are matrices."""
    lhs = mm.inputs[0]
    if rank(lhs) != 2 or weight.ndim != 2 or weight.shape[1] != a.size:
        return "shape_mismatch"
    graph = mm.graph
    assert graph is not None and lhs is not None
    base = mm.inputs[1].name or "w"
    new_w = new_constant(graph, (weight.astype(np.float64) * a[None, :]).astype(weight.dtype), base, names, as_node=legacy, before=mm)
    new_b = new_constant(graph, b.astype(weight.dtype), base + "_bias", names, as_node=legacy, before=mm)
    gemm = ir.node("Gemm", [lhs, new_w, new_b], name=mm.name)
    graph.insert_after(mm, gemm)
    y = bn.outputs[0]
    replace_keeping_name(y, gemm.outputs[0])
    graph.remove(bn, safe=True)
    old_w = mm.inputs[1]
    graph.remove(mm, safe=True)
    if old_w is not None:
        drop_if_unused(old_w)
    for v in bn.inputs[1:]:
        if v is not None:
            drop_if_unused(v)
    return "folded"


def _drop_bn(bn: ir.Node, replacement: ir.Value) -> str:
    graph = bn.graph
    assert graph is not None
    done = bypass(bn, 0, replacement)
    assert done, "the producer's output is a plain intermediate of this graph, so bypass cannot refuse"
    params = [v for v in bn.inputs[1:] if v is not None]
    graph.remove(bn, safe=True)
    for v in params:
        drop_if_unused(v)
    return "folded"
