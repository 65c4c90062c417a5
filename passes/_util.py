"""Helpers the cleanup passes share: what counts as a constant, static shapes, output replacement."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from graphopt.edit import NameSet, add_initializer, bypass, constant_tensor, drop_if_unused, is_onnx_op, replace_keeping_name
from graphopt.io import EXTERNAL_THRESHOLD, tensor_bytes
from graphopt.passbase import PassResult

logger = logging.getLogger(__name__)


def legacy_constants(model: ir.Model) -> bool:
    """True when initializers listed as graph inputs are constants anyway.

    Before IR version 4 every initializer had to be listed as a graph input; onnxruntime treats
    them as constants there (it refuses a feed for them), so the values can't change at run time.
    The inputs stay in the signature; only their values are read.
    """
    return (model.ir_version or 99) < 4


def const_tensor(value: ir.Value | None, legacy: bool) -> ir.TensorProtocol | None:
    """``graphopt.edit.constant_tensor``, plus initializer-inputs of IR<4 models when ``legacy``."""
    tensor = constant_tensor(value)
    if tensor is None and legacy and value is not None and value.is_graph_input() and value.is_initializer():
        return value.const_value
    return tensor


def const_array(value: ir.Value | None, legacy: bool) -> np.ndarray | None:
    tensor = const_tensor(value, legacy)
    return None if tensor is None else tensor.numpy()


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape as ints when every dimension is known."""
    if value is None or value.shape is None or not value.shape.is_static():
        return None
    return tuple(int(d) for d in value.shape)


def rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def scalar_flag(value: ir.Value | None, legacy: bool) -> bool | None:
    """A constant scalar input read as a bool; None when it is not a constant."""
    array = const_array(value, legacy)
    if array is None or array.size != 1:
        return None
    return bool(array.reshape(()).item())


def ints_input_or_attr(node: ir.Node, index: int, attr: str, legacy: bool) -> list[int] | None:
    """An ints operand that moved from an attribute to an input across opsets (axes, pads)."""
    if (a := node.attributes.get(attr)) is not None:
        return [int(x) for x in a.as_ints()]
    if len(node.inputs) > index and node.inputs[index] is not None:
        array = const_array(node.inputs[index], legacy)
        return None if array is None else [int(x) for x in array.reshape(-1)]
    return None


def to_identity(node: ir.Node, data: ir.Value) -> None:
    """Replace single-output ``node`` by ``Identity(data)`` writing to the same output name."""
    graph = node.graph
    assert graph is not None
    identity = ir.node("Identity", [data])
    graph.insert_after(node, identity)
    for out in node.outputs[1:]:
        assert not out.uses() and not out.is_graph_output()
    replace_keeping_name(node.outputs[0], identity.outputs[0])
    graph.remove(node, safe=True)


def is_std(node: ir.Node, op: str | tuple[str, ...]) -> bool:
    return is_onnx_op(node, op)


def new_constant(graph: ir.Graph, array: np.ndarray, base: str, names: NameSet, *, as_node: bool, before: ir.Node | None = None) -> ir.Value:
    """A new constant value: an initializer, or (IR<4 models, whose initializers must all be graph
    inputs) the output of a new Constant node placed before ``before`` (or first in the graph)."""
    if not as_node:
        return add_initializer(graph, array, base, names)
    tensor = ir.tensor(np.require(array, requirements="C"))  # not ascontiguousarray: it turns 0-d into 1-d
    out = ir.Value(name=names.fresh(base), type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape))
    node = ir.node("Constant", [], {"value": tensor}, outputs=[out])
    anchor = before if before is not None else next(iter(graph), None)
    if anchor is None:
        graph.append(node)
    else:
        graph.insert_before(anchor, node)
    return out


def replace_input(node: ir.Node, index: int, array: np.ndarray, names: NameSet, *, as_node: bool) -> ir.Value:
    """``graphopt.edit.replace_weight`` that also works for IR<4 models (see :func:`new_constant`);
    appends the input when ``node`` has fewer than ``index + 1``."""
    graph = node.graph
    assert graph is not None
    old = node.inputs[index] if len(node.inputs) > index else None
    base = old.name if old is not None and old.name else (f"{node.name or node.op_type}_in{index}")
    new = new_constant(graph, array, base, names, as_node=as_node, before=node)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)
    if old is not None:
        drop_if_unused(old)
    return new


def const_or_fill(value: ir.Value | None, legacy: bool, max_fill: int) -> np.ndarray | None:
    """:func:`const_array`, or the tensor a ``ConstantOfShape`` of a constant shape fills (up to ``max_fill`` elements)."""
    array = const_array(value, legacy)
    if array is not None or value is None:
        return array
    node = value.producer()
    if node is None or not is_onnx_op(node, "ConstantOfShape") or not node.inputs or node.inputs[0] is None:
        return None
    shape = const_array(node.inputs[0], legacy)
    if shape is None or int(np.prod(shape)) > max_fill:
        return None
    attr = node.attributes.get("value")
    fill = attr.as_tensor().numpy().reshape(-1)[0] if attr is not None else np.float32(0)
    return np.full([int(d) for d in shape.reshape(-1)], fill, dtype=np.asarray(fill).dtype)


@contextlib.contextmanager
def inferred_shapes(model: ir.Model) -> Iterator[None]:
    """Shapes and types from onnx's shape inference while a pass runs, the model's own ones after.

    Inferred ``value_info`` left in a model changes what onnxruntime's fusions do at its default
    level (seq_transformer ran 35% slower with it, 5% faster without) and can contradict what a
    runtime accepts (an If branch output inferred as int64[1] feeding Range, which wants a scalar), so
    it is a help to the pass, not part of its output. The model's own inputs and outputs keep theirs.
    """
    saved = {v: (v.shape, v.type) for graph in model.graphs() for node in graph for v in node.outputs}
    if tensor_bytes(model) < EXTERNAL_THRESHOLD:
        try:
            ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        except Exception as e:  # a help, never a requirement
            logger.debug("shape inference failed: %s", e)
    try:
        yield
    finally:
        signature = {*model.graph.inputs, *model.graph.outputs}  # subgraph outputs too get their own back
        for v, (shape, type_) in saved.items():
            if v not in signature:
                v.shape, v.type = shape, type_


def operand_from(node: ir.Node, ops: str | tuple[str, ...]) -> tuple[ir.Node, ir.Value, ir.Value | None] | None:
    """For a binary ``node`` (Add, Mul): the standard-domain producer of one of ``ops`` that feeds
    it from the same graph, the value it feeds, and the other operand; None when neither side is one."""
    for side in (0, 1):
        value, other = node.inputs[side], node.inputs[1 - side]
        producer = value.producer() if value is not None else None
        if producer is not None and is_onnx_op(producer, ops) and producer.graph is node.graph:
            return producer, value, other  # type: ignore[return-value]
    return None


def sole_use(value: ir.Value) -> bool:
    """One reader and not a graph output: a rewrite may absorb the node that reads it."""
    return len(value.uses()) == 1 and not value.is_graph_output()


def absorb(node: ir.Node, kept: ir.Value, other: ir.Value | None) -> bool:
    """Remove binary ``node`` whose effect now lives in ``kept``'s producer: its readers read ``kept``
    (graph-output names kept), and ``other`` goes if nothing else reads it. False if the name can't be kept."""
    if not bypass(node, 0, kept):
        return False
    node.graph.remove(node, safe=True)  # type: ignore[union-attr]
    if other is not None:
        drop_if_unused(other)
    return True


def rewrite_each(model: ir.Model, ops: dict[str, Callable[[ir.Node], str]], *, done: tuple[str, ...], quiet: tuple[str, ...] = ()) -> PassResult:
    """The loop of the local-rewrite passes: call ``ops[op_type]`` on every standard-domain node of
    those types (subgraphs too; nodes an earlier rewrite removed are skipped) and count what each
    call returns. The model is modified when any call returned one of ``done``; ``quiet`` outcomes
    (the common "not my pattern") are left out of the stats."""
    stats: Counter[str] = Counter()
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        rewrite = ops.get(node.op_type)
        if rewrite is not None and node.graph is not None and is_onnx_op(node, node.op_type):
            stats[rewrite(node)] += 1
    logger.debug("%s", dict(stats))
    return PassResult(model, modified=any(stats[d] for d in done), stats={k: v for k, v in stats.items() if v and k not in quiet})


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """A Conv's kernel, strides, dilations, explicit pads and groups for one input size."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begins then ends, as the ONNX attribute
    group: int


def conv_geometry(node: ir.Node, x_shape: Sequence[int], w_shape: Sequence[int]) -> ConvGeometry:
    """The Conv's attributes resolved for an input of ``x_shape`` (``auto_pad`` turned into pads)."""
    kernel = tuple(int(d) for d in w_shape[2:])
    nd = len(kernel)
    a = node.attributes
    strides = tuple(a.get_ints("strides", None) or [1] * nd)
    dilations = tuple(a.get_ints("dilations", None) or [1] * nd)
    auto = a.get_string("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(x_shape[2:], kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        pads = tuple(begins + ends)
    elif auto == "VALID":
        pads = (0,) * (2 * nd)
    else:
        pads = tuple(a.get_ints("pads", None) or [0] * (2 * nd))
    return ConvGeometry(kernel, strides, dilations, pads, a.get_int("group", 1))


def conv_out_size(geo: ConvGeometry, spatial: Sequence[int]) -> tuple[int, ...]:
    nd = len(geo.kernel)
    return tuple(
        (spatial[i] + geo.pads[i] + geo.pads[nd + i] - geo.dilations[i] * (geo.kernel[i] - 1) - 1) // geo.strides[i] + 1 for i in range(nd)
    )


def tap_windows(geo: ConvGeometry, out: Sequence[int]) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """Each kernel tap and the spatial slices of the padded input it reads at the ``out`` output positions."""
    for tap in np.ndindex(*geo.kernel):
        yield tap, tuple(slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in zip(tap, geo.dilations, out, geo.strides))
