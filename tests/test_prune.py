"""prune-magnitude and prune-nm: which weights go, what is never touched, schedules, idempotence."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.edit import constant_array
from graphopt.passbase import Calibration
from graphopt.passes.prune import PruneMagnitude, PruneNm
from graphopt.pipeline import format_pipeline, parse_pipeline
from tests.conftest import MODELS, assert_valid, feeds, outputs

RNG = np.random.default_rng(0)


def mlp(k: int = 64, n: int = 32, out: int = 8, opset: int = 17) -> ir.Model:
    """x[B,k] -> MatMul W1 -> Add b1 -> Relu -> Gemm(W2ᵀ, b2): two prunable weights and their biases."""
    w1 = RNG.standard_normal((k, n)).astype(np.float32)
    w2 = RNG.standard_normal((out, n)).astype(np.float32)
    inits = [numpy_helper.from_array(a, name) for a, name in ((w1, "w1"), (RNG.standard_normal(n).astype(np.float32), "b1"), (w2, "w2"), (RNG.standard_normal(out).astype(np.float32), "b2"))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", 1, ["B", k])], [helper.make_tensor_value_info("y", 1, ["B", out])], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8))


def weight(model: ir.Model, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in model.graph if n.name == node_name)
    array = constant_array(node.inputs[index])
    assert array is not None
    return array


def test_magnitude_layer_scope_zeros_the_smallest_and_only_weights() -> None:
    model = mlp()
    w1, b1, w2 = weight(model, "fc1"), constant_array(model.graph.initializers["b1"]), weight(model, "fc2")
    data = feeds(model)
    result = PruneMagnitude(sparsity=0.5, min_size=0)(model)
    assert result.modified and result.stats["pruned_layers"] == 2
    assert_valid(model)
    for name, before in (("fc1", w1), ("fc2", w2)):
        after = weight(model, name)
        assert np.mean(after == 0) == 0.5
        cut = np.sort(np.abs(before).ravel())[before.size // 2 - 1]
        np.testing.assert_array_equal(after, np.where(np.abs(before) <= cut, 0, before))  # the smallest half, values untouched
    np.testing.assert_array_equal(constant_array(model.graph.initializers["b1"]), b1)  # bias left alone
    reference = np.maximum(data[0]["x"] @ weight(model, "fc1") + b1, 0) @ weight(model, "fc2").T + weight(model, "fc2", 2)
    np.testing.assert_allclose(outputs(model, data)[0]["y"], reference, rtol=1e-4, atol=1e-4)
    assert {r["layer"] for r in result.layers} == {"fc1", "fc2"} and all(r["sparsity"] == 0.5 for r in result.layers)
    assert not PruneMagnitude(sparsity=0.5, min_size=0)(model).modified  # idempotent at the same target


def test_threshold_global_and_output_scopes() -> None:
    model = mlp()
    w1 = weight(model, "fc1")
    assert PruneMagnitude(threshold=0.5, min_size=0)(model).modified
    np.testing.assert_array_equal(weight(model, "fc1"), np.where(np.abs(w1) < 0.5, 0, w1))
    assert not PruneMagnitude(threshold=0.5, min_size=0)(model).modified

    model = mlp()
    a0, b0 = weight(model, "fc1"), weight(model, "fc2")
    PruneMagnitude(sparsity=0.6, scope="global", min_size=0)(model)
    a, b = weight(model, "fc1"), weight(model, "fc2")
    assert (np.sum(a == 0) + np.sum(b == 0)) == round(0.6 * (a.size + b.size))
    survivors = np.concatenate([np.abs(a[a != 0]), np.abs(b[b != 0])])
    dropped = np.concatenate([np.abs(a0[a == 0]), np.abs(b0[b == 0])])
    assert survivors.min() >= dropped.max()  # one threshold for all layers
    assert abs(np.mean(a == 0) - np.mean(b == 0)) > 0.01  # ...so the layers end up unequally sparse

    model = mlp()
    PruneMagnitude(sparsity=0.25, scope="output", min_size=0)(model)
    assert set(np.sum(weight(model, "fc1") == 0, axis=0)) == {16}  # every output column of W1[64, 32] loses 16
    assert set(np.sum(weight(model, "fc2") == 0, axis=1)) == {8}  # Gemm transB: outputs are rows of W2[8, 32]


def test_wanda_keeps_weights_of_loud_inputs() -> None:
    model = mlp()
    data = feeds(model, samples=4)
    for sample in data:
        sample["x"][:, :4] *= 100.0  # four input features carry almost all the signal
    p = PruneMagnitude(sparsity=0.5, score="wanda", min_size=0, include=["fc1"])
    p.calibration = Calibration(tuple(data))
    result = p(model)
    w1 = weight(model, "fc1")
    assert result.stats["pruned_layers"] == 1 and result.layers[0]["score"] == "wanda"
    assert np.all(w1[:4] != 0)  # |w|·‖x‖ keeps every weight of the loud features
    assert np.sum(w1[4:] == 0) == w1.size // 2
    no_data = PruneMagnitude(sparsity=0.5, score="wanda", min_size=0)
    assert no_data(mlp()).stats["no_calibration"] == 1  # falls back to magnitude, and says so


def test_conv_wanda_uses_patch_norms() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[1,2,6,6] x) => (float[1,4,6,6] y)
        <float[4,2,3,3] w = {1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1}>
        { y = Conv<pads=[1,1,1,1]>(x, w) }"""
    model = ir.from_onnx_text(text)
    x = np.ones((1, 2, 6, 6), np.float32)
    x[:, 1] = 0.01  # channel 1 is quiet: all of its weights go first
    p = PruneMagnitude(sparsity=0.5, score="wanda", min_size=0)
    p.calibration = Calibration(({"x": x},))
    p(model)
    w = constant_array(model.graph[0].inputs[1])
    assert np.all(w[:, 1] == 0) and np.all(w[:, 0] != 0)


def test_what_is_never_touched() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (int64[3] ids, float[2,3,4,4] img, float[3,64] v) => (float[3,64] e, float[2,3,4,4] b, float[3,64] t) {
        e = Gather(table, ids)
        t = MatMul(v, tied)
        b = BatchNormalization(img, s, bb, m, var)
    }"""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(1)
    for name, shape in (("table", (40, 64)), ("tied", (64, 64)), ("s", (3,)), ("bb", (3,)), ("m", (3,)), ("var", (3,))):
        proto.graph.initializer.append(numpy_helper.from_array(rng.random(shape).astype(np.float32) + 0.1, name))
    proto.graph.node.append(helper.make_node("Gather", ["tied", "ids"], ["e2"]))  # tied weight: also an embedding
    proto.graph.output.append(helper.make_tensor_value_info("e2", 1, [3, 64]))
    model = ir.from_proto(proto)
    result = PruneMagnitude(sparsity=0.5, min_size=0)(model)
    assert not result.modified
    assert result.stats == {"skipped_embedding": 1}  # norms and the plain table are not layers at all
    asked = PruneMagnitude(sparsity=0.5, min_size=0, embeddings=True)(model)
    assert asked.stats["pruned_layers"] == 2  # the table, and the tied weight once for both of its users
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    tied_gather = next(n for n in model.graph if n.op_type == "Gather" and n.outputs[0].name == "e2")
    assert matmul.inputs[1] is tied_gather.inputs[0] and np.mean(constant_array(matmul.inputs[1]) == 0) == 0.5
    assert all(np.all(constant_array(model.graph.initializers[n]) > 0) for n in ("s", "bb", "m", "var"))
    assert_valid(model)


def test_shared_weight_between_layers_is_pruned_once() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[2,32] a, float[2,32] b) => (float[2,32] y, float[2,32] z) { y = MatMul(a, w)  z = MatMul(b, w) }"""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(numpy_helper.from_array(RNG.standard_normal((32, 32)).astype(np.float32), "w"))
    model = ir.from_proto(proto)
    result = PruneMagnitude(sparsity=0.5, min_size=0)(model)
    assert result.stats["pruned_layers"] == 1
    first, second = (n.inputs[1] for n in model.graph)
    assert first is second and len(model.graph.initializers) == 1  # one new tensor, read by both
    assert_valid(model)


def test_include_exclude_min_size_and_option_errors() -> None:
    assert PruneMagnitude(sparsity=0.5, include=["fc2"], min_size=0)(mlp()).stats["pruned_layers"] == 1
    assert PruneMagnitude(sparsity=0.5, exclude=["w*"], min_size=0)(mlp()).stats == {"skipped_excluded": 2}
    assert PruneMagnitude(sparsity=0.5, min_size=10_000)(mlp()).stats == {"skipped_small": 2}
    for bad in ("prune-magnitude{sparsity=1.5}", "prune-magnitude{sparsity=0.5,threshold=0.1}", "prune-magnitude{threshold=0.1,score=wanda}", "prune-nm{n=4,m=4}"):
        with pytest.raises(graphopt.errors.PipelineError):
            parse_pipeline(bad)
    for text in ("prune-magnitude{sparsity=0.3,score=wanda,scope=global,exclude=['fc*']}", "prune-nm{n=1,m=4}"):
        assert parse_pipeline(format_pipeline(parse_pipeline(text))) == parse_pipeline(text)


def test_nm_2_4_along_the_reduction_axis() -> None:
    model = mlp()
    result = PruneNm(min_size=0)(model)
    assert result.modified and all(r["conforming"] == 1.0 and r["pattern"] == "2:4" for r in result.layers)
    w1, w2 = weight(model, "fc1"), weight(model, "fc2")
    assert np.all(np.sum(w1.reshape(16, 4, 32) != 0, axis=1) == 2)  # W1[K=64, N]: groups of 4 along K (axis 0)
    assert np.all(np.sum(w2.reshape(8, 8, 4) != 0, axis=2) == 2)  # Gemm transB: W2[N, K]: along axis 1
    assert_valid(model)
    assert not PruneNm(min_size=0)(model).modified


def test_nm_conv_groups_input_channels_and_skips_indivisible() -> None:
    conv = ir.from_onnx_text(
        """<ir_version: 8, opset_import: ["" : 17]> g (float[1,8,5,5] x, float[1,6,5,5] u) => (float[1,4,3,3] y, float[1,4,3,3] z) {
        y = Conv(x, w)  z = Conv(u, v) }"""
    )
    for name, shape in (("w", (4, 8, 3, 3)), ("v", (4, 6, 3, 3))):
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(RNG.standard_normal(shape).astype(np.float32)))
        conv.graph.register_initializer(value)
    for node, name in zip(conv.graph, "wv"):
        node.replace_input_with(1, conv.graph.initializers[name])
    result = PruneNm(min_size=0)(conv)
    assert result.stats["pruned_layers"] == 1 and result.stats["skipped_not_divisible"] == 1
    w = constant_array(conv.graph[0].inputs[1])
    assert np.all(np.sum(w.reshape(4, 2, 4, 3, 3) != 0, axis=2) == 2)
    assert_valid(conv)


@pytest.mark.parametrize("name", ["digits_skl_mlp", "digits_cnn"])
def test_schedule_is_verified_step_by_step(name: str) -> None:
    model, report = graphopt.optimize(MODELS / f"{name}.onnx", "prune-magnitude{sparsity=0.3},prune-magnitude{sparsity=0.5},prune-magnitude{sparsity=0.5}", inputs=MODELS / f"{name}_test.npz")
    first, second, third = report.records
    assert first.verdict == second.verdict == "ok" and first.stats["zeroed"] < second.stats["zeroed"] + first.stats["zeroed"]
    assert not third.modified and third.verdict == "unchanged"  # same target again: nothing to do
    assert all(record.deploy and record.deploy[0].sqnr_db >= PruneMagnitude.tolerance.min_sqnr_db for record in (first, second))
    layers = second.layers
    assert layers and all(abs(r["sparsity"] - 0.5) < 1e-3 and r["sparsity_before"] > 0.29 for r in layers)
    assert_valid(model)


def test_recurses_into_subgraphs() -> None:
    then = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"], name="inner")], "then", [], [helper.make_tensor_value_info("t", 1, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", 1, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []), helper.make_tensor_value_info("x", 1, [2, 64])],
        [helper.make_tensor_value_info("y", 1, [2, 64])],
        [numpy_helper.from_array(RNG.standard_normal((64, 64)).astype(np.float32), "w")],  # captured from the outer graph
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    data = [{"c": np.array(True), "x": RNG.standard_normal((2, 64)).astype(np.float32)}]
    assert PruneMagnitude(sparsity=0.5)(model).stats["pruned_layers"] == 1
    assert_valid(model)
    w = constant_array(model.graph.initializers[next(iter(model.graph.initializers))])
    assert np.mean(w == 0) == 0.5
    np.testing.assert_allclose(outputs(model, data)[0]["y"], data[0]["x"] @ w, rtol=1e-5, atol=1e-5)
