"""Run your own onnx-graphsurgeon function as a verified pass.

    import onnx_graphsurgeon as gs
    from graphopt.graphsurgeon import GraphSurgeonPass

    def drop_debug_outputs(graph: gs.Graph) -> None:
        graph.outputs = [o for o in graph.outputs if not o.name.startswith("debug")]
        graph.cleanup()

    model, report = graphopt.optimize("m.onnx", [GraphSurgeonPass(fn, name="my-edit", lossless=True)])

The function gets a ``gs.Graph`` imported from the current model and edits it in place (or returns a
new one); the result is exported back. Verification and the report treat it like any other pass,
including its budget: ``lossless=True`` holds it to bit-exact outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_graphsurgeon as gs
import onnx_ir as ir

from graphopt.metrics import Tolerance
from graphopt.passbase import GraphPass, PassResult


class GraphSurgeonPass(GraphPass):
    """Adapter: a user's graphsurgeon function as a pass (Python API only; not in the registry)."""

    def __init__(self, fn: Callable[[gs.Graph], Any], *, name: str = "graphsurgeon", lossless: bool = True, tolerance: Tolerance | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.name = name  # type: ignore[misc]  # instance-level: each adapter names itself
        self.lossless = lossless  # type: ignore[misc]
        self.tolerance = tolerance or (Tolerance.exact() if lossless else Tolerance(min_sqnr_db=30.0))  # type: ignore[misc]

    def options(self, *, full: bool = False) -> dict[str, Any]:
        return {"fn": getattr(self.fn, "__qualname__", repr(self.fn))}

    def call(self, model: ir.Model) -> PassResult:
        before = ir.to_proto(model)
        graph = gs.import_onnx(before)
        returned = self.fn(graph)
        exported = gs.export_onnx(returned if isinstance(returned, gs.Graph) else graph)
        exported.ir_version = before.ir_version
        del exported.opset_import[:]
        exported.opset_import.extend(before.opset_import)
        exported.functions.extend(f for f in before.functions if f not in exported.functions)
        modified = exported.graph.SerializeToString(deterministic=True) != before.graph.SerializeToString(deterministic=True)
        if modified:
            new = ir.from_proto(exported)
            model.graph = new.graph  # type: ignore[misc]
        return PassResult(model, modified=modified)
