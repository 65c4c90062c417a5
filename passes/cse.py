"""Common subexpression elimination: a node that repeats an earlier one (same op, attributes and inputs) goes.

Exporters recompute the same ``Shape(x)``, ``Gather(·, 0)`` and ``Unsqueeze`` in every layer, and
write one Constant per use. Two deterministic ONNX nodes reading the same values with the same
attributes compute the same outputs, so the later one's users read the earlier one's outputs:
bit-exact by construction. Small constant inputs (up to ``max_constant_elements``) compare by value
(dtype, shape and bytes), so ``Gather(s, c1)`` and ``Gather(s, c2)`` with two equal constants match.

Left alone: random ops (and Dropout, which may train), nodes with subgraphs, other domains (their
determinism is unknown), and a node whose output is a graph output when the earlier one's is too
(both names must survive). Runs in If/Loop/Scan bodies too; a body node is only matched within its
own graph.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Hashable

import onnx_ir as ir

from graphopt.edit import bypass, drop_if_unused
from graphopt.passbase import GraphPass, PassResult, option
from graphopt.passes._util import const_array, legacy_constants
from graphopt.registry import register

logger = logging.getLogger(__name__)

RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"})
"""Two of these draw different numbers (Dropout may be in training mode)."""


@register
@dataclasses.dataclass
class Cse(GraphPass):
    """Merge nodes that repeat an earlier node (same op, attributes and inputs, small constants compared by value)."""

    name = "cse"
    max_constant_elements: int = option(64, "constant inputs up to this many elements compare by value; bigger ones by identity")

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        legacy = legacy_constants(model)
        for graph in list(model.graphs()):
            self._graph(graph, legacy, stats)
        stats = Counter({k: v for k, v in stats.items() if v})
        logger.debug("%s: %s", self.name, dict(stats))
        return PassResult(model, modified=stats["merged"] > 0, stats=dict(stats))

    def _graph(self, graph: ir.Graph, legacy: bool, stats: Counter[str]) -> None:
        seen: dict[Hashable, ir.Node] = {}
        consts: dict[ir.Value, Hashable] = {}

        def input_key(v: ir.Value | None) -> Hashable:
            if v is None:
                return None
            if v not in consts:
                a = const_array(v, legacy)
                small = a is not None and a.size <= self.max_constant_elements and a.dtype != object
                consts[v] = ("c", str(a.dtype), a.shape, a.tobytes()) if small else ("v", id(v))  # type: ignore[union-attr]
            return consts[v]

        for node in list(graph):
            key = _node_key(node, input_key, self.max_constant_elements)
            if key is None:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            if not _merge(node, first):
                stats["kept_graph_output"] += 1
                continue
            inputs = [v for v in node.inputs if v is not None]
            graph.remove(node, safe=True)
            for v in inputs:
                drop_if_unused(v)
            stats["merged"] += 1
            stats[f"merged_{node.op_type}"] += 1


def _node_key(node: ir.Node, input_key, max_elements: int) -> Hashable | None:
    if node.domain not in ("", "ai.onnx") or node.op_type in RANDOM or not node.outputs:
        return None
    attrs = []
    for name, attr in sorted(node.attributes.items()):
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return None
        value = attr.value
        if attr.type == ir.AttributeType.TENSOR:
            if value.size > max_elements:
                return None
            a = value.numpy()
            value = (str(a.dtype), a.shape, a.tobytes())
        elif attr.type in (ir.AttributeType.TENSORS, ir.AttributeType.SPARSE_TENSOR, ir.AttributeType.SPARSE_TENSORS, ir.AttributeType.TYPE_PROTOS):
            return None
        elif isinstance(value, (list, tuple)):
            value = tuple(value)
        attrs.append((name, attr.type, value))
    if node.op_type == "Constant":
        return None  # fold-constants lifts them; equal initializers are matched by value as inputs
    outputs = tuple(o.name == "" for o in node.outputs)  # same op, inputs and attributes: same types
    return (node.op_type, node.overload, outputs, tuple(input_key(v) for v in node.inputs), tuple(attrs))


def _merge(node: ir.Node, first: ir.Node) -> bool:
    """Point the users of ``node``'s outputs at ``first``'s; False when a graph output name can't survive."""
    pairs = list(zip(node.outputs, first.outputs))
    if any(o.is_graph_output() and f.is_graph_output() for o, f in pairs):
        return False
    for o, f in pairs:
        if o.is_graph_output():
            if not bypass(node, o.index(), f):
                return False
        else:
            o.replace_all_uses_with(f)
    return True
