"""prune-structured: shapes really shrink, every follower is rewritten, unsafe groups are left whole.

Most models here have "dead" channels (zero weights, zero bias and BatchNorm scale), which every
score ranks last: removing exactly those must reproduce the original outputs to float noise, so a
wrong index anywhere (BN parameters, input rows of the next layer, Flatten blocks, Concat offsets)
shows up as a numeric failure, not just a shape one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.edit import constant_array
from graphopt.passbase import Calibration
from graphopt.passes.prune_structured import CHANNELS_KEY, PruneStructured
from graphopt.report import ModelStats
from tests.conftest import MODELS, assert_valid, feeds, outputs

RNG = np.random.default_rng(0)
F = 1  # TensorProto.FLOAT


def build(nodes: list, inputs: dict, outputs_: dict, inits: dict, opset: int = 17) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, F, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, F, v) for k, v in outputs_.items()],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8))


def conv_w(cout: int, cin: int, k: int = 3, dead: tuple[int, ...] = ()) -> np.ndarray:
    w = RNG.standard_normal((cout, cin, k, k)).astype(np.float32)
    w[list(dead)] = 0
    return w


def vec(n: int, dead: tuple[int, ...] = (), low: float = -1.0) -> np.ndarray:
    v = RNG.uniform(low, 1.0, n).astype(np.float32)
    v[list(dead)] = 0
    return v


def node_named(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def shape_of(model: ir.Model, node: str, index: int = 1) -> tuple[int, ...]:
    array = constant_array(node_named(model, node).inputs[index])
    assert array is not None
    return array.shape


def check_same(model: ir.Model, reference: list, data: list) -> None:
    for level in ("exact", "deploy"):
        got = outputs(model, data, level)
        for name in reference[0]:
            np.testing.assert_allclose(got[0][name], reference[0][name], rtol=1e-4, atol=1e-4)


def prune(model: ir.Model, data: list | None = None, **options: object) -> graphopt.passbase.PassResult:
    p = PruneStructured(channel_multiple=1, **options)  # type: ignore[arg-type]
    p.calibration = Calibration(tuple(data)) if data else None
    return p(model)


DEAD = (1, 5, 9, 14)  # 4 of 16 channels: ratio 0.25


def conv_bn_model() -> ir.Model:
    """Conv -> BN -> Relu -> MaxPool -> Conv -> Relu -> Flatten -> Gemm: a conv net in miniature."""
    inits = {
        "w1": conv_w(16, 3, dead=DEAD), "b1": vec(16, DEAD),
        "s": vec(16, DEAD, 0.5), "bb": vec(16, DEAD), "m": vec(16), "v": vec(16, low=0.5) + 0.5,
        "w2": conv_w(8, 16), "b2": vec(8), "wf": RNG.standard_normal((5, 8 * 4 * 4)), "bf": vec(5),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    return build(nodes, {"x": ["N", 3, 8, 8]}, {"y": ["N", 5]}, inits)


def test_conv_bn_chain_shrinks_for_real_and_keeps_outputs() -> None:
    model = conv_bn_model()
    data = feeds(model)
    reference = outputs(model, data)
    params = ModelStats.of(model).params
    result = prune(model, ratio=0.25, include=["conv1"])
    assert result.modified and result.stats["groups_pruned"] == 1 and result.stats["channels_removed"] == 4
    assert shape_of(model, "conv1") == (12, 3, 3, 3) and shape_of(model, "conv1", 2) == (12,)
    assert all(shape_of(model, "bn1", i) == (12,) for i in range(1, 5))  # the following BatchNorm shrinks too
    assert shape_of(model, "conv2") == (8, 12, 3, 3)  # and the next layer's input channels
    assert ModelStats.of(model).params == params - result.stats["params_removed"] and result.stats["params_removed"] == 4 * (27 + 1 + 4 + 72)
    assert node_named(model, "conv1").metadata_props[CHANNELS_KEY] == "16"
    assert_valid(model)
    check_same(model, reference, data)
    assert not prune(model, ratio=0.25, include=["conv1"]).modified  # same ratio again: at target


def test_flatten_into_gemm_drops_whole_blocks() -> None:
    model = conv_bn_model()
    w2 = conv_w(8, 16, dead=(2, 6))
    node_named(model, "conv2").replace_input_with(1, ir.Value(name="w2d", const_value=ir.tensor(w2), type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(w2.shape)))
    model.graph.register_initializer(node_named(model, "conv2").inputs[1])
    b2 = constant_array(model.graph.initializers["b2"]).copy()
    b2[[2, 6]] = 0
    model.graph.initializers["b2"].const_value = ir.tensor(b2)
    data = feeds(model)
    reference = outputs(model, data)
    result = prune(model, ratio=0.25, include=["conv2"])
    assert result.stats["groups_pruned"] == 1
    assert shape_of(model, "conv2") == (6, 16, 3, 3) and shape_of(model, "fc") == (5, 6 * 16)  # 2 channels x 16 positions gone
    assert_valid(model)
    check_same(model, reference, data)


def gemm_chain() -> ir.Model:
    """fc1 neurons 0-3 are constant (zero weights, positive bias): removable exactly, but only with compensation."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((16, 12)).astype(np.float32)
    w1[:4] = 0
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Dropout", ["r"], ["d"]),
        helper.make_node("Gemm", ["d", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = {"w1": w1, "b1": rng.uniform(0.5, 1.0, 16), "w2": rng.standard_normal((3, 16)), "b2": rng.standard_normal(3)}
    return build(nodes, {"x": ["N", 12]}, {"y": ["N", 3]}, inits)


def test_data_score_and_compensation_on_a_gemm_chain() -> None:
    model = gemm_chain()
    data = feeds(model, samples=4)
    reference = outputs(model, data)
    result = prune(model, data, ratio=0.25)
    assert result.stats["compensated"] == 1 and result.layers[0]["score"] == "data"
    assert shape_of(model, "fc1") == (12, 12) and shape_of(model, "fc2") == (3, 12)
    check_same(model, reference, data)

    plain = gemm_chain()
    prune(plain, data, ratio=0.25, compensate=False)
    assert shape_of(plain, "fc2") == (3, 12)
    assert not np.allclose(outputs(plain, data)[0]["y"], reference[0]["y"], atol=1e-2)  # same channels gone, no bias fix: off
    no_data = prune(gemm_chain(), ratio=0.25)
    assert no_data.stats["no_calibration"] == 1 and no_data.layers[0]["score"] == "l2"


def test_residual_add_group_prunes_all_branches_alike() -> None:
    dead = (0, 3)
    inits = {"wa": conv_w(8, 4, dead=dead), "ba": vec(8, dead), "wb": conv_w(8, 4, dead=dead), "bb": vec(8, dead), "wc": conv_w(2, 8)}
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Conv", ["r", "wc"], ["y"], name="conv_c"),
    ]
    model = build(nodes, {"x": ["N", 4, 6, 6]}, {"y": ["N", 2, 4, 4]}, inits)
    data = feeds(model)
    reference = outputs(model, data)
    result = prune(model, ratio=0.25, min_channels=1)
    assert result.stats["groups_pruned"] == 1 and result.layers[0]["layer"] == "conv_a,conv_b"
    assert shape_of(model, "conv_a") == shape_of(model, "conv_b") == (6, 4, 3, 3) and shape_of(model, "conv_c") == (2, 6, 3, 3)
    assert_valid(model)
    check_same(model, reference, data)


def test_residual_with_the_block_input_is_left_whole() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "x"], ["s"]),  # identity shortcut: x's channels can't go
        helper.make_node("Conv", ["s", "w2"], ["y"], name="conv2"),
    ]
    model = build(nodes, {"x": ["N", 8, 5, 5]}, {"y": ["N", 8, 3, 3]}, {"w": conv_w(8, 8), "b": vec(8), "w2": conv_w(8, 8)})
    result = prune(model, ratio=0.25, min_channels=1)
    assert not result.modified and result.stats["skipped_branch_not_prunable"] == 1
    assert result.stats["skipped_graph_output"] == 1  # conv2 feeds the graph output


def test_depthwise_conv_passes_channels_through() -> None:
    dead = (2, 5)
    inits = {"w1": conv_w(8, 3, dead=dead), "b1": vec(8, dead), "dw": conv_w(8, 1, dead=dead), "db": vec(8, dead), "w3": conv_w(4, 8, k=1)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
        helper.make_node("Conv", ["r1", "dw", "db"], ["c2"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w3"], ["y"], name="pw"),
    ]
    inits |= {"lo": np.array(0.0), "hi": np.array(6.0)}
    model = build(nodes, {"x": ["N", 3, 6, 6]}, {"y": ["N", 4, 6, 6]}, inits)
    data = feeds(model)
    reference = outputs(model, data)
    result = prune(model, ratio=0.25, min_channels=1)
    assert result.stats["groups_pruned"] == 1  # conv1; the depthwise conv follows it, pw is the graph output
    dw = node_named(model, "dw")
    assert shape_of(model, "dw") == (6, 1, 3, 3) and shape_of(model, "dw", 2) == (6,) and dw.attributes["group"].value == 6
    assert shape_of(model, "pw") == (4, 6, 1, 1)
    assert_valid(model)
    check_same(model, reference, data)


def test_grouped_conv_is_skipped_with_a_reason() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Conv", ["c1", "wg"], ["c2"], name="grouped", group=2),
        helper.make_node("Relu", ["c2"], ["y"]),
    ]
    model = build(nodes, {"x": ["N", 4, 5, 5]}, {"y": ["N", 8, 5, 5]}, {"w1": conv_w(8, 4, k=1), "wg": conv_w(8, 4, k=1)})
    result = prune(model, ratio=0.25, min_channels=1)
    assert not result.modified
    assert result.stats == {"skipped_grouped_conv": 2}  # as a producer, and as conv1's consumer


def test_concat_along_channels_maps_each_branch() -> None:
    inits = {"wa": conv_w(8, 3, k=1, dead=(1, 6)), "ba": vec(8, (1, 6)), "wb": conv_w(8, 3, k=1, dead=(0, 4)), "bb": vec(8, (0, 4)), "wc": conv_w(2, 16, k=1)}
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b"),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "wc"], ["y"], name="conv_c"),
    ]
    model = build(nodes, {"x": ["N", 3, 4, 4]}, {"y": ["N", 2, 4, 4]}, inits)
    data = feeds(model)
    reference = outputs(model, data)
    result = prune(model, ratio=0.25, min_channels=1)
    assert result.stats["groups_pruned"] == 2  # two independent groups
    assert shape_of(model, "conv_c") == (2, 12, 1, 1)
    assert_valid(model)
    check_same(model, reference, data)


def test_reshape_with_a_written_out_size_is_rewritten() -> None:
    dead = (0, 7)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "wm"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "bm"], ["y"]),
    ]
    model = build(nodes, {"x": [2, 3, 3, 3]}, {"y": [2, 4]}, {"w": conv_w(8, 3, k=1, dead=dead), "b": vec(8, dead), "wm": RNG.standard_normal((72, 4)), "bm": vec(4)})
    shape = ir.Value(name="shape", const_value=ir.tensor(np.array([2, 72], np.int64)), type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2]))
    model.graph.register_initializer(shape)
    next(n for n in model.graph if n.op_type == "Reshape").replace_input_with(1, shape)
    data = feeds(model)
    reference = outputs(model, data)
    result = prune(model, ratio=0.25, min_channels=1)
    assert result.modified
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert constant_array(reshape.inputs[1]).tolist() == [2, 54] and shape_of(model, "fc") == (54, 4)
    assert_valid(model)
    check_same(model, reference, data)


def test_shared_weight_and_subgraph_use_are_left_alone() -> None:
    shared = build(
        [helper.make_node("Gemm", ["x", "w"], ["h"], name="a"), helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Gemm", ["r", "w"], ["y"], name="b")],
        {"x": ["N", 16]},
        {"y": ["N", 16]},
        {"w": RNG.standard_normal((16, 16))},
    )
    result = prune(shared, ratio=0.25)
    assert not result.modified and result.stats["skipped_shared_weight"] == 2

    then = helper.make_graph([helper.make_node("Relu", ["h"], ["t"])], "then", [], [helper.make_tensor_value_info("t", F, None)])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [], [helper.make_tensor_value_info("e", F, None)])
    captured = build(
        [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1), helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other), helper.make_node("Gemm", ["z", "w2"], ["y"], name="out")],
        {"x": ["N", 16]},
        {"y": ["N", 4]},
        {"w": RNG.standard_normal((16, 16)), "w2": RNG.standard_normal((16, 4))},
    )
    cond = ir.Value(name="cond", const_value=ir.tensor(np.array(True)), type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    captured.graph.register_initializer(cond)
    next(n for n in captured.graph if n.op_type == "If").replace_input_with(0, cond)
    result = prune(captured, ratio=0.25)
    assert not result.modified and result.stats["skipped_used_in_subgraph"] == 1


@pytest.mark.parametrize(("name", "reason"), [("digits_cnn", "graph_output"), ("digits_mlp_wide", "graph_output"), ("digits_skl_mlp", "consumer_Softmax")])
def test_trained_models_get_smaller_within_budget(name: str, reason: str) -> None:
    npz = MODELS / f"{name}_test.npz"
    model, report = graphopt.optimize(MODELS / f"{name}.onnx", "prune-structured{ratio=0.25}", inputs=npz)
    record = report.records[0]
    assert record.verdict == "ok" and record.after.params < 0.8 * record.before.params
    assert record.stats[f"skipped_{reason}"] == 1  # the classifier keeps its 10 outputs
    assert_valid(model)
    again, report2 = graphopt.optimize(model, "prune-structured{ratio=0.25}", inputs=npz)
    assert not report2.records[0].modified
