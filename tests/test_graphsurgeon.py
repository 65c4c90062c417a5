"""The graphsurgeon adapter: a user's gs function runs as a verified pass."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest

import graphopt
from graphopt.errors import VerificationError
from graphopt.graphsurgeon import GraphSurgeonPass

from conftest import MODELS


def drop_dropout(graph: gs.Graph) -> None:
    for node in [n for n in graph.nodes if n.op == "Dropout"]:
        source, out = node.inputs[0], node.outputs[0]
        for consumer in list(out.outputs):
            consumer.inputs[consumer.inputs.index(out)] = source
        node.outputs.clear()
    graph.cleanup()


def negate_output(graph: gs.Graph) -> None:
    (out,) = graph.outputs
    producer = out.inputs[0]
    hidden = gs.Variable("pre_negate", dtype=out.dtype)
    producer.outputs = [hidden]
    graph.nodes.append(gs.Node("Neg", inputs=[hidden], outputs=[out]))
    graph.toposort()


def test_lossless_gs_function_is_verified() -> None:
    model, report = graphopt.optimize(str(MODELS / "digits_cnn.onnx"), [GraphSurgeonPass(drop_dropout, name="drop-dropout")])
    (record,) = report.records
    # graphsurgeon's own round trip also turns the two Constant nodes into initializers
    assert record.verdict == "ok" and record.after.nodes == record.before.nodes - 3
    assert "Dropout" not in {n.op_type for n in model.graph}
    assert record.to_json()["options"] == {"fn": "drop_dropout"}


def test_gs_function_that_changes_outputs_is_caught() -> None:
    with pytest.raises(VerificationError, match="pass 'negate'"):
        graphopt.optimize(str(MODELS / "digits_cnn.onnx"), [GraphSurgeonPass(negate_output, name="negate")])


def test_gs_round_trip_alone_is_bit_exact() -> None:
    _, report = graphopt.optimize(str(MODELS / "digits_cnn.onnx"), [GraphSurgeonPass(lambda g: None, name="noop")])
    (record,) = report.records
    assert record.verdict in ("ok", "unchanged") and record.to_json()["bit_exact"] in (True, None)
