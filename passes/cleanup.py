"""Cleanup that changes no output: dead code, constants as initializers."""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from graphopt.edit import all_graphs, count_nodes
from graphopt.passbase import GraphPass, PassResult, option
from graphopt.registry import register

logger = logging.getLogger(__name__)


@register
@dataclasses.dataclass
class Dce(GraphPass):
    """Remove nodes no graph output needs (also in If/Loop/Scan bodies), unused initializers, functions and opset imports."""

    name = "dce"

    def call(self, model: ir.Model) -> PassResult:
        nodes = count_nodes(model)
        inits = _count_initializers(model)
        functions, opsets = len(model.functions), len(model.opset_imports)
        RemoveUnusedNodesPass()(model)  # main graph, subgraphs, functions; main-graph initializers
        _remove_unused_subgraph_initializers(model)
        RemoveUnusedFunctionsPass()(model)  # a fresh instance: it keeps state between runs
        RemoveUnusedOpsetsPass()(model)
        stats = {
            "nodes": nodes - count_nodes(model),
            "initializers": inits - _count_initializers(model),
            "functions": functions - len(model.functions),
            "opset_imports": opsets - len(model.opset_imports),
        }
        stats = {k: v for k, v in stats.items() if v}
        logger.debug("dce removed %s", stats)
        return PassResult(model, modified=bool(stats), stats=stats)


def _count_initializers(model: ir.Model) -> int:
    return sum(len(g.initializers) for g in all_graphs(model))


def _remove_unused_subgraph_initializers(model: ir.Model) -> None:
    """onnx_ir's pass cleans the main graph's initializers only; bodies of If/Loop/Scan have their own."""
    for graph in all_graphs(model):
        if graph is model.graph:
            continue
        for value in list(graph.initializers.values()):
            if not (value.uses() or value.is_graph_output() or value.is_graph_input()):
                graph.initializers.pop(value.name)


@register
@dataclasses.dataclass
class LiftConstants(GraphPass):
    """Turn Constant nodes holding tensors into initializers, so every pass sees one form of constant weight."""

    name = "lift-constants"
    min_elements: int = option(16, "leave constants with fewer elements as Constant nodes (shapes, scalars)")
    all_forms: bool = option(False, "also lift value_float(s)/value_int(s)/value_string(s) constants, not only tensor ones")

    def call(self, model: ir.Model) -> PassResult:
        if (model.ir_version or 99) < 4:  # IR<4: every initializer must also be a graph input
            return PassResult(model, modified=False, stats={"skipped_ir_version": 1})
        before = count_nodes(model)
        LiftConstantsToInitializersPass(lift_all_constants=self.all_forms, size_limit=self.min_elements)(model)
        lifted = before - count_nodes(model)
        return PassResult(model, modified=bool(lifted), stats={"lifted": lifted} if lifted else {})
