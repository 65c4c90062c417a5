"""Safe graph edits shared by the passes.

The rules (each was a bug in a tool we learned from): graph inputs and outputs keep their names;
a shared initializer is never written into nor its name reused (``ir.Model.clone`` shares tensors,
so writing in place would also corrupt a rollback snapshot); new names come from :class:`NameSet`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

ONNX_DOMAINS = ("", "ai.onnx")


def is_onnx_op(node: ir.Node, op_type: str | tuple[str, ...]) -> bool:
    """True for a standard-domain node of the given type(s)."""
    types_ = (op_type,) if isinstance(op_type, str) else op_type
    return node.domain in ONNX_DOMAINS and node.op_type in types_


def onnx_opset(model_or_graph: ir.Model | ir.Graph) -> int:
    imports = model_or_graph.opset_imports
    return imports.get("", imports.get("ai.onnx", 1))


def all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    yield from model.graphs()


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind ``value`` when it is a constant: an initializer that is not a graph input,
    or the output of a ``Constant`` node. Everything else (including overridable initializers) is None."""
    if value is None:
        return None
    if value.is_graph_input():
        return None
    if value.const_value is not None and (value.is_initializer() or value.producer() is None):
        return value.const_value
    producer = value.producer()
    if producer is not None and is_onnx_op(producer, "Constant"):
        return ir.convenience.get_const_tensor(value)
    return None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()


class NameSet:
    """Every value name in the model (all graphs), handing out fresh ones."""

    def __init__(self, model: ir.Model) -> None:
        self._used: set[str] = set()
        for graph in all_graphs(model):
            self._used.update(v.name for v in graph.inputs if v.name)
            self._used.update(graph.initializers)
            for node in graph:
                self._used.update(v.name for v in node.outputs if v.name)
        for function in model.functions.values():
            for node in function:
                self._used.update(v.name for v in node.outputs if v.name)

    def fresh(self, base: str | None) -> str:
        base = base or "v"
        for i in itertools.count():
            name = base if i == 0 and base not in self._used else f"{base}__{i}"
            if name not in self._used:
                self._used.add(name)
                return name
        raise AssertionError("unreachable")


def add_initializer(graph: ir.Graph, array: np.ndarray | ir.TensorProtocol, base: str, names: NameSet) -> ir.Value:
    """Register a new initializer with a fresh name built from ``base``."""
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(np.require(array, requirements="C"))  # ascontiguousarray makes 0-d 1-d
    name = names.fresh(base)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def replace_weight(node: ir.Node, index: int, array: np.ndarray, names: NameSet) -> ir.Value:
    """Give ``node.inputs[index]`` a new initializer holding ``array``; other users keep the old one."""
    old = node.inputs[index]
    assert old is not None and node.graph is not None
    new = add_initializer(node.graph, array, old.name or "w", names)
    node.replace_input_with(index, new)
    drop_if_unused(old)
    return new


def drop_if_unused(value: ir.Value) -> None:
    """Remove an initializer (or Constant node) nobody uses any more; graph inputs/outputs stay."""
    if value.uses() or value.is_graph_input() or value.is_graph_output():
        return
    if value.is_initializer() and value.graph is not None and value.name in value.graph.initializers:
        value.graph.initializers.pop(value.name)
        return
    producer = value.producer()
    if producer is not None and is_onnx_op(producer, "Constant") and producer.graph is not None:
        producer.graph.remove(producer, safe=True)


def bypass(node: ir.Node, output_index: int, replacement: ir.Value) -> bool:
    """Make every user of ``node.outputs[output_index]`` read ``replacement`` instead.

    When that output is a graph output, the graph output's name must survive: the output value is
    then kept and ``replacement`` is renamed into it only if ``replacement`` is a plain intermediate
    produced by a node (not a graph input, initializer or another graph output). Returns False when
    the node must stay.
    """
    out = node.outputs[output_index]
    graph = node.graph
    assert graph is not None
    if not out.is_graph_output():
        out.replace_all_uses_with(replacement)
        return True
    if replacement.is_graph_input() or replacement.is_graph_output() or replacement.is_initializer() or replacement.producer() is None:
        return False
    if replacement.producer() is not None and replacement.producer().graph is not graph:
        return False  # an outer-scope value: renaming it would change another graph
    replace_keeping_name(out, replacement)
    return True


def replace_keeping_name(old: ir.Value, new: ir.Value) -> None:
    """Point every user of ``old`` (graph outputs too) at ``new``, which takes ``old``'s name, type and shape
    where it has none (a graph output keeps its declared signature).

    ``new`` must be a value nobody else names (a new node's output or a fresh initializer).
    """
    name = old.name
    if new.type is None:
        new.type = old.type
    if new.shape is None:
        new.shape = old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name = name


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def iter_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Initializers of every graph and tensors of Constant nodes: the model's parameters."""
    for graph in all_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if is_onnx_op(node, "Constant") and (attr := node.attributes.get("value")) is not None and attr.type == ir.AttributeType.TENSOR:
            yield attr.as_tensor()
