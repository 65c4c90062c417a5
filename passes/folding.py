"""Constant folding: evaluate nodes whose inputs are all constants with onnxruntime, bit-exact.

Each foldable node is run alone in an onnxruntime CPU session at ``ORT_DISABLE_ALL``, so the folded
tensor holds exactly what the unfolded graph computes at run time. Constants are Constant nodes,
initializers that are not graph inputs (IR<4: those too, as onnxruntime reads them), ConstantOfShape
of a constant shape, and the static part of ``Shape`` (Shape→Gather/Slice→Unsqueeze→Concat chains).

What is never folded: Q/DQ (quantization must stay visible), random ops, control flow, other domains,
and folds that grow the file past the caps: ConstantOfShape alone (a compact constant), results over
``max_output_elements`` and nodes reading a constant over ``max_input_elements``, unless the result
is no bigger than the constants it frees (a single-use weight behind Transpose/Reshape/Cast). A constant
read only by data movement (Slice, Gather, Split...) is freed once all its readers fold: each reader is
credited its share of the bytes, so a weight cut in pieces (torch's LSTM export slices one weight four
ways and concatenates the gates in ONNX's order) folds when the pieces together are no bigger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
from collections import Counter

import numpy as np
import onnx
import onnx.helper
import onnx_ir as ir
import onnxruntime as ort

from graphopt.edit import NameSet, drop_if_unused, is_onnx_op, onnx_opset
from graphopt.passbase import GraphPass, PassResult, option
from graphopt.passes._shapes import SHAPE_OPS, ShapeValues
from graphopt.passes._util import const_array, inferred_shapes, legacy_constants, new_constant
from graphopt.registry import register

logger = logging.getLogger(__name__)

NEVER = frozenset(
    {
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",  # quantization stays explicit
        "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
        "Dropout",  # remove-dropout's job (training mode is random)
        "If", "Loop", "Scan",
    }
)  # fmt: skip
HEAVY = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"})
"""Not evaluated when an input is over ``max_input_elements`` (evaluation time), even if it would not grow the file."""

MOVES = frozenset(
    {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice", "Gather", "Expand", "Tile", "Shape", "Size"}
)
"""Ops that move values without computing new ones."""

FILL_KEEPING = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Identity", "Expand", "Tile", "Cast"})
"""A uniform tensor stays uniform through these: the result of one is a fill too."""

_DTYPES = frozenset(
    {
        ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BOOL, ir.DataType.STRING,
        ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
        ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
    }
)  # fmt: skip
"""Element types numpy and onnxruntime exchange without conversion."""


@dataclasses.dataclass
class _Folded:
    array: np.ndarray
    fill: bool = False  # a ConstantOfShape result, or a reshaping of one: stored only up to max_fill_elements
    from_shape: bool = False  # depends on the static shape of a non-constant tensor (onnxruntime can't fold it)


@register
@dataclasses.dataclass
class FoldConstants(GraphPass):
    """Evaluate all-constant nodes with onnxruntime (bit-exact) and store the results as initializers."""

    name = "fold-constants"
    max_output_elements: int = option(512 * 512, "a bigger result is stored only if it frees at least as many bytes as it adds")
    max_input_elements: int = option(8192, "a node reading a bigger constant is folded only if its result frees at least as many bytes as it adds")
    max_fill_elements: int = option(1024, "store a ConstantOfShape result (or a reshaping of one) only up to this size; bigger, it stays compact")
    shapes: bool = option(True, "fold the static part of Shape chains and make Reshape targets constant (after onnx shape inference)")
    lift: bool = option(True, "turn every Constant node into an initializer")

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        names = NameSet(model)
        legacy = legacy_constants(model)
        for _ in range(8):  # a Reshape target made constant lets shape inference see further: go again
            before = stats["reshape_shape"]
            with inferred_shapes(model) if self.shapes else contextlib.nullcontext():
                for graph in list(model.graphs()):
                    _fold_graph(self, model, graph, names, legacy, stats)
            if stats["reshape_shape"] == before:
                break
        stats = Counter({k: v for k, v in stats.items() if v})
        logger.debug("%s: %s", self.name, dict(stats))
        return PassResult(model, modified=bool(stats["folded"] + stats["lifted"] + stats["reshape_shape"] + stats["shape_reused"] + stats["shape_rewritten"]), stats=dict(stats))


def _fold_graph(p: FoldConstants, model: ir.Model, graph: ir.Graph, names: NameSet, legacy: bool, stats: Counter[str]) -> None:
    virtual: dict[ir.Value, _Folded] = {}
    folded: list[ir.Node] = []

    def array_of(v: ir.Value) -> np.ndarray | None:
        if v in virtual:
            return virtual[v].array
        return const_array(v, legacy)

    shapes = ShapeValues(array_of, graph)
    shared = _SharedConstants(model, array_of, legacy)
    seen: dict[tuple, ir.Value] = {}
    opset = onnx_opset(model)
    for node in list(graph):
        if p.shapes:
            shapes.track(node)
            if is_onnx_op(node, "Reshape") and (target := shapes.reshape_target(node)) is not None:
                old = node.inputs[1]
                node.replace_input_with(1, new_constant(graph, target, (old.name if old is not None else None) or "shape", names, as_node=legacy, before=node))
                stats["reshape_shape"] += 1
            _reuse_shape(node, shapes, seen, opset, names, stats)
        result = _try_node(p, model, node, array_of, shapes, virtual, shared, stats)
        if result is None:
            continue
        for out, folded_value in zip(node.outputs, result):
            virtual[out] = folded_value
        folded.append(node)
    if not folded:
        return
    # Store what a node we keep reads; a result nobody may store keeps its producer (whose inputs are then needed).
    kept: set[ir.Node] = set()
    done = set(folded)
    order = {n: i for i, n in enumerate(folded)}  # topological: consumers are handled before their producers
    pending: list[tuple[int, int, ir.Value]] = []

    def need(v: ir.Value) -> None:
        heapq.heappush(pending, (-order[v.producer()], id(v), v))  # type: ignore[index]

    for n in folded:
        for v in n.outputs:
            if v.is_graph_output() or any(u.node not in done for u in v.uses()):
                need(v)
    store: list[ir.Value] = []
    guarded: set[ir.Value] = set()
    while pending:
        v = heapq.heappop(pending)[2]
        if v in store or v.producer() in kept:
            continue
        node = v.producer()
        assert node is not None
        big_fill = virtual[v].fill and virtual[v].array.size > p.max_fill_elements
        # IR<4 stores constants as Constant nodes: a ConstantOfShape would become one node for one, only bigger
        legacy_fill = legacy and is_onnx_op(node, "ConstantOfShape")
        # An If condition that only shapes decide stays computed: made constant, onnxruntime would inline
        # the branch at load and re-check its shapes, which lax exported branches (Range fed [1]) fail.
        condition = virtual[v].from_shape and (v in guarded or any(is_onnx_op(u.node, "If") and u.idx == 0 for u in v.uses()))
        if v.is_graph_output() or big_fill or legacy_fill or condition:
            kept.add(node)
            why = "kept_graph_output" if v.is_graph_output() else "kept_if_condition" if condition else "kept_fill"
            stats[why] += 1
            inputs = [i for i in node.inputs if i is not None and i in virtual]
            if condition:
                guarded.update(i for i in inputs if virtual[i].from_shape)
            for i in inputs:
                need(i)
            continue
        store.append(v)
    for v in store:
        node = v.producer()
        if node in kept:
            continue
        new = new_constant(graph, virtual[v].array, v.name or "folded", names, as_node=legacy, before=node)
        v.replace_all_uses_with(new)
        old_name, v.name = v.name, None
        if old_name:
            new.name = old_name
    for node in reversed(folded):
        if node.graph is None:  # a Constant that drop_if_unused already took away
            stats["lifted"] += 1
            continue
        if node in kept or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [i for i in node.inputs if i is not None]
        graph.remove(node, safe=True)
        stats["lifted" if is_onnx_op(node, "Constant") else "folded"] += 1
        for i in inputs:
            drop_if_unused(i)


def _reuse_shape(node: ir.Node, shapes: ShapeValues, seen: dict[tuple, ir.Value], opset: int, names: NameSet, stats: Counter[str]) -> None:
    """Read an earlier value with the same (symbolic) entries, or compute a chain that copies dims of one tensor as one Shape."""
    out = node.outputs[0] if len(node.outputs) == 1 else None
    key = shapes.key(out) if out is not None else None
    if key is None or out.is_graph_output():  # type: ignore[union-attr]
        return
    assert out is not None
    first = seen.setdefault(key, out)
    if first is not out:
        if out.uses():
            out.replace_all_uses_with(first)
            stats["shape_reused"] += 1
        return
    sink = any(u.node.op_type not in SHAPE_OPS or u.node.domain not in ("", "ai.onnx") for u in out.uses())  # else its users get rewritten
    src = shapes.shape_of(out, opset) if not is_onnx_op(node, "Shape") and sink else None
    if src is None:
        return
    x, start, end = src
    attrs = {} if (start, end) == (0, len(x.shape or ())) else {"start": start, "end": end}
    new = ir.node("Shape", [x], attributes=attrs, outputs=[ir.Value(name=names.fresh(out.name or "shape"), type=ir.TensorType(ir.DataType.INT64))])
    node.graph.insert_before(node, new)  # type: ignore[union-attr]
    out.replace_all_uses_with(new.outputs[0])
    shapes.known[new.outputs[0]] = shapes.known[out]
    seen[key] = new.outputs[0]
    stats["shape_rewritten"] += 1


def _try_node(p, model, node, array_of, shapes: ShapeValues, virtual, shared: _SharedConstants, stats) -> list[_Folded] | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op in NEVER:
        return None
    if op == "Constant":
        if not p.lift or shared.legacy:  # IR<4: new constants are Constant nodes too, nothing to lift
            return None
        try:
            tensor = ir.convenience.get_const_tensor(node.outputs[0])
        except Exception:
            tensor = None
        if tensor is None:
            return None
        return [_Folded(tensor.numpy())]
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        stats["skipped_subgraph"] += 1
        return None
    tracked = shapes.known.get(node.outputs[0]) if p.shapes else None
    if tracked is not None and (known := tracked.array()) is not None:
        return [_Folded(known, from_shape=True)]  # the static part of a Shape chain
    if op in ("Shape", "Size") and node.inputs[0] is not None and array_of(node.inputs[0]) is None:
        if op == "Size" and p.shapes and node.inputs[0].shape is not None and node.inputs[0].shape.is_static():
            return [_Folded(np.array(int(np.prod([int(d) for d in node.inputs[0].shape])), dtype=np.int64), from_shape=True)]
        return None
    inputs = [None if v is None else array_of(v) for v in node.inputs]
    if any(a is None for v, a in zip(node.inputs, inputs) if v is not None):
        return None
    if not all(_exchangeable(o) for o in node.outputs) or not all(_exchangeable(v) for v in node.inputs if v is not None):
        stats["skipped_type"] += 1
        return None
    if _half_arithmetic(node, inputs):
        stats["skipped_float16"] += 1
        return None
    # bytes no longer stored once this node folds: single-use real constants and stored-to-be results, not fills
    freed = sum(
        a.nbytes if _single_use(v, node) else shared.credit(v, node)
        for v, a in zip(node.inputs, inputs)
        if v is not None and a is not None and not (v in virtual and virtual[v].fill)
    )
    big_input = max((a.size for a in inputs if a is not None), default=0) > p.max_input_elements
    if big_input and op in HEAVY:
        stats["input_too_large"] += 1
        return None
    if op == "ConstantOfShape":
        shape = [int(d) for d in inputs[0].reshape(-1)]
        if int(np.prod(shape)) > p.max_output_elements:
            stats["output_too_large"] += 1
            return None
    outs = shared.outputs.pop(node, None) or _evaluate(model, node, inputs)
    if outs is None:
        stats["eval_failed"] += 1
        return None
    grows = sum(o.nbytes for o in outs) > freed
    if grows and (big_input or max(o.size for o in outs) > p.max_output_elements):
        stats["input_too_large" if big_input else "output_too_large"] += 1
        return None
    fill = op == "ConstantOfShape" or (op in FILL_KEEPING and node.inputs[0] in virtual and virtual[node.inputs[0]].fill)
    from_shape = any(v in virtual and virtual[v].from_shape for v in node.inputs if v is not None)
    return [_Folded(o, fill=fill, from_shape=from_shape) for o in outs]


class _SharedConstants:
    """Which share of a shared constant each of its readers frees: all readers move data (no arithmetic,
    no subgraph), read only constants, live in the constant's graph and are not graph outputs, so all of
    them fold together and the constant goes; each is credited the part of its bytes proportional to its
    own result. The readers are evaluated once here, and their results handed to the fold itself."""

    def __init__(self, model: ir.Model, array_of, legacy: bool) -> None:
        self.model, self.array_of, self.legacy = model, array_of, legacy
        self.outputs: dict[ir.Node, list[np.ndarray]] = {}
        self._credits: dict[ir.Value, dict[ir.Node, int]] = {}

    def credit(self, v: ir.Value, node: ir.Node) -> int:
        if v not in self._credits:
            self._credits[v] = self._share(v)
        return self._credits[v].get(node, 0)

    def _share(self, v: ir.Value) -> dict[ir.Node, int]:
        readers = {u.node for u in v.uses()}
        if v.is_graph_output() or v.is_graph_input() or not all(self._movable(r, v.graph) for r in readers):
            return {}
        results = {r: _evaluate(self.model, r, [None if i is None else self.array_of(i) for i in r.inputs]) for r in readers}
        if any(outs is None for outs in results.values()):
            return {}
        self.outputs.update(results)  # type: ignore[arg-type]
        sizes = {r: sum(o.nbytes for o in outs) for r, outs in results.items()}  # type: ignore[union-attr]
        total = self.array_of(v).nbytes  # type: ignore[union-attr]
        return {r: total * size // max(sum(sizes.values()), 1) for r, size in sizes.items()}

    def _movable(self, node: ir.Node, graph: ir.Graph | None) -> bool:
        return (
            node.graph is graph
            and node.domain in ("", "ai.onnx")
            and node.op_type in MOVES
            and not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
            and all(i is None or (_exchangeable(i) and self.array_of(i) is not None) for i in node.inputs)
            and all(_exchangeable(o) and not o.is_graph_output() for o in node.outputs)
        )


def _half_arithmetic(node: ir.Node, inputs: list[np.ndarray | None]) -> bool:
    """float16 arithmetic: onnxruntime's CPU computes it in float32 behind inserted Casts, and drops the
    Casts between two such nodes, so one node evaluated alone rounds where the graph does not."""
    halves = any(a is not None and a.dtype == np.float16 for a in inputs) or any(o.dtype == ir.DataType.FLOAT16 for o in node.outputs)
    if not halves or node.op_type in MOVES:
        return False
    return not (node.op_type == "Cast" and node.outputs[0].dtype != ir.DataType.FLOAT16)  # widening is exact


def _single_use(v: ir.Value, node: ir.Node) -> bool:
    return not v.is_graph_output() and not v.is_graph_input() and all(u.node is node for u in v.uses())


def _exchangeable(v: ir.Value) -> bool:
    return v.name == "" or (isinstance(v.type, ir.TensorType) and v.dtype in _DTYPES)


def _evaluate(model: ir.Model, node: ir.Node, inputs: list[np.ndarray | None]) -> list[np.ndarray] | None:
    """Run ``node`` alone in onnxruntime (CPU, no graph optimization) on the given constant inputs."""
    proto = ir.serde.serialize_node(node)
    in_names = ["" if v is None else f"i{k}" for k, v in enumerate(node.inputs)]
    out_names = ["" if not v.name else f"o{k}" for k, v in enumerate(node.outputs)]
    del proto.input[:], proto.output[:]
    proto.input.extend(in_names)
    proto.output.extend(out_names)
    graph_inputs, feed = [], {}
    for name, v, a in zip(in_names, node.inputs, inputs):
        if v is None or a is None:
            continue
        graph_inputs.append(onnx.helper.make_tensor_value_info(name, v.dtype.value, a.shape))
        feed[name] = a
    outputs = [onnx.helper.make_tensor_value_info(n, v.dtype.value, None) for n, v in zip(out_names, node.outputs) if n]
    graph = onnx.helper.make_graph([proto], "fold", graph_inputs, outputs)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto_model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=max(model.ir_version or 3, 3))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(proto_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        results = session.run([n for n in out_names if n], feed)
    except Exception as e:
        logger.debug("cannot evaluate %s: %s", node.op_type, " ".join(str(e).split())[:200])
        return None
    it = iter(results)
    return [np.asarray(next(it)) if n else np.zeros(0, np.float32) for n in out_names]
