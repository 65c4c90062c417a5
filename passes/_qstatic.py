"""Planning and rewriting for quantize-static: which tensors get Q->DQ, which weights DQ, in the
QDQ layout onnxruntime fuses into QLinearConv / QLinearMatMul / QGemm / QLinearAdd / ...

The plan works on node *indices* in the main graph (stable across ``ir.Model.clone``), so the
sensitivity and latency searches can rebuild variants of the same plan on clones.

Rules (each one what ORT's QDQ selectors need on x86):
- a *compute* node (Conv, MatMul, Gemm, Add, Mul, Concat, AveragePool, GlobalAveragePool) reads
  its float activation inputs through DQ(Q(x)); Conv/Gemm/MatMul constant weights through an
  int8 DQ (per channel, symmetric) and Conv/Gemm 1-D biases through an int32 DQ with scale
  ``s_x * s_w`` (what QLinearConv/QGemm take);
- its output gets Q->DQ too when the fused kernel needs an int8 output (Conv/Add/Mul/Concat/pools)
  or when every reader is quantized (MatMul/Gemm, else they run as MatMulIntegerToFloat / QGemm
  with float output); graph outputs stay float;
- ``Relu`` right after a compute node is absorbed: the Q covers the Relu output's range, which
  starts at 0, so its zero point is qmin and saturation does the Relu (exact, as ORT's own tool);
  so is a ``Clip`` with constant bounds ``lo <= 0 <= hi`` (ReLU6 of MobileNet/EfficientNet): the Q
  covers the Clip output's calibrated range ``[a, b]`` within the bounds and saturates where the
  Clip would, exactly as the Q that quantizes the Clip's output would have. (A Clip whose range
  excludes 0, e.g. ``Clip(1, 5)``, is not: the Q's range must include 0.) Measured on
  EfficientNet-Lite0: a ReLU6 left in float between DQ and Q cost the stem conv alone 4.6 dB.
- data-movement nodes (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, MaxPool, Dropout, Identity)
  share their input's scale, so ORT drops their Q/DQ and runs them on int8.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401

from graphopt.activations import capture
from graphopt.data import Sample
from graphopt.edit import NameSet, add_initializer, constant_array, drop_if_unused, is_onnx_op, onnx_opset
from graphopt.layers import as_linear_layer
from graphopt.passes._biascorr import correct_bias
from graphopt.passes._calibrate import Method, mask_like, tensor_range
from graphopt.passes._qgraph import add_dequantize, matches
from graphopt.passes._qmath import QTYPES, QType, QuantizedWeight, expand, quantize, quantize_weight, scale_zero_point

COMPUTE = ("Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool")
NEEDS_INT8_OUTPUT = ("Conv", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool")
TRANSPARENT = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Dropout", "Identity")
WEIGHTED = ("Conv", "MatMul", "Gemm")


@dataclasses.dataclass
class Plan:
    compute: list[int]  # node indices quantized
    absorbed: dict[int, int]  # relu index -> producer index
    tensors: list[str]  # names of tensors that get Q->DQ (after Relu absorption: the Relu output's name)
    groups: dict[str, str]  # tensor -> group root (tensors sharing one scale)
    skipped: dict[str, int]


def float_tensors(model: ir.Model) -> dict[str, int | None]:
    """Float32 values of the main graph and their rank (types from onnx shape inference on a clone)."""
    clone = model.clone()
    try:
        ir.passes.common.ShapeInferencePass()(clone)
    except Exception:  # noqa: BLE001  (inference is best effort; untyped values count as not float)
        pass
    values = list(clone.graph.inputs) + [v for node in clone.graph for v in node.outputs]
    return {v.name: (len(v.shape) if v.shape is not None else None) for v in values if v.name and v.dtype == ir.DataType.FLOAT}


def fuse_matmul_add(model: ir.Model, ranks: dict[str, int | None], names: NameSet) -> int:
    """MatMul(X 2-D, constant W) -> Add(constant bias [N]) into Gemm(X, W, bias), as ORT's own
    MatMulAddFusion does before its QDQ fusions (it would otherwise leave DQ -> Gemm unfused)."""
    fused = 0
    for node in list(model.graph):
        if not is_onnx_op(node, "MatMul") or ranks.get(node.inputs[0].name) != 2:
            continue
        w = constant_array(node.inputs[1])
        y = node.outputs[0]
        if w is None or w.ndim != 2 or len(y.uses()) != 1 or y.is_graph_output():
            continue
        add, k = next(iter(y.uses()))
        bias = constant_array(add.inputs[1 - k]) if is_onnx_op(add, "Add") else None
        if bias is None or bias.dtype != np.float32 or bias.shape not in ((w.shape[1],), (1, w.shape[1])):
            continue
        b = add_initializer(model.graph, bias.reshape(-1), (add.inputs[1 - k].name or "b") + "_gemm", names)
        out = ir.Value(name=names.fresh((add.outputs[0].name or "y") + "_gemm"), type=add.outputs[0].type, shape=add.outputs[0].shape)
        gemm = ir.Node("", "Gemm", [node.inputs[0], node.inputs[1], b], outputs=[out], name=names.fresh(node.name or "gemm"))
        model.graph.insert_after(add, gemm)
        old = add.outputs[0]
        name = old.name
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        old_bias = add.inputs[1 - k]
        model.graph.remove([add, node], safe=True)
        old.name, out.name = None, name
        drop_if_unused(old_bias)
        fused += 1
    return fused


def fold_batchnorm(model: ir.Model, names: NameSet) -> int:
    """Conv -> BatchNormalization (inference form, constant parameters, sole reader) into one Conv."""
    folded = 0
    for bn in list(model.graph):
        if not is_onnx_op(bn, "BatchNormalization") or len(bn.outputs) != 1 or bn.attributes.get_int("training_mode", 0):
            continue
        conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        if conv is None or not is_onnx_op(conv, "Conv") or len(bn.inputs[0].uses()) != 1 or bn.inputs[0].is_graph_output():
            continue
        params = [constant_array(v) for v in bn.inputs[1:5]]
        w = constant_array(conv.inputs[1])
        b = constant_array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
        if w is None or any(p is None for p in params) or (len(conv.inputs) > 2 and conv.inputs[2] is not None and b is None):
            continue
        gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
        k = gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
        new_w = (w.astype(np.float64) * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        new_b = ((0.0 if b is None else b.astype(np.float64)) - mean) * k + beta
        old_w, old_b = conv.inputs[1], conv.inputs[2] if len(conv.inputs) > 2 else None
        conv.replace_input_with(1, add_initializer(model.graph, new_w, (old_w.name or "w") + "_bn", names))
        bias = add_initializer(model.graph, new_b.astype(np.float32), (conv.outputs[0].name or "b") + "_bias", names)
        if len(conv.inputs) > 2:
            conv.replace_input_with(2, bias)
        else:
            conv.resize_inputs(3)
            conv.replace_input_with(2, bias)
        y = bn.outputs[0]
        x = conv.outputs[0]
        name = y.name
        bn_params = list(bn.inputs[1:5])
        y.replace_all_uses_with(x, replace_graph_outputs=True)
        model.graph.remove(bn, safe=True)
        y.name = None
        x.name = name
        for v in (old_w, old_b, *bn_params):
            if v is not None:
                drop_if_unused(v)
        folded += 1
    return folded


def make_plan(model: ir.Model, ops: Sequence[str], exclude: Sequence[str], keep_float: set[int], floats: dict[str, int | None]) -> Plan:
    nodes = list(model.graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    skipped: dict[str, int] = {}
    compute = []
    for i, node in enumerate(nodes):
        if not is_onnx_op(node, COMPUTE) or node.op_type not in ops:
            continue
        why = _why_not(node, exclude, floats)
        if why is None and i in keep_float:
            why = "kept_float"
        if why:
            skipped[why] = skipped.get(why, 0) + 1
        else:
            compute.append(i)
    computed = set(compute)
    absorbed = {}
    for i, node in enumerate(nodes):
        if is_onnx_op(node, "Relu") or _is_zero_clip(node):
            x = node.inputs[0]
            p = x.producer() if x is not None else None
            if p is not None and index.get(id(p)) in computed and len(x.uses()) == 1 and not x.is_graph_output() and not node.outputs[0].is_graph_output():
                absorbed[i] = index[id(p)]
    alias = {nodes[p].outputs[0].name: nodes[r].outputs[0].name for r, p in absorbed.items()}
    name = lambda v: alias.get(v.name, v.name)  # noqa: E731
    readers_quantized = lambda v: all(index.get(id(u)) in computed or is_onnx_op(u, TRANSPARENT) for u, _ in v.uses())  # noqa: E731
    tensors: list[str] = []
    for i in compute:
        node = nodes[i]
        for k, v in enumerate(node.inputs):
            if v is not None and _is_activation(node, k) and v.name in floats:
                tensors.append(name(v))
        out = node.outputs[0]
        if i in absorbed.values():
            out = next(nodes[r].outputs[0] for r, p in absorbed.items() if p == i)
        if not out.is_graph_output() and (node.op_type in NEEDS_INT8_OUTPUT or (out.uses() and readers_quantized(out))):
            tensors.append(out.name)
    groups = _propagate(nodes, tensors, name, floats)
    # a Relu is absorbed only where its output really gets a Q (the Q's saturation does the Relu)
    absorbed = {r: p for r, p in absorbed.items() if nodes[r].outputs[0].name in groups}
    return Plan(compute, absorbed, list(dict.fromkeys(groups)), groups, skipped)


def _is_zero_clip(node: ir.Node) -> bool:
    """A Clip with constant bounds around 0 (missing bounds are infinite), so a Q can absorb it."""
    if not is_onnx_op(node, "Clip"):
        return False
    bounds = []
    for k, attr, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        if attr in node.attributes:  # opset < 11
            bounds.append(node.attributes.get_float(attr))
        elif len(node.inputs) > k and node.inputs[k] is not None:
            value = constant_array(node.inputs[k])
            if value is None or value.size != 1:
                return False
            bounds.append(float(value.reshape(())))
        else:
            bounds.append(default)
    return bounds[0] <= 0.0 <= bounds[1]


def _why_not(node: ir.Node, exclude: Sequence[str], floats: dict[str, int | None]) -> str | None:
    if matches(node, exclude):
        return "excluded"
    if node.outputs[0].name not in floats:
        return "not_float"
    inputs = [v for v in node.inputs if v is not None]
    consts = [constant_array(v) is not None for v in inputs]
    if node.op_type in WEIGHTED and not (node.op_type == "MatMul" and not any(consts)):
        layer = as_linear_layer(node)
        if layer is None or layer.kind == "matmul-left" or layer.tensor.dtype != ir.DataType.FLOAT or inputs[0].name not in floats:
            return "unsupported_weight"
        if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0):
            return "unsupported_gemm"
        return None
    if node.op_type in ("AveragePool", "GlobalAveragePool"):
        inputs, consts = inputs[:1], consts[:1]
    if any(consts) or any(v.name not in floats for v in inputs):
        return "constant_or_nonfloat_operand"
    return None


def _is_activation(node: ir.Node, k: int) -> bool:
    if node.op_type in ("Conv", "Gemm"):
        return k == 0
    if node.op_type == "MatMul":
        return constant_array(node.inputs[k]) is None
    if node.op_type in ("AveragePool", "GlobalAveragePool"):
        return k == 0
    return True


def _propagate(nodes: list[ir.Node], tensors: list[str], name, floats: dict[str, int | None]) -> dict[str, str]:  # noqa: ANN001
    """Close ``tensors`` over data-movement nodes (input and output share a scale); tensor -> group root."""
    parent: dict[str, str] = {t: t for t in tensors}

    def root(t: str) -> str:
        while parent[t] != t:
            t = parent[t]
        return t

    changed = True
    while changed:
        changed = False
        for node in nodes:
            if not is_onnx_op(node, TRANSPARENT) or node.inputs[0] is None or len(node.outputs) < 1:
                continue
            if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
                continue
            a, b = name(node.inputs[0]), node.outputs[0].name
            if a not in floats and node.inputs[0].name not in floats or node.outputs[0].is_graph_output():
                continue
            if (a in parent) == (b in parent) and (a not in parent or root(a) == root(b)):
                continue
            for t in (a, b):
                parent.setdefault(t, t)
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[rb] = ra
                changed = True
    return {t: root(t) for t in parent}


def collect_ranges(
    model: ir.Model, names: Sequence[str], samples: Sequence[Sample], method: Method, qt: QType, percentile: float, chunk: int = 16
) -> tuple[dict[str, tuple[float, float]], set[str]]:
    """Calibrated range per tensor, and the mask-like tensors (see ``_calibrate.mask_like``), capturing
    ``chunk`` tensors per ORT run to bound memory."""
    out = {}
    masks = set()
    names = list(names)
    for start in range(0, len(names), chunk):
        part = names[start : start + chunk]
        for n, arrays in capture(model, samples, part).items():
            out[n] = tensor_range(arrays, method, qt, percentile=percentile)
            if mask_like(arrays):
                masks.add(n)
    return out, masks


def touching(model: ir.Model, plan: Plan, tensors: set[str]) -> set[int]:
    """Compute nodes of ``plan`` that would quantize one of ``tensors`` or a tensor sharing its scale."""
    roots = {plan.groups[t] for t in tensors if t in plan.groups}
    bad = {t for t, r in plan.groups.items() if r in roots}
    nodes = list(model.graph)
    relu_out = {p: nodes[r].outputs[0].name for r, p in plan.absorbed.items()}
    out = set()
    for i in plan.compute:
        names = {v.name for v in nodes[i].inputs if v is not None} | {nodes[i].outputs[0].name, relu_out.get(i)}
        if names & bad:
            out.add(i)
    return out


def group_params(plan: Plan, ranges: dict[str, tuple[float, float]], qt: QType) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scale and zero point per tensor: one pair per group, covering every member's range."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for t, r in plan.groups.items():
        a, b = ranges[t]
        lo[r], hi[r] = min(lo.get(r, 0.0), a), max(hi.get(r, 0.0), b)
    params = {r: scale_zero_point(np.float32(lo[r]), np.float32(hi[r]), qt, symmetric=False) for r in lo}
    return {t: params[r] for t, r in plan.groups.items()}


def apply_plan(
    model: ir.Model, plan: Plan, params: dict[str, tuple[np.ndarray, np.ndarray]], qt: QType, per_channel: bool, tag: str,
    cache: dict[tuple[int, int | None], QuantizedWeight] | None = None, bias_means: dict[int, np.ndarray] | None = None,
    notes: dict[int, dict] | None = None,
) -> int:
    """Rewrite ``model`` (the one the plan was made on, or a clone of it); returns Q/DQ pairs added.
    ``cache`` keeps quantized weights between rewrites of clones (which share their tensors).
    ``bias_means`` (node index -> ``_biascorr.input_means`` entry): correct those nodes' float bias
    for their weight's quantization before it is quantized to int32; ``notes`` gets what was done."""
    graph = model.graph
    nodes = list(graph)
    names = NameSet(model)
    for r, p in plan.absorbed.items():  # the Q after the producer will do the Relu/Clip
        relu, x = nodes[r], nodes[p].outputs[0]
        y = relu.outputs[0]
        name = y.name
        bounds = [v for v in relu.inputs[1:] if v is not None]
        y.replace_all_uses_with(x)
        graph.remove(relu, safe=True)
        y.name, x.name = None, name
        for v in bounds:
            drop_if_unused(v)
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        values.update({v.name: v for v in node.outputs if v.name})
    first = next(iter(graph))
    computed = {id(nodes[i]) for i in plan.compute}
    for t in plan.tensors:
        value = values[t]
        scale, zp = params[t]
        uses = list(value.uses())  # before the Q below becomes one of them
        producer = value.producer()
        anchor = producer if producer is not None else first
        s = add_initializer(graph, np.asarray(scale, np.float32), f"{t}_scale", names)
        z = add_initializer(graph, ir.Tensor(np.asarray(zp, qt.numpy), dtype=qt.dtype), f"{t}_zero_point", names)
        # untyped outputs: no value_info entries, which weigh ~5% of a small model's file
        q_node = ir.Node("", "QuantizeLinear", [value, s, z], outputs=[ir.Value(name=names.fresh(f"{t}_quantized"))], name=names.fresh(f"{t}_Q"))
        dq_out = ir.Value(name=names.fresh(f"{t}_dequantized"))
        dq_node = ir.Node("", "DequantizeLinear", [q_node.outputs[0], s, z], outputs=[dq_out], name=names.fresh(f"{t}_DQ"))
        for n in (q_node, dq_node):
            n.metadata_props["graphopt.made_by"] = tag
        if producer is not None:
            graph.insert_after(anchor, [q_node, dq_node])
        else:
            graph.insert_before(anchor, [q_node, dq_node])
        # Readers that stay float keep the exact tensor (a residual stream read by a quantized MatMul
        # and a float Add) unless it is a fused kernel's output, which ORT wants read through the DQ only.
        own = producer is not None and id(producer) in computed
        for u, k in uses:
            if own or id(u) in computed or is_onnx_op(u, TRANSPARENT):
                u.replace_input_with(k, dq_out)
    if onnx_opset(model) >= 13:  # per-axis DequantizeLinear
        _shield_float_weights(graph, computed, names, tag)
    for i in plan.compute:
        node = nodes[i]
        if node.op_type not in WEIGHTED or (node.op_type == "MatMul" and constant_array(node.inputs[1]) is None):
            continue
        layer = as_linear_layer(node)
        assert layer is not None
        w = layer.tensor.numpy()
        axis = layer.output_axis if per_channel else None
        key = (id(layer.tensor), axis)
        qw = cache.get(key) if cache is not None else None
        if qw is None:
            qw = quantize_weight(w, QTYPES["int8"], axis=axis, symmetric=True)
            if cache is not None:
                cache[key] = qw
        has_bias = node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None
        if has_bias:
            qw = _fit_bias(qw, w, node)
        if bias_means is not None:
            note = correct_bias(layer, w, qw.dequantized(), bias_means.get(i), names)
            if notes is not None:
                notes[i] = note
            has_bias = node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None
        old = layer.weight
        node.replace_input_with(layer.weight_index, add_dequantize(graph, node, qw, old.name or "w", names, tag, with_zero_point=True))  # QGemm fusion needs it
        drop_if_unused(old)
        if has_bias:
            _quantize_bias(graph, node, qw, params, names, tag)
    return len(plan.tensors)


def _shield_float_weights(graph: ir.Graph, computed: set[int], names: NameSet, tag: str) -> None:
    """Give each Conv/ConvTranspose/Gemm left in float that reads a one-scale DequantizeLinear its
    own DequantizeLinear with that scale repeated along the channel axis.

    onnxruntime's ``WeightBiasQuantization`` (basic level and up, so what users run) quantizes the
    float weight of such a node to int8, per tensor, whenever its input comes from a per-tensor
    DequantizeLinear: a layer kept in float ran with per-tensor int8 weights. Measured on
    EfficientNet-Lite0: keeping its first depthwise conv in float took the model from 22.2 dB to
    7.2 (its channels' ranges differ 1000-fold), so the sensitivity search saw keeping layers float
    hurt. A per-axis DequantizeLinear gives the same numbers and is not what the transformer takes.
    """
    for node in list(graph):
        if id(node) in computed or not is_onnx_op(node, ("Conv", "ConvTranspose", "Gemm")) or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], constant_array(node.inputs[1])
        dq = x.producer() if x is not None else None
        if dq is None or not is_onnx_op(dq, "DequantizeLinear") or w is None or w.dtype != np.float32 or w.ndim < 2:
            continue
        scale = constant_array(dq.inputs[1])
        zero = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        if scale is None or scale.size != 1:
            continue
        if node.op_type == "Gemm":
            axis = 0 if node.attributes.get_int("transA", 0) else 1
            channels = w.shape[1] if node.attributes.get_int("transB", 0) else w.shape[0]
        else:
            axis = 1
            channels = w.shape[0] if node.op_type == "ConvTranspose" else w.shape[1] * node.attributes.get_int("group", 1)
        inputs = [dq.inputs[0], add_initializer(graph, np.full(channels, scale.reshape(()), np.float32), f"{x.name}_axis_scale", names)]
        if zero is not None:
            inputs.append(add_initializer(graph, ir.Tensor(np.full(channels, zero.reshape(())), dtype=dq.inputs[2].dtype), f"{x.name}_axis_zero_point", names))
        twin = ir.Node("", "DequantizeLinear", inputs, attributes=[ir.AttrInt64("axis", axis)], outputs=[ir.Value(name=names.fresh(f"{x.name}_for_float"))], name=names.fresh(f"{x.name}_DQ_axis"))
        twin.metadata_props["graphopt.made_by"] = tag
        graph.insert_after(dq, twin)
        node.replace_input_with(0, twin.outputs[0])


def _input_scale(node: ir.Node) -> np.ndarray | None:
    src = node.inputs[0].producer() if node.inputs[0] is not None else None
    return constant_array(src.inputs[1]) if src is not None and is_onnx_op(src, "DequantizeLinear") else None


def _fit_bias(qw: QuantizedWeight, w: np.ndarray, node: ir.Node) -> QuantizedWeight:
    """Widen weight scales where the int32 bias ``b / (s_x * s_w)`` would overflow (a near-dead
    channel with a live bias), as ORT's own tool does; the weight is requantized with them."""
    b, sx = constant_array(node.inputs[2]), _input_scale(node)
    if b is None or b.ndim != 1 or sx is None:
        return qw
    need = (np.abs(b.astype(np.float64)) / (float(sx) * (2**31 - 1)) * 1.01).astype(np.float32)
    scale = np.maximum(qw.scale, need if qw.scale.ndim else need.max()).astype(np.float32)
    if np.array_equal(scale, qw.scale):
        return qw
    full = expand(scale, w.shape, qw.axis)
    return QuantizedWeight(quantize(w, full, np.zeros(w.shape, np.int8), qw.qt), scale, np.zeros(scale.shape, np.int8), qw.qt, qw.axis)


def _quantize_bias(graph: ir.Graph, node: ir.Node, qw: QuantizedWeight, params: dict, names: NameSet, tag: str) -> None:
    """1-D bias -> int32 with scale s_x * s_w (zero point 0), what QLinearConv/QGemm read."""
    bias_value = node.inputs[2]
    b = constant_array(bias_value)
    x = node.inputs[0]
    src = x.producer()
    if b is None or b.ndim != 1 or src is None or not is_onnx_op(src, "DequantizeLinear") or len(bias_value.uses()) != 1:
        return
    if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
        return
    sx = constant_array(src.inputs[1])
    scale = (np.float32(sx) * np.broadcast_to(qw.scale, b.shape)).astype(np.float32)
    if np.any(scale == 0) or np.max(np.abs(b.astype(np.float64) / scale)) > 2**31 - 1:
        return
    q = quantize(b, scale, np.zeros(b.shape, np.int32), QTYPES["int32"])
    qb = QuantizedWeight(q, scale, np.zeros(b.shape, np.int32), QTYPES["int32"], axis=0)
    node.replace_input_with(2, add_dequantize(graph, node, qb, bias_value.name or "b", names, tag, with_zero_point=False))
    drop_if_unused(bias_value)


__all__ = ["Plan", "apply_plan", "collect_ranges", "touching", "float_tensors", "fold_batchnorm", "group_params", "make_plan"]
