"""Graph side of quantize-dynamic: which nodes it can rewrite, and the rewrites, in the layouts
onnxruntime fuses.

- ``MatMul(X, W)`` / ``Gemm(X, W, C)`` with a constant float weight becomes
  ``DynamicQuantizeLinear(X) -> MatMulInteger(Xq, Wq, Xzp) -> Cast(float) -> Mul(., Xs * Ws)``
  (+ ``Add(., beta * C)`` for Gemm): onnxruntime's MatMulIntegerToFloatFusion turns the chain
  into MatMulIntegerToFloat (taking the bias Add when its constant is input 1) and, where the
  DynamicQuantizeLinear has a single reader, DynamicQuantizeMatMulFusion into
  DynamicQuantizeMatMul. ``Wq`` is int8 symmetric (zero point 0, left out), ``Ws`` per output
  column ``[N]`` or a scalar; one DynamicQuantizeLinear serves every quantized reader of ``X``.
- ``Gather(T, ids)`` on a constant float table (embeddings) stays weight-only, gather first:
  ``Gather(Tq, ids) -> Cast(float) -> Mul(., Gather(Ts[V, 1], ids))`` with one int8 scale per row,
  so only the gathered rows are converted at run time (``DequantizeLinear -> Gather`` would
  convert the whole table on every run).
- ``LSTM(X, W, R, ...)`` with constant float W and R becomes com.microsoft ``DynamicQuantizeLSTM``
  (what onnxruntime's quantize_dynamic makes): W and R int8 symmetric, stored transposed
  (``[directions, K, 4 x hidden]``, the kernel's layout), one scale per gate row
  (``[directions, 4 x hidden]``) or per direction; the kernel quantizes X and the hidden state to
  uint8 at each step. Measured here (2 cores, AVX512-VNNI): 2.2x faster than the float LSTM at
  hidden 256, 34 dB. ``layout=1`` LSTMs are left alone (the kernel has no batch-first form).

The plan is a list of node indices in the main graph, stable across ``ir.Model.clone``, so the
sensitivity search rebuilds variants on clones and the final choice on the model itself.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.edit import NameSet, add_initializer, constant_array, constant_tensor, drop_if_unused, is_onnx_op
from graphopt.layers import as_linear_layer
from graphopt.passbase import TAG
from graphopt.passes._qgraph import add_node, matches
from graphopt.passes._biascorr import correct_bias
from graphopt.passes._qmath import QTYPES, QuantizedWeight, quantize_weight, sqnr_db

INT8 = QTYPES["int8"]
MIN_OPSET = 11
"""DynamicQuantizeLinear exists since opset 11 (MatMulInteger since 10)."""


@dataclasses.dataclass
class Candidate:
    index: int  # node index in the main graph
    kind: str  # matmul | gemm | gather | lstm
    name: str
    shape: tuple[int, ...]
    qw: QuantizedWeight  # the weight as stored in the rewrite: [K, N] for matmul/gemm, the table for gather, W as [directions x 4H, K] (or [directions, 4H x K]) for lstm
    alpha: float = 1.0  # Gemm's alpha, folded into the scale
    weight_sqnr_db: float = 0.0
    recurrent: QuantizedWeight | None = None  # lstm: R, as W


def find_candidates(model: ir.Model, ops: Sequence[str], exclude: Sequence[str], min_elements: int, per_channel: bool) -> tuple[list[Candidate], dict[str, int]]:
    """Rewritable nodes of the main graph (with their quantized weights) and why others were left alone."""
    skipped: dict[str, int] = {}

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    out = []
    for index, node in enumerate(model.graph):
        if is_onnx_op(node, "Gather") and "Gather" in ops:
            table = constant_array(node.inputs[0])
            if table is None:
                continue
            if table.dtype != np.float32 or table.ndim != 2 or node.attributes.get_int("axis", 0) != 0:
                skip("gather_not_float_2d_axis0")
            elif matches(node, exclude, node.inputs[0]):
                skip("excluded")
            elif table.size < min_elements:
                skip("too_small")
            elif len(node.inputs[0].uses()) != 1 or node.inputs[0].is_graph_output():
                skip("shared_table")
            else:
                qw = quantize_weight(table, INT8, axis=0, symmetric=True)
                out.append(_candidate(index, "gather", node, table, qw))
            continue
        if is_onnx_op(node, "LSTM") and "LSTM" in ops:
            why = _lstm_refusal(node, exclude, min_elements)
            if why:
                skip(why)
            else:
                out.append(_lstm_candidate(index, node, per_channel))
            continue
        if not is_onnx_op(node, ("MatMul", "Gemm")) or node.op_type not in ops:
            continue
        layer = as_linear_layer(node)
        if layer is None:
            if constant_tensor(node.inputs[1] if len(node.inputs) > 1 else None) is None and len(node.inputs) > 1:
                skip("non_constant_weight")
            continue
        if layer.kind == "matmul-left":
            skip("constant_left_operand")
            continue
        if layer.tensor.dtype != ir.DataType.FLOAT:
            skip("not_float32")
            continue
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            skip("gemm_transA")
            continue
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None:
            skip("gemm_non_constant_bias")
            continue
        if matches(node, exclude, layer.weight):
            skip("excluded")
            continue
        w = layer.matrix()  # [K, N]: what MatMulInteger reads
        if w.size < min_elements:
            skip("too_small")
            continue
        qw = quantize_weight(w, INT8, axis=1 if per_channel else None, symmetric=True)
        alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
        out.append(_candidate(index, layer.kind, node, w, qw, alpha))
    return out, skipped


def _candidate(index: int, kind: str, node: ir.Node, w: np.ndarray, qw: QuantizedWeight, alpha: float = 1.0) -> Candidate:
    name = node.name or node.outputs[0].name or node.op_type
    return Candidate(index, kind, name, tuple(int(d) for d in w.shape), qw, alpha, round(min(sqnr_db(w, qw.dequantized()), 300.0), 2))


def _lstm_refusal(node: ir.Node, exclude: Sequence[str], min_elements: int) -> str:
    """Why this LSTM can't become a DynamicQuantizeLSTM here, or ""."""
    weights = [node.inputs[i] if len(node.inputs) > i else None for i in (1, 2)]
    arrays = [constant_array(v) if v is not None else None for v in weights]
    if any(a is None or a.dtype != np.float32 or a.ndim != 3 for a in arrays):
        return "lstm_weights_not_constant_float"
    if node.attributes.get_int("layout", 0) != 0:
        return "lstm_layout_batch_first"
    if any(len(v.uses()) != 1 or v.is_graph_output() for v in weights):  # type: ignore[union-attr]
        return "shared_weight"
    if any(matches(node, exclude, v) for v in weights):
        return "excluded"
    if sum(a.size for a in arrays) < min_elements:  # type: ignore[union-attr]
        return "too_small"
    return ""


def _lstm_candidate(index: int, node: ir.Node, per_channel: bool) -> Candidate:
    """W and R rounded with one scale per gate row (``[directions x 4H, K]`` rows), or per direction."""
    w, r = (constant_array(v) for v in node.inputs[1:3])
    rows = [a.reshape(a.shape[0] * a.shape[1], -1) if per_channel else a.reshape(a.shape[0], -1) for a in (w, r)]  # type: ignore[union-attr]
    qw, qr = (quantize_weight(a, INT8, axis=0, symmetric=True) for a in rows)
    sqnr = min(sqnr_db(a, q.dequantized()) for a, q in zip(rows, (qw, qr)))
    return Candidate(index, "lstm", node.name or node.outputs[0].name or "LSTM", tuple(int(d) for d in w.shape), qw, 1.0, round(min(sqnr, 300.0), 2), qr)  # type: ignore[union-attr]


def apply(model: ir.Model, chosen: Sequence[Candidate], tag: str, bias_means: dict[int, np.ndarray] | None = None, notes: dict[int, dict] | None = None) -> dict[str, int]:
    """Rewrite the chosen candidates of ``model`` (the model they were found in, or a clone of it).
    ``bias_means`` (candidate index -> ``_biascorr.input_means`` entry): correct those layers' bias
    for their weight's rounding first; ``notes`` gets what was done."""
    graph = model.graph
    nodes = list(graph)
    names = NameSet(model)
    dql: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
    weights: dict[int, tuple[ir.Value, ir.Value]] = {}  # id(original weight value) -> (Wq, Ws): shared weights stay shared
    stats = {"dynamic_matmuls": 0, "dynamic_lstms": 0, "gather_weight_only": 0, "bias_add_swapped": 0}
    for c in chosen:
        node = nodes[c.index]
        if c.kind == "gather":
            gather_rows_first(graph, node, c.qw, names, tag)
            stats["gather_weight_only"] += 1
            continue
        if c.kind == "lstm":
            _rewrite_lstm(graph, node, c, names, tag)
            stats["dynamic_lstms"] += 1
            continue
        if bias_means is not None and (layer := as_linear_layer(node)) is not None:
            note = correct_bias(layer, layer.tensor.numpy(), layer.from_matrix(c.qw.dequantized()), bias_means.get(c.index), names)
            if notes is not None:
                notes[c.index] = note
        weight = node.inputs[1]
        assert weight is not None
        if id(weight) not in weights:
            base = weight.name or "w"
            q = add_initializer(graph, ir.Tensor(np.ascontiguousarray(c.qw.q), dtype=INT8.dtype), base + "_q", names)
            scale = np.asarray(c.qw.scale, np.float32) * np.float32(c.alpha) if c.alpha != 1.0 else c.qw.scale
            s = add_initializer(graph, np.require(scale, dtype=np.float32, requirements="C"), base + "_s", names)
            weights[id(weight)] = (q, s)
        x = node.inputs[0]
        assert x is not None
        if id(x) not in dql:
            dql[id(x)] = _dynamic_quantize(graph, x, names, tag)
        xq, xs, xz = dql[id(x)]
        wq, ws = weights[id(weight)]
        out = node.outputs[0]
        base = out.name or "y"
        acc = add_node(graph, node, "MatMulInteger", [xq, wq, xz], {}, base + "_int", names, tag, dtype=ir.DataType.INT32)
        cast = add_node(graph, node, "Cast", [acc], {"to": int(ir.DataType.FLOAT)}, base + "_f", names, tag)
        scale = add_node(graph, node, "Mul", [xs, ws], {}, base + "_scale", names, tag)
        y = add_node(graph, node, "Mul", [cast, scale], {}, base + "_dq", names, tag)
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant_array(node.inputs[2])
            assert bias is not None
            beta = node.attributes.get_float("beta", 1.0)
            b = add_initializer(graph, (bias * np.float32(beta)).astype(np.float32), (node.inputs[2].name or "b") + "_bias", names)
            y = add_node(graph, node, "Add", [y, b], {}, base + "_bias", names, tag)
        old = [v for v in node.inputs if v is not None]
        _take_over(out, y)
        graph.remove(node, safe=True)
        for v in old:
            drop_if_unused(v)
        stats["bias_add_swapped"] += _bias_second(y)
        stats["dynamic_matmuls"] += 1
    stats["dynamic_quantize_linear"] = len(dql)
    return stats


def _dynamic_quantize(graph: ir.Graph, x: ir.Value, names: NameSet, tag: str) -> tuple[ir.Value, ir.Value, ir.Value]:
    """A DynamicQuantizeLinear of ``x`` placed right after its producer (or first in the graph)."""
    base = x.name or "x"
    outs = [
        ir.Value(name=names.fresh(base + "_quantized"), shape=x.shape, type=ir.TensorType(ir.DataType.UINT8)),
        ir.Value(name=names.fresh(base + "_scale"), shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT)),
        ir.Value(name=names.fresh(base + "_zero_point"), shape=ir.Shape([]), type=ir.TensorType(ir.DataType.UINT8)),
    ]
    node = ir.Node("", "DynamicQuantizeLinear", [x], outputs=outs, name=outs[0].name)
    node.metadata_props[TAG] = tag
    producer = x.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(next(iter(graph)), node)
    return outs[0], outs[1], outs[2]


def gather_rows_first(graph: ir.Graph, node: ir.Node, qw: QuantizedWeight, names: NameSet, tag: str) -> None:
    """``Gather(table, ids)`` -> ``Gather(Tq, ids) -> Cast -> Mul(Gather(Ts[V, 1], ids))`` for a table
    quantized int8 symmetric with one scale per row (``qw``): only the gathered rows are converted.
    Float16 scales (a float16 table's) give float16 rows."""
    assert qw.qt.dtype == INT8.dtype and not np.any(qw.zero_point) and qw.axis == 0
    table, ids = node.inputs[0], node.inputs[1]
    assert table is not None and ids is not None
    base = table.name or "table"
    half = np.asarray(qw.scale).dtype == np.float16
    dtype = ir.DataType.FLOAT16 if half else ir.DataType.FLOAT
    q = add_initializer(graph, ir.Tensor(np.ascontiguousarray(qw.q), dtype=INT8.dtype), base + "_q", names)
    s = add_initializer(graph, np.asarray(qw.scale, np.float16 if half else np.float32).reshape(-1, 1), base + "_s", names)
    out = node.outputs[0]
    rows = add_node(graph, node, "Gather", [q, ids], {"axis": 0}, (out.name or "y") + "_q", names, tag, dtype=ir.DataType.INT8)
    row_scales = add_node(graph, node, "Gather", [s, ids], {"axis": 0}, (out.name or "y") + "_s", names, tag, dtype=dtype)
    cast = add_node(graph, node, "Cast", [rows], {"to": int(dtype)}, (out.name or "y") + "_f", names, tag, dtype=dtype)
    y = add_node(graph, node, "Mul", [cast, row_scales], {}, (out.name or "y") + "_dq", names, tag, dtype=dtype)
    _take_over(out, y)
    graph.remove(node, safe=True)
    drop_if_unused(table)


def _rewrite_lstm(graph: ir.Graph, node: ir.Node, c: Candidate, names: NameSet, tag: str) -> None:
    """LSTM -> com.microsoft DynamicQuantizeLSTM: same inputs and attributes, W/R int8 transposed to
    ``[directions, K, 4H]`` with their scales and (zero) zero points as inputs 8-11."""
    assert c.recurrent is not None
    extra: list[ir.Value] = []
    directions, rows = c.shape[0], c.shape[1]  # W's [directions, 4H, K]; R shares the first two
    for value, qw in zip(node.inputs[1:3], (c.qw, c.recurrent)):
        assert value is not None
        k = qw.q.size // (directions * rows)
        base = value.name or "w"
        q = np.ascontiguousarray(qw.q.reshape(directions, rows, k).transpose(0, 2, 1))
        scale = np.asarray(qw.scale, np.float32).reshape(directions, -1)  # per gate row: [directions, 4H]
        if scale.shape[1] == 1:
            scale = scale.reshape(directions)  # per direction
        extra.append(add_initializer(graph, ir.Tensor(q, dtype=INT8.dtype), base + "_q", names))
        extra.append(add_initializer(graph, scale, base + "_s", names))
        extra.append(add_initializer(graph, ir.Tensor(np.zeros(scale.shape, np.int8), dtype=INT8.dtype), base + "_zp", names))
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    inputs[1], inputs[2] = extra[0], extra[3]
    inputs += [extra[1], extra[2], extra[4], extra[5]]
    attributes = [a for a in node.attributes.values() if a.name != "layout"]
    outputs = [ir.Value(name=names.fresh((o.name or "y") + "_q")) if o.name else ir.Value(name="") for o in node.outputs]
    new = ir.Node("com.microsoft", "DynamicQuantizeLSTM", inputs, attributes=attributes, outputs=outputs, name=names.fresh((node.name or "lstm") + "_quant"))
    new.metadata_props[TAG] = tag
    graph.insert_after(node, new)
    if "com.microsoft" not in graph.opset_imports:
        graph.opset_imports["com.microsoft"] = 1
    old = [v for v in node.inputs if v is not None]
    for o, n in zip(node.outputs, new.outputs):
        if o.name:
            _take_over(o, n)
    graph.remove(node, safe=True)
    for v in old:
        drop_if_unused(v)


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` everywhere, keeping its name, shape and type (graph outputs included)."""
    name, shape, type_ = old.name, old.shape, old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name, new.shape, new.type = name, shape, type_


def _bias_second(y: ir.Value) -> int:
    """``Add(bias, y)`` -> ``Add(y, bias)`` (float addition commutes exactly): ORT's fusion takes a
    bias Add into MatMulIntegerToFloat only when the constant is its second input."""
    if len(y.uses()) != 1 or y.is_graph_output():
        return 0
    add, k = next(iter(y.uses()))
    if k != 1 or not is_onnx_op(add, "Add") or add.inputs[0] is y:
        return 0
    bias = add.inputs[0]
    if constant_array(bias) is None:
        return 0
    add.replace_input_with(0, y)
    add.replace_input_with(1, bias)
    return 1


@functools.lru_cache(maxsize=None)
def ort_runs_dynamic(opset: int) -> bool:
    """Does this onnxruntime load DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul at ``opset``? One tiny session."""
    import onnxruntime as ort

    h, T = onnx.helper, onnx.TensorProto
    nodes = [
        h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        h.make_node("MatMulInteger", ["xq", "w", "xz"], ["a"]),
        h.make_node("Cast", ["a"], ["c"], to=T.FLOAT),
        h.make_node("Mul", ["c", "xs"], ["y"]),
    ]
    w = h.make_tensor("w", T.INT8, [4, 2], [1] * 8)
    graph = h.make_graph(nodes, "probe", [h.make_tensor_value_info("x", T.FLOAT, [3, 4])], [h.make_tensor_value_info("y", T.FLOAT, None)], [w])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), True)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001  (no kernel for one of these op versions at this opset)
        return False
    return True
