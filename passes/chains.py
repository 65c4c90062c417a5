"""Merge a chain of two reshaping ops into one: Unsqueeze∘Unsqueeze, Reshape∘Reshape.

Torch writes ``x.unsqueeze(1).unsqueeze(2).unsqueeze(3)`` as three Unsqueeze nodes; one Unsqueeze
with all the axes gives the same tensor (only 1-sized dimensions are inserted, elements don't move).
``Reshape(Reshape(x, s1), s2)`` is ``Reshape(x, s2)`` (a reshape keeps the element order and count)
unless ``s2`` copies a dimension of the middle tensor (a 0 entry with allowzero=0): then it stays.
The inner node must feed only the outer one. Bit-exact: the elements never change.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from graphopt.edit import NameSet, drop_if_unused, onnx_opset
from graphopt.passbase import GraphPass, PassResult
from graphopt.passes._util import const_array, ints_input_or_attr, is_std, legacy_constants, new_constant, rank, rewrite_each
from graphopt.registry import register

logger = logging.getLogger(__name__)


@register
@dataclasses.dataclass
class MergeReshapes(GraphPass):
    """Merge Unsqueeze(Unsqueeze(x)) into one Unsqueeze and Reshape(Reshape(x, s1), s2) into Reshape(x, s2)."""

    name = "merge-reshapes"

    def call(self, model: ir.Model) -> PassResult:
        legacy, names, opset = legacy_constants(model), NameSet(model), onnx_opset(model)
        rewrites = {"Unsqueeze": lambda n: _unsqueeze(n, legacy, opset, names), "Reshape": lambda n: _reshape(n, legacy)}
        return rewrite_each(model, rewrites, done=("merged_unsqueeze", "merged_reshape"), quiet=("no_chain",))


def _inner(node: ir.Node, op: str) -> ir.Node | None:
    x = node.inputs[0]
    inner = x.producer() if x is not None else None
    if inner is None or not is_std(inner, op) or inner.graph is not node.graph:
        return None
    if len(x.uses()) != 1 or x.is_graph_output():  # type: ignore[union-attr]
        return None
    return inner


def _unsqueeze(node: ir.Node, legacy: bool, opset: int, names: NameSet) -> str:
    inner = _inner(node, "Unsqueeze")
    if inner is None:
        return "no_chain"
    a_in = ints_input_or_attr(inner, 1, "axes", legacy)
    a_out = ints_input_or_attr(node, 1, "axes", legacy)
    if a_in is None or a_out is None:
        return "axes_not_constant"
    r = rank(inner.inputs[0])
    if any(a < 0 for a in a_in + a_out) and r is None:
        return "rank_unknown"
    mid = (r or 0) + len(a_in)
    a_in = sorted(a % mid if a < 0 else a for a in a_in)
    final = mid + len(a_out)
    a_out = sorted(a % final if a < 0 else a for a in a_out)
    # the positions the outer Unsqueeze keeps are the middle tensor's dims, in order
    kept = [p for p in range(max(a_in, default=0) + len(a_out) + 1) if p not in a_out]
    axes = sorted(a_out + [kept[a] for a in a_in])
    x = inner.inputs[0]
    graph = node.graph
    assert graph is not None and x is not None
    if opset >= 13:
        old = node.inputs[1]
        node.replace_input_with(1, new_constant(graph, np.array(axes, dtype=np.int64), (old.name if old is not None else None) or "axes", names, as_node=legacy, before=node))
        if old is not None:
            drop_if_unused(old)
    else:
        node.attributes["axes"] = ir.AttrInt64s("axes", axes)
    node.replace_input_with(0, x)
    _drop(inner)
    return "merged_unsqueeze"


def _reshape(node: ir.Node, legacy: bool) -> str:
    inner = _inner(node, "Reshape")
    if inner is None:
        return "no_chain"
    target = const_array(node.inputs[1], legacy) if len(node.inputs) > 1 else None
    if target is None:
        if node.inputs[1] is None:
            return "no_chain"
        # a computed target: only without zeros can it not read the middle tensor, and that is unknown
        return "target_not_constant" if not node.attributes.get_int("allowzero", 0) else _rewire(node, inner)
    if not node.attributes.get_int("allowzero", 0) and (target == 0).any():
        return "copies_middle_dim"
    return _rewire(node, inner)


def _rewire(node: ir.Node, inner: ir.Node) -> str:
    node.replace_input_with(0, inner.inputs[0])
    _drop(inner)
    return "merged_reshape"


def _drop(inner: ir.Node) -> None:
    inputs = [v for v in inner.inputs if v is not None]
    inner.graph.remove(inner, safe=True)  # type: ignore[union-attr]
    for v in inputs:
        drop_if_unused(v)
