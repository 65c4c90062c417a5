"""dce: dead nodes and initializers in the main graph and in If/Loop bodies; everything else kept."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

import graphopt
from graphopt.edit import count_nodes
from graphopt.passes.cleanup import Dce, LiftConstants

from conftest import LIGHT_MODELS, MODELS, assert_valid, feeds, from_text, outputs

DEAD_BRANCH = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y) <float[3] unused = {1, 2, 3}, float[3] b = {1, 1, 1}> {
    a = Relu(x)
    dead1 = Sigmoid(a)
    dead2 = Mul(dead1, dead1)
    y = Add(a, b)
}"""

IF_WITH_DEAD = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, bool c) => (float[2] y) <float[2] outer = {3, 4}> {
    y = If(c) <
        then_branch = t () => (float[2] ty) {
            dead = Neg(outer)
            ty = Add(x, outer)
        },
        else_branch = e () => (float[2] ey) {
            dead2 = Exp(x)
            ey = Sub(x, outer)
        }
    >
}"""

LOOP_WITH_DEAD = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) <int64 n = {3}, bool t = {1}> {
    y = Loop(n, t, x) <
        body = b (int64 i, bool cond, float[2] acc) => (bool cout, float[2] out) {
            cout = Identity(cond)
            unused = Cast<to=1>(i)
            out = Add(acc, x)
        }
    >
}"""

NOTHING_DEAD = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y, float[2] z) {
    y = Relu(x)
    z = Neg(y)
}"""


def _run(text: str) -> tuple[ir.Model, dict[str, int]]:
    model = from_text(text)
    data = feeds(model)
    reference = outputs(model, data)
    result = Dce()(model)
    assert_valid(model)
    for r, g in zip(reference, outputs(model, data)):
        for k in r:
            assert (r[k] == g[k]).all()
    assert not Dce()(model).modified, "second run must change nothing"
    return model, result.stats


def test_dead_branch_and_unused_initializer() -> None:
    model, stats = _run(DEAD_BRANCH)
    assert [n.op_type for n in model.graph] == ["Relu", "Add"]
    assert "unused" not in model.graph.initializers
    assert stats == {"nodes": 2, "initializers": 1}


def test_dead_nodes_inside_if_branches() -> None:
    model, stats = _run(IF_WITH_DEAD)
    branches = [g for g in model.graphs() if g is not model.graph]
    assert sorted(n.op_type for b in branches for n in b) == ["Add", "Sub"]
    assert stats["nodes"] == 2


def test_dead_nodes_inside_loop_body() -> None:
    model, stats = _run(LOOP_WITH_DEAD)
    (body,) = [g for g in model.graphs() if g is not model.graph]
    assert sorted(n.op_type for n in body) == ["Add", "Identity"]
    assert stats["nodes"] == 1


def test_subgraph_initializer_removed() -> None:
    proto = onnx.parser.parse_model(IF_WITH_DEAD)
    then = proto.graph.node[0].attribute[0].g
    then.initializer.append(onnx.numpy_helper.from_array(__import__("numpy").ones(2, "float32"), "sub_unused"))
    model = ir.from_proto(proto)
    assert Dce()(model).stats["initializers"] == 1
    assert all("sub_unused" not in g.initializers for g in model.graphs())


def test_negative_nothing_to_remove() -> None:
    model = from_text(NOTHING_DEAD)
    assert not Dce()(model).modified
    assert count_nodes(model) == 2


def test_unused_function_and_opset_removed() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17, "local" : 1, "com.microsoft" : 1]>
    g (float[2] x) => (float[2] y) { y = Relu(x) }
    <domain: "local", opset_import: ["" : 17]>
    f (a) => (b) { b = Neg(a) }"""
    model = from_text(text)
    stats = Dce()(model).stats
    assert stats["functions"] == 1 and not model.functions
    assert "com.microsoft" not in model.opset_imports


def test_lift_constants_makes_initializers() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 20] x) => (float[2, 20] y) {
        w = Constant<value = float[20] {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20}>()
        small = Constant<value = float[1] {2}>()
        a = Add(x, w)
        y = Mul(a, small)
    }"""
    model = from_text(text)
    assert LiftConstants()(model).stats == {"lifted": 1}
    assert list(model.graph.initializers) == ["w"]
    assert [n.op_type for n in model.graph] == ["Constant", "Add", "Mul"]  # below min-elements stays
    assert not LiftConstants()(model).modified


@pytest.mark.parametrize("path", LIGHT_MODELS + sorted(MODELS.glob("*.onnx")), ids=lambda p: Path(p).stem)
def test_dce_bit_exact_on_real_models(path: Path, tmp_path: Path) -> None:
    npz = path.with_name(path.stem + "_test.npz")
    model, report = graphopt.optimize(str(path), "dce", inputs=str(npz) if npz.exists() else None)
    assert report.verified, [r.violations for r in report.records]
    for record in report.records:
        if record.modified:
            assert record.to_json()["bit_exact"] is True
    out = tmp_path / "out.onnx"
    graphopt.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)


def test_minus_one_dims_are_dynamic() -> None:
    """paddle2onnx writes dim_value -1 for a dynamic batch: generated inputs and --inputs accept any size there."""
    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) { y = Relu(x) }""")
    for v in (proto.graph.input[0], proto.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_value = -1
    model = ir.from_proto(proto)
    _, report = graphopt.optimize(model, "dce", input_shape=[])
    assert report.reference_samples == 2
    import numpy as np

    _, report = graphopt.optimize(model, "dce", inputs={"x": np.ones((5, 3), np.float32)})
    assert report.verification == "on"
