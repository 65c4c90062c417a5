"""quantize-static: the QDQ layout ORT fuses, numbers at both levels, calibration methods, searches, negatives."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, assert_valid, from_text, outputs
from test_quantize_weights import _model, _optimized_ops

from graphopt.edit import constant_array, onnx_opset
from graphopt.metrics import compare_outputs
from graphopt.passbase import Calibration
from graphopt.passes.quantize_static import QuantizeStatic


def _data(name: str, n: int = 96) -> list[dict[str, np.ndarray]]:
    with np.load(MODELS / f"{name}_test.npz") as npz:
        return [{"input": npz["input"][:n]}]


def _run(p: QuantizeStatic, model: ir.Model, data: list) -> object:
    p.calibration = Calibration(tuple(data))
    return p(model)


def _sqnr(model: ir.Model, data: list, reference: list, level: str) -> float:
    return min(e.sqnr_db for e in compare_outputs(reference, outputs(model, data, level)) if e.output != "label")


@pytest.mark.parametrize(
    ("name", "fused"),
    [("digits_cnn", {"QLinearConv": 2, "QGemm": 2}), ("digits_mlp_wide", {"QGemm": 4}), ("digits_skl_mlp", {"QGemm": 3})],
)
def test_trained_models_fuse_into_integer_kernels(name: str, fused: dict[str, int]) -> None:
    model = ir.load(MODELS / f"{name}.onnx")
    data = _data(name)
    reference = outputs(model, data)
    result = _run(QuantizeStatic(), model, data)
    assert result.modified and result.stats["quantized_nodes"] == sum(fused.values())
    assert_valid(model)
    assert onnx_opset(model) >= 13
    ops = collections.Counter(_optimized_ops(model))
    for op, count in fused.items():
        assert ops[op] == count, ops
    assert ops["DequantizeLinear"] == 0 and ops["Conv"] == ops["Gemm"] == ops["MatMul"] == 0, ops  # nothing left to dequantize at run time
    for level in ("exact", "deploy"):
        assert _sqnr(model, data, reference, level) >= 35.0
    assert not _run(QuantizeStatic(), model, data).modified  # idempotent: a QDQ model is left alone


def test_cnn_layout_weights_bias_and_relu() -> None:
    model = ir.load(MODELS / "digits_cnn.onnx")
    data = _data("digits_cnn", 32)
    result = _run(QuantizeStatic(), model, data)
    assert result.stats["folded_batchnorm"] == 2 and result.stats["relu_absorbed"] == 3
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["Relu"] == 0 and ops["BatchNormalization"] == 0
    for conv in (n for n in model.graph if n.op_type in ("Conv", "Gemm")):
        w_dq, b_dq = conv.inputs[1].producer(), conv.inputs[2].producer()
        assert w_dq.op_type == b_dq.op_type == "DequantizeLinear"
        assert constant_array(w_dq.inputs[0]).dtype == np.int8 and constant_array(b_dq.inputs[0]).dtype == np.int32
        axis = 0 if conv.op_type == "Conv" or conv.attributes.get_int("transB", 0) else 1
        assert w_dq.attributes.get_int("axis") == axis
        x_scale = constant_array(conv.inputs[0].producer().inputs[1])
        assert np.allclose(constant_array(b_dq.inputs[1]), x_scale * constant_array(w_dq.inputs[1]))  # s_b = s_x * s_w
    # a Relu's Q starts at 0: uint8 zero point 0, so saturation does the Relu
    zps = [constant_array(n.inputs[2]) for n in model.graph if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.uint8 for z in zps) and sum(int(z) == 0 for z in zps) >= 3


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_calibration_methods_run_at_both_levels(method: str) -> None:
    model = ir.load(MODELS / "digits_mlp_wide.onnx")
    data = _data("digits_mlp_wide", 64)
    reference = outputs(model, data)
    assert _run(QuantizeStatic(calibrate=method), model, data).modified
    assert_valid(model)
    floor = 15.0 if method == "entropy" else 35.0
    for level in ("exact", "deploy"):
        assert _sqnr(model, data, reference, level) >= floor


def test_int8_activations_and_per_tensor() -> None:
    model = ir.load(MODELS / "digits_cnn.onnx")
    data = _data("digits_cnn", 32)
    reference = outputs(model, data)
    assert _run(QuantizeStatic(activation_type="int8", per_channel=False), model, data).modified
    q = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert all(constant_array(n.inputs[2]).dtype == np.int8 for n in q)
    weights = [n for n in model.graph if n.op_type == "DequantizeLinear" and constant_array(n.inputs[0]) is not None and constant_array(n.inputs[0]).dtype == np.int8]
    assert len(weights) == 4 and all(constant_array(n.inputs[1]).ndim == 0 for n in weights)
    assert "QLinearConv" in _optimized_ops(model)
    assert _sqnr(model, data, reference, "deploy") >= 30.0


def test_add_mul_concat_and_pools_are_quantized() -> None:
    model = from_text("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4,8,8] x, float[1,4,8,8] z) => (float[1,8] y) {
        a = Add(x, z)  m = Mul(a, z)  c = Concat<axis=1>(a, m)  p = AveragePool<kernel_shape=[2,2], strides=[2,2]>(c)
        g = GlobalAveragePool(p)  y = Flatten(g) }""")
    data = [{"x": np.random.default_rng(i).standard_normal((1, 4, 8, 8)).astype(np.float32), "z": np.random.default_rng(9 + i).random((1, 4, 8, 8)).astype(np.float32)} for i in range(4)]
    reference = outputs(model, data)
    result = _run(QuantizeStatic(), model, data)
    assert result.stats["quantized_nodes"] == 5
    ops = collections.Counter(_optimized_ops(model))
    for op in ("QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool"):
        assert ops[op] == 1, ops
    assert _sqnr(model, data, reference, "deploy") >= 25.0


def test_matmul_fuses_and_constant_bias_add_is_folded_into_gemm() -> None:
    model = _model("MatMul", k=64, n=32)
    data = [{"x": np.random.default_rng(i).standard_normal((2, 64)).astype(np.float32)} for i in range(4)]
    reference = outputs(model, data)
    assert _run(QuantizeStatic(), model, data).modified
    assert "MatMulIntegerToFloat" in _optimized_ops(model)  # float output: the graph output stays float
    assert _sqnr(model, data, reference, "deploy") >= 30.0


def test_opset11_model_is_upgraded() -> None:
    model = _model("Conv", opset=11)
    data = [{"x": np.random.default_rng(i).standard_normal((1, 8, 6, 6)).astype(np.float32)} for i in range(4)]
    reference = outputs(model, data)
    result = _run(QuantizeStatic(), model, data)
    assert result.stats["opset_upgraded_to"] == 13 and onnx_opset(model) == 13
    assert_valid(model)
    assert _sqnr(model, data, reference, "deploy") >= 25.0


def test_exclude_and_sensitivity_keep_layers_float() -> None:
    model = ir.load(MODELS / "digits_cnn.onnx")
    data = _data("digits_cnn", 48)
    excluded = model.clone()
    result = _run(QuantizeStatic(exclude=["Gemm"]), excluded, data)
    assert result.stats["excluded"] == 2 and result.stats["quantized_nodes"] == 2
    assert collections.Counter(n.op_type for n in excluded.graph)["Gemm"] == 2
    sens = model.clone()
    reference = outputs(model, data)
    result = _run(QuantizeStatic(target_sqnr=60.0), sens, data)
    float_layers = [r for r in result.layers if r["choice"] == "float"]
    assert float_layers and all(r["reason"].startswith("sensitivity") for r in float_layers)
    assert all("alone_sqnr_db" in r for r in result.layers)
    assert result.stats["kept_float_sensitivity"] == len(float_layers)
    assert_valid(sens)
    assert _sqnr(sens, data, reference, "deploy") >= 42.0  # better than all-int8 (about 43 dB on these samples)


def test_excluded_layer_keeps_its_relu() -> None:
    model = ir.load(MODELS / "digits_skl_mlp.onnx")
    data = _data("digits_skl_mlp", 128)
    reference = outputs(model, data)
    result = _run(QuantizeStatic(exclude=["MatMul1"]), model, data)  # the float layer reads the Relu before it
    assert result.stats["excluded"] == 1 and "relu_absorbed" not in result.stats
    assert collections.Counter(n.op_type for n in model.graph)["Relu"] == 2
    assert _sqnr(model, data, reference, "deploy") >= 35.0


def test_latency_aware_reports_each_layer() -> None:
    model = ir.load(MODELS / "digits_mlp_wide.onnx")
    data = _data("digits_mlp_wide", 16)
    reference = outputs(model, data)
    result = _run(QuantizeStatic(latency_aware=True), model, data)
    assert len(result.layers) == 4
    for r in result.layers:
        assert r["float_ms"] > 0 and r["int8_ms"] > 0
        if result.stats.get("latency_choice_mixed"):
            assert r["choice"] == ("float" if r["int8_ms"] >= r["float_ms"] else "int8")
    choice = next(k for k in result.stats if k.startswith("latency_choice_"))
    for c in ("float", "int8"):  # the whole model timed as float and as all-int8 too
        assert result.stats[f"latency_us_{c}"] > 0
    if choice == "latency_choice_float":
        assert result.stats.get("quantized_nodes", 0) == 0 and not any(n.op_type == "QuantizeLinear" for n in model.graph)
    assert_valid(model)
    assert _sqnr(model, data, reference, "deploy") >= 35.0


def test_leaves_alone_quantized_and_float_free_models() -> None:
    done = _model("MatMul")
    from graphopt.passes.quantize_weights import QuantizeWeights

    QuantizeWeights()(done)
    result = _run(QuantizeStatic(), done, [{"x": np.ones((2, 64), np.float32)}])
    assert not result.modified and result.stats == {"already_quantized": 1}
    ints = from_text("""<ir_version: 8, opset_import: ["" : 17]> g (int64[4] x) => (int64[4] y) { y = Add(x, x) }""")
    assert not _run(QuantizeStatic(), ints, [{"x": np.arange(4)}]).modified


def test_generated_calibration_when_none() -> None:
    model = _model("Gemm", transB=1)
    result = QuantizeStatic()(model)
    assert result.modified and result.stats["generated_calibration"] == 8
    onnx.checker.check_model(ir.to_proto(model), full_check=True)



def _relu6_model(lo: float, hi: float, rng: np.random.Generator) -> ir.Model:
    w1, w2 = (",".join(f"{v:.3f}" for v in rng.standard_normal(n)) for n in (72, 144))
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2, 6, 6] x) => (float[N, 4, 6, 6] y)
    <float[4, 2, 3, 3] w = {{{w1}}}, float[4] b = {{0.5, -0.5, 0.1, 0}}, float lo = {{{lo}}}, float hi = {{{hi}}}, float[4, 4, 3, 3] w2 = {{{w2}}}> {{
        c = Conv<pads = [1, 1, 1, 1]>(x, w, b)
        r = Clip(c, lo, hi)
        y = Conv<pads = [1, 1, 1, 1]>(r, w2)
    }}"""
    return ir.from_proto(onnx.parser.parse_model(text))


@pytest.mark.parametrize(("lo", "hi", "absorbed"), [(0.0, 6.0, True), (-1.0, 1.0, True), (1.0, 5.0, False)], ids=["relu6", "around-zero", "excludes-zero"])
def test_clip_with_bounds_around_zero_is_absorbed(lo: float, hi: float, absorbed: bool) -> None:
    """The Q after the conv saturates where the Clip would (its range lies within the bounds and
    includes 0); a Clip whose range excludes 0 stays."""
    rng = np.random.default_rng(0)
    model = _relu6_model(lo, hi, rng)
    data = [{"x": rng.standard_normal((2, 2, 6, 6)).astype(np.float32) * 3} for _ in range(2)]
    reference = outputs(model, data)
    q = QuantizeStatic(search=False)
    q.calibration = Calibration(tuple(data))
    result = q(model)
    assert_valid(model)
    assert ("Clip" not in [n.op_type for n in model.graph]) is absorbed
    assert result.stats.get("relu_absorbed", 0) == (1 if absorbed else 0)
    assert compare_outputs(reference, outputs(model, data, "deploy"))[0].sqnr_db > 25


def _decoder_model() -> ir.Model:
    """Conv -> ConvTranspose (upsampling) -> Concat with the skip -> Conv, and an LSTM over the rows: ops
    with (Conv) and without (ConvTranspose, LSTM) an int8 kernel in onnxruntime's CPU provider."""
    rng = np.random.default_rng(5)
    h, T = onnx.helper, onnx.TensorProto

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    nodes = [
        h.make_node("Conv", ["x", "w1"], ["a"], name="down", strides=[2, 2], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["a"], ["r"]),
        h.make_node("ConvTranspose", ["r", "wt"], ["u"], name="up", strides=[2, 2]),
        h.make_node("Concat", ["u", "x"], ["c"], axis=1),
        h.make_node("Conv", ["c", "w2"], ["y"], name="head", pads=[1, 1, 1, 1]),
        h.make_node("Reshape", ["y", "shape"], ["seq"]),
        h.make_node("LSTM", ["seq", "W", "R"], ["z"], name="rnn", hidden_size=16),
    ]
    inits = [weight("w1", 16, 8, 3, 3), weight("wt", 16, 8, 2, 2), weight("w2", 8, 16, 3, 3), weight("W", 1, 64, 64), weight("R", 1, 64, 16),
             onnx.numpy_helper.from_array(np.array([-1, 1, 64], np.int64), "shape")]  # fmt: skip
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 8, 8, 8])], [h.make_tensor_value_info("z", T.FLOAT, [8, 1, 1, 16])], inits)
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def test_ops_without_int8_kernels_get_weight_only_int8() -> None:
    """The ConvTranspose weight (per output channel: axis 1) becomes int8 through DequantizeLinear, the
    LSTM a DynamicQuantizeLSTM (weight-only W/R per gate row with ``dynamic-lstm=false``); the convs
    still fuse into QLinearConv; ``weight-only=[]`` and ``dynamic-lstm=false`` keep them float."""
    data = [{"x": np.random.default_rng(k).standard_normal((1, 8, 8, 8)).astype(np.float32)} for k in range(8)]
    reference = outputs(_decoder_model(), data)
    for dynamic in (True, False):
        model = _decoder_model()
        result = _run(QuantizeStatic(dynamic_lstm=dynamic), model, data)
        assert result.stats["weight_only"] == (1 if dynamic else 3) and result.stats.get("dynamic_lstms", 0) == int(dynamic), result.stats
        assert sorted(r["op"] for r in result.layers if r["choice"].startswith("int8 ") and r["op"] != "Conv") == ["ConvTranspose", "LSTM", "LSTM"][: 2 if dynamic else 3]
        assert_valid(model)
        nodes = {n.name: n for n in model.graph}
        up = nodes["up"].inputs[1].producer()
        assert up.op_type == "DequantizeLinear" and up.attributes.get_int("axis") == 1 and constant_array(up.inputs[0]).dtype == np.int8
        if dynamic:
            assert "rnn" not in nodes and [n.op_type for n in model.graph].count("DynamicQuantizeLSTM") == 1
        else:
            rnn = nodes["rnn"].inputs[1].producer()
            assert rnn.op_type == "DequantizeLinear" and constant_array(rnn.inputs[0]).dtype == np.int8
        assert collections.Counter(_optimized_ops(model))["QLinearConv"] == 2
        for level in ("exact", "deploy"):
            assert _sqnr(model, data, reference, level) >= 25.0
    kept = _decoder_model()
    stats = _run(QuantizeStatic(weight_only=[], dynamic_lstm=False), kept, data).stats
    assert "weight_only" not in stats and "dynamic_lstms" not in stats
    assert all(n.inputs[1].const_value is not None for n in kept.graph if n.op_type in ("ConvTranspose", "LSTM"))


def test_embedding_table_is_int8_and_gathered_before_converting() -> None:
    """Gather(table, ids) -> MatMul: the table becomes int8 with a scale per row, read as
    Gather(int8) -> Cast -> Mul(gathered scales) (no conversion of the whole table per run); the
    MatMul is still quantized statically; ``gather=false`` keeps the table float."""
    rng = np.random.default_rng(7)
    h, T = onnx.helper, onnx.TensorProto
    table = onnx.numpy_helper.from_array((rng.standard_normal((500, 64)) * rng.uniform(0.1, 3, (500, 1))).astype(np.float32), "table")
    w = onnx.numpy_helper.from_array((rng.standard_normal((64, 32)) / 8).astype(np.float32), "w")
    nodes = [h.make_node("Gather", ["table", "ids"], ["e"], name="embed"), h.make_node("MatMul", ["e", "w"], ["m"], name="proj"), h.make_node("Relu", ["m"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("ids", T.INT64, [4, 6])], [h.make_tensor_value_info("y", T.FLOAT, [4, 6, 32])], [table, w])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    data = [{"ids": rng.integers(0, 500, (4, 6)).astype(np.int64)} for _ in range(6)]
    reference = outputs(ir.from_proto(proto), data)
    model = ir.from_proto(proto)
    result = _run(QuantizeStatic(), model, data)
    assert result.stats["gather_weight_only"] == 1 and next(r for r in result.layers if r["name"] == "proj")["choice"] == "int8", result.stats
    assert_valid(model)
    rows = next(n for n in model.graph if n.op_type == "Gather" and constant_array(n.inputs[0]).ndim == 2 and constant_array(n.inputs[0]).shape[1] == 64)
    assert constant_array(rows.inputs[0]).dtype == np.int8 and not any(n.op_type == "DequantizeLinear" and constant_array(n.inputs[0]) is not None and constant_array(n.inputs[0]).shape == (500, 64) for n in model.graph)
    assert next(r for r in result.layers if r["op"] == "Gather")["scales"] == "per-row"
    for level in ("exact", "deploy"):
        assert _sqnr(model, data, reference, level) >= 30.0
    kept = ir.from_proto(proto)
    assert "gather_weight_only" not in _run(QuantizeStatic(gather=False), kept, data).stats
    assert constant_array(next(n for n in kept.graph if n.op_type == "Gather").inputs[0]).dtype == np.float32


def test_model_with_only_an_lstm_still_gets_it_quantized() -> None:
    """No op for a Q/DQ pair at all: the LSTM still becomes a DynamicQuantizeLSTM."""
    rng = np.random.default_rng(9)
    h, T = onnx.helper, onnx.TensorProto
    inits = [onnx.numpy_helper.from_array((rng.standard_normal((1, 128, 24)) / 5).astype(np.float32), "W"),
             onnx.numpy_helper.from_array((rng.standard_normal((1, 128, 32)) / 6).astype(np.float32), "R")]  # fmt: skip
    graph = h.make_graph([h.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=32)], "g", [h.make_tensor_value_info("x", T.FLOAT, [5, 2, 24])],
                         [h.make_tensor_value_info("y", T.FLOAT, [5, 1, 2, 32])], inits)  # fmt: skip
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    data = [{"x": rng.standard_normal((5, 2, 24)).astype(np.float32)} for _ in range(4)]
    reference = outputs(model, data)
    result = _run(QuantizeStatic(), model, data)
    assert result.modified and result.stats["dynamic_lstms"] == 1 and [n.op_type for n in model.graph] == ["DynamicQuantizeLSTM"], result.stats
    assert_valid(model)
    assert _sqnr(model, data, reference, "deploy") >= 30.0
