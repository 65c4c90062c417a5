"""quantize-weights on Conv: im2col Hessians, GPTQ per group (depthwise too), 4-bit scales blocked along input channels."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, assert_valid, calibrated_run, deploy_sqnr, outputs

from graphopt.data import load_npz
from graphopt.edit import constant_array
from graphopt.metrics import compare_outputs
from graphopt.passes import _gptq, _qconv
from graphopt.passes._util import conv_geometry
from graphopt.passes._qmath import expand, qtype, quantize_weight
from graphopt.passes.quantize_weights import QuantizeWeights

RNG = np.random.default_rng(0)


def _conv_model(c: int, o: int, kernel: tuple[int, ...], group: int = 1, hw: tuple[int, int] = (11, 13), batch: int = 2, **attrs: object) -> ir.Model:
    """One Conv (constant weight and bias) whose input channels have uneven scales, as real activations do."""
    h, T = onnx.helper, onnx.TensorProto
    w = RNG.standard_normal((o, c // group, *kernel)).astype(np.float32)
    b = RNG.standard_normal(o).astype(np.float32)
    node = h.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, **attrs)
    graph = h.make_graph(
        [node], "g", [h.make_tensor_value_info("x", T.FLOAT, [batch, c, *hw])], [h.make_tensor_value_info("y", T.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.from_proto(proto)


def _data(model: ir.Model, n: int = 6, seed: int = 1) -> list[dict[str, np.ndarray]]:
    x = model.graph.inputs[0]
    shape = tuple(int(d) for d in x.shape)
    rng = np.random.default_rng(seed)
    gain = np.exp(rng.standard_normal(shape[1])).astype(np.float32).reshape(1, -1, 1, 1)  # per-channel scales over ~e^±2
    out = []
    for _ in range(n):
        x = rng.standard_normal(shape).astype(np.float32)
        x = (x + np.roll(x, 1, axis=2) + np.roll(x, 1, axis=3)) / 3  # neighbouring pixels correlate, as in images
        out.append({"x": (x * gain + 0.3 * gain).astype(np.float32)})
    return out


def _dq(model: ir.Model) -> ir.Node:
    nodes = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(nodes) == 1
    return nodes[0]


CASES = [
    ((4, 6, (3, 3), 2), {"strides": [2, 2], "pads": [1, 2, 0, 1], "dilations": [2, 2]}),
    ((6, 6, (3, 3), 6), {"strides": [2, 1], "pads": [1, 1, 1, 1]}),  # depthwise
    ((6, 6, (5, 3), 6), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((6, 9, (4, 4), 3), {"auto_pad": "SAME_LOWER", "strides": [3, 2]}),
    ((5, 8, (1, 1), 1), {"auto_pad": "VALID"}),
]


@pytest.mark.parametrize(("dims", "attrs"), CASES, ids=["s2-pads-d2-g2", "depthwise", "same-upper", "same-lower-g3", "valid-1x1"])
def test_im2col_rows_times_weight_is_the_conv(dims: tuple, attrs: dict) -> None:
    c, o, kernel, group = dims
    model = _conv_model(c, o, kernel, group, **attrs)
    model.graph.node(0).resize_inputs(2)  # no bias: the product alone
    data = _data(model, n=1)
    y = outputs(model, data)[0]["y"]
    w = constant_array(model.graph.node(0).inputs[1])
    geo = conv_geometry(model.graph.node(0), data[0]["x"].shape, w.shape)
    cols = _qconv.im2col(data[0]["x"], geo)  # [rows, C, P]
    cg, og = c // group, o // group
    got = np.concatenate([cols[:, g * cg : (g + 1) * cg].reshape(len(cols), -1) @ w[g * og : (g + 1) * og].reshape(og, -1).T for g in range(group)], axis=1)
    assert got.shape == (y.shape[0] * y.shape[2] * y.shape[3], o)
    np.testing.assert_allclose(got, y.transpose(0, 2, 3, 1).reshape(-1, o), rtol=1e-4, atol=1e-4)
    # the Hessian over every row (fewer than the limit) is 2 X_g^T X_g / rows, per group
    h = _qconv.conv_hessians([data[0]["x"]], model.graph.node(0), w.shape).full()
    x0 = cols[:, :cg].reshape(len(cols), -1).astype(np.float64)
    assert h.shape == (group, cg * int(np.prod(kernel)), cg * int(np.prod(kernel)))
    np.testing.assert_allclose(h[0], 2 * x0.T @ x0 / len(cols), rtol=1e-4, atol=1e-5)


def test_hessian_rows_are_bounded() -> None:
    model = _conv_model(8, 8, (3, 3), hw=(40, 40), pads=[1, 1, 1, 1])
    acc = _qconv.HessianSum()
    for i, s in enumerate(_data(model, n=3)):
        acc.add(s["x"], model.graph.node(0), (8, 8, 3, 3), limit=500, seed=i)
    assert acc.rows == 1500  # 2 x 40 x 40 positions per sample, 500 sampled from each


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("c", "group", "block"), [(64, 1, 0), (64, 1, 16), (64, 2, 16), (16, 16, 0)], ids=["full-per-channel", "full-blocked", "grouped-blocked", "depthwise"])
def test_conv_gptq_beats_nearest_same_layout(bits: int, c: int, group: int, block: int) -> None:
    model = _conv_model(c, 32 if group != c else c, (3, 3), group, hw=(10, 10), pads=[1, 1, 1, 1])
    node = model.graph.node(0)
    w = constant_array(node.inputs[1])
    calib = _data(model, n=4)
    h = _qconv.conv_hessians([s["x"] for s in calib], node, w.shape).full()
    qt = qtype(bits, True)
    g = _qconv.conv_gptq(w, h, qt, block_size=block, symmetric=True, search=True)
    n = quantize_weight(w, qt, axis=1 if block else 0, block_size=block, symmetric=True, search=True)
    assert (g.axis, g.block_size, g.scale.shape, g.q.dtype) == (n.axis, n.block_size, n.scale.shape, n.q.dtype)
    assert g.q.min() >= qt.qmin and g.q.max() <= qt.qmax
    geo = conv_geometry(node, calib[0]["x"].shape, w.shape)
    cg, og = w.shape[1], w.shape[0] // group
    rows = np.concatenate([_qconv.im2col(s["x"], geo) for s in calib])

    def err(wq: np.ndarray) -> float:
        d = (w - wq).astype(np.float64)
        return sum(float(np.sum((rows[:, k * cg : (k + 1) * cg].reshape(len(rows), -1) @ d[k * og : (k + 1) * og].reshape(og, -1).T) ** 2)) for k in range(group))

    # 9 columns per depthwise channel leave GPTQ less room than 576 of a full conv
    assert err(g.dequantized()) < (0.95 if group == c else 0.8) * err(n.dequantized())


@pytest.mark.parametrize("starts", [None, [0, 8]], ids=["per-row", "blocked"])
def test_stacked_gptq_is_each_problem_alone(starts: list[int] | None) -> None:
    """A grouped Conv's groups go through one stacked column loop: the same integers as one GPTQ
    per group; a group whose Hessian is not positive definite gets plain rounding."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 5, 16))
    x = rng.standard_normal((3, 40, 16)) @ rng.standard_normal((16, 16))
    h = np.einsum("brk,brl->bkl", x, x) / 20
    h[2] = -np.eye(16)  # not positive definite
    qt = qtype(4, True)
    stacked = _gptq.gptq_h(w, h, qt, starts=starts, symmetric=True, search=True)
    for b in range(3):
        alone = _gptq.gptq_h(w[b], h[b], qt, starts=starts, symmetric=True, search=True)
        for got, want in zip(stacked, alone):
            np.testing.assert_array_equal(got[b], want)
    plain = quantize_weight(w[2].astype(np.float32), qt, axis=1 if starts else 0, block_size=8 if starts else 0, symmetric=True, search=True)
    np.testing.assert_array_equal(stacked[0][2], plain.q)


def test_cross_validation_folds() -> None:
    """Samples alternate between the two folds; a lone sample's rows are halved; the full Hessian is their row-weighted mean."""
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal((2, 3, 6)) for _ in range(3)]
    folds = _gptq.FoldedHessian.of_rows(arrays, 6)
    assert folds.rows.tolist() == [12, 6]
    x = np.concatenate([a.reshape(-1, 6) for a in arrays])
    np.testing.assert_allclose(folds.full()[0], 2 * x.T @ x / 18)
    lone = _gptq.FoldedHessian.of_rows([arrays[0]], 6)
    assert lone.rows.tolist() == [3, 3]
    model = _conv_model(4, 4, (3, 3), hw=(6, 6), pads=[1, 1, 1, 1])
    node = model.graph.node(0)
    one = _qconv.conv_hessians([_data(model, n=1)[0]["x"]], node, (4, 4, 3, 3))
    assert one.rows.tolist() == [36, 36]  # 2 x 6 x 6 positions, halved


def test_blocked_conv_dq_layout_and_reference() -> None:
    model = _conv_model(40, 24, (3, 3), hw=(8, 8), pads=[1, 1, 1, 1])  # 40 channels: blocks of 16, 16 and 8
    data = _data(model, n=2)
    reference = outputs(model, data)
    w = constant_array(model.graph.node(0).inputs[1])
    result = QuantizeWeights(bits=4, conv_block_size=16)(model)
    assert result.modified and result.stats["opset_upgraded_to"] == 21
    dq = _dq(model)
    assert dq.attributes.get_int("axis") == 1 and dq.attributes.get_int("block_size") == 16
    assert dq.inputs[0].const_value.dtype == ir.DataType.INT4
    q, scale = constant_array(dq.inputs[0]).astype(np.int8), constant_array(dq.inputs[1])
    assert scale.shape == (24, 3, 3, 3)
    ref = quantize_weight(w, qtype(4, True), axis=1, block_size=16, symmetric=True)
    np.testing.assert_array_equal(q, ref.q.astype(np.int8))
    np.testing.assert_array_equal(q.astype(np.float32) * expand(scale, w.shape, 1, 16), ref.dequantized())
    record = result.layers[0]
    assert record["scales"] == "blocked" and record["axis"] == 1 and record["block_size"] == 16
    assert record["scale_bytes"] == 24 * 3 * 9 * 4 and record["bytes_after"] == 24 * 40 * 9 // 2 + record["scale_bytes"]  # no zero points written
    assert_valid(model)
    for level in ("exact", "deploy"):  # ORT runs the axis-1 blocked DequantizeLinear at both levels
        assert min(e.sqnr_db for e in compare_outputs(reference, outputs(model, data, level))) > 12.0
    assert not QuantizeWeights(bits=4, conv_block_size=16)(model).modified


def test_int8_blocked_conv() -> None:
    model = _conv_model(64, 16, (1, 1), hw=(6, 6))
    data = _data(model, n=2)
    reference = outputs(model, data)
    assert QuantizeWeights(blocked=True, conv_block_size=16, conv_block_min_gain=0)(model).modified
    dq = _dq(model)
    assert (dq.attributes.get_int("axis"), dq.attributes.get_int("block_size")) == (1, 16)
    assert constant_array(dq.inputs[0]).dtype == np.int8 and constant_array(dq.inputs[1]).shape == (16, 4, 1, 1)
    assert_valid(model)
    assert deploy_sqnr(model, data, reference) > 30.0


def _digits_split() -> tuple[ir.Model, list[dict], list[dict], list[dict]]:
    """digits_cnn, its first 100 test rows as calibration, the rest scored, and their float outputs."""
    model = ir.load(MODELS / "digits_cnn.onnx")
    samples, _ = load_npz(MODELS / "digits_cnn_test.npz", model)
    x = samples[0]["input"]
    calib, test = [{"input": x[:100]}], [{"input": x[100:]}]
    return model, calib, test, outputs(model, test)


def test_conv_inputs_captured_in_bounded_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture bound smaller than one Conv input: one onnxruntime run per input, the same Hessians."""
    from graphopt.layers import linear_layers

    model, calib, _, _ = _digits_split()
    layers = list(linear_layers(model, ["Conv"]))
    whole = _qconv.conv_calibration(model, layers, calib)
    runs: list[int] = []
    capture = _qconv.capture
    monkeypatch.setattr(_qconv, "capture", lambda m, s, names: runs.append(len(names)) or capture(m, s, names))
    monkeypatch.setattr(_qconv, "CAPTURE_BYTES", 1)
    grouped = _qconv.conv_calibration(model, layers, calib)
    assert runs == [2, 1, 1]  # the size probe, then one input per run
    for name, convs in whole.items():
        for out, calibration in convs.items():
            assert np.array_equal(calibration.hessians.sums, grouped[name][out].hessians.sums)


def test_blocked_beats_per_channel_on_trained_cnn() -> None:
    """digits_cnn's second conv (16 input channels x 3x3): blocks of 8 channels vs one scale per output channel."""
    model, calib, test, reference = _digits_split()
    sqnr, size = {}, {}
    for block in (0, 8):
        m = model.clone()
        result = calibrated_run(QuantizeWeights(bits=4, ops=["Conv"], conv_block_size=block, search=False), m, calib)
        (record,) = [r for r in result.layers if r.get("choice") == "quantized"]
        assert record["scales"] == ("blocked" if block else "per-channel")
        sqnr[block], size[block] = deploy_sqnr(m, test, reference), record["bytes_after"]
    assert sqnr[8] > sqnr[0] + 1.0, sqnr
    assert size[8] > size[0]  # the block scales are real bytes


def test_gptq_through_the_pass_and_search_reuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _conv_model(64, 32, (3, 3), hw=(8, 8), pads=[1, 1, 1, 1])
    calib = _data(model, n=4)
    reference = outputs(model, calib)
    sqnr = {}
    for rounding in ("nearest", "gptq"):
        m = model.clone()
        result = calibrated_run(QuantizeWeights(bits=4, rounding=rounding, search=False, conv_block_min_gain=0), m, calib)
        assert result.layers[0]["rounding"] == ("gptq" if rounding == "gptq" else "nearest") and result.layers[0]["scales"] == "blocked"
        sqnr[rounding] = deploy_sqnr(m, calib, reference)
    assert sqnr["gptq"] > sqnr["nearest"] + 1.0, sqnr
    calls = []
    real = _qconv.conv_gptq
    monkeypatch.setattr("graphopt.passes._qconv.conv_gptq", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = model.clone()
    result = calibrated_run(QuantizeWeights(bits=4, rounding="gptq", target_sqnr=90.0, conv_block_min_gain=0), m, calib)  # unreachable: the search runs
    # one selection per bit width (GPTQ from each half at each dampening, then from all rows), reused
    # by every candidate: the 4-bit one, and the 8-bit one the search tried before float
    assert result.stats["search_runs"] >= 2 and result.stats["fallback_float"] == 1
    assert len(calls) == 2 * (2 * len(_gptq.DAMPS) + 1)


def test_blocks_only_where_they_pay() -> None:
    """Gaussian weights gain ~2 dB from blocks of 32 channels: per output channel; a weight whose
    input channels differ in scale (what folded BatchNorms and outlier channels leave) gains more: blocked."""
    plain = _conv_model(128, 32, (1, 1), hw=(4, 4))
    result = QuantizeWeights(bits=4, search=False)(plain)
    assert result.layers[0]["scales"] == "per-channel" and 0 < result.layers[0]["block_gain_db"] < 3.0
    skewed = _conv_model(128, 32, (1, 1), hw=(4, 4))
    w = constant_array(skewed.graph.node(0).inputs[1])
    skewed.graph.initializers["w"].const_value = ir.tensor(w * np.exp(2 * RNG.standard_normal((1, 128, 1, 1))).astype(np.float32))
    result = QuantizeWeights(bits=4, search=False)(skewed)
    assert result.layers[0]["scales"] == "blocked" and result.layers[0]["block_gain_db"] >= 3.0
    assert (_dq(skewed).attributes.get_int("axis"), _dq(skewed).attributes.get_int("block_size")) == (1, 32)


def test_depthwise_and_small_fan_in_stay_per_channel() -> None:
    dw = _conv_model(64, 64, (5, 5), 64, hw=(8, 8), pads=[2, 2, 2, 2])
    assert QuantizeWeights(bits=4, min_fan_in=16, conv_block_size=16, search=False, per_channel_min_gain=0)(dw).modified
    d = _dq(dw)
    assert d.attributes.get_int("axis") == 0 and d.attributes.get_int("block_size", 0) == 0
    result = QuantizeWeights(bits=4, fallback_bits=0)(_conv_model(64, 64, (3, 3), 64, hw=(8, 8)))  # fan-in 9 < min-fan-in
    assert not result.modified and result.stats["small_fan_in"] == 1
    narrow = _conv_model(64, 64, (3, 3), 64, hw=(8, 8))
    result = QuantizeWeights(bits=4)(narrow)  # the fallback: 8 bits per output channel
    assert result.stats["small_fan_in_8bit"] == 1 and result.layers[0]["reason"] == "fan-in 9 < min-fan-in 32: 8 bits"
    assert _dq(narrow).attributes.get_int("axis") == 0 and _dq(narrow).inputs[0].dtype == ir.DataType.INT8
    narrow = _conv_model(32, 64, (3, 3), hw=(8, 8))  # 32 channels: one block of 32, so per output channel
    QuantizeWeights(bits=4, conv_block_size=32, search=False)(narrow)
    assert _dq(narrow).attributes.get_int("axis") == 0 and constant_array(_dq(narrow).inputs[1]).shape == (64,)


def test_shared_or_computed_conv_weight_is_left_alone() -> None:
    shared = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,32,6,6] x) => (float[1,16,6,6] y) <float[16,32,1,1] w = {%s}> {
            a = Conv(x, w)  s = ReduceMean<keepdims=0>(x)  b = Mul(w, s)  y = Add(a, a)
        }"""
        % ",".join(f"{v:.3f}" for v in RNG.standard_normal(512))
    )
    model = ir.from_proto(shared)
    result = QuantizeWeights(bits=4, min_elements=16, conv_block_size=16)(model)
    assert not result.modified and result.stats["skipped_shared"] == 1
    computed = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,32,6,6] x, float[16,32,1,1] w) => (float[1,16,6,6] y) { y = Conv(x, w) }"""
    )
    model = ir.from_proto(computed)
    result = QuantizeWeights(bits=4, conv_block_size=16)(model)
    assert not result.modified and not any(n.op_type == "DequantizeLinear" for n in model.graph)


def test_static_gptq_weights_beat_nearest_on_trained_cnn() -> None:
    from graphopt.passes.quantize_static import QuantizeStatic

    model, calib, test, reference = _digits_split()
    sqnr, weights = {}, {}
    for rounding in ("nearest", "gptq"):
        m = model.clone()
        assert calibrated_run(QuantizeStatic(rounding=rounding, search=False), m, calib).modified
        dqs = [n for n in m.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None and n.inputs[0].const_value.dtype == ir.DataType.INT8]
        weights[rounding] = [(constant_array(n.inputs[0]), n.attributes.get_int("axis", 1)) for n in dqs]
        sqnr[rounding] = deploy_sqnr(m, test, reference)
    assert [(q.shape, a) for q, a in weights["gptq"]] == [(q.shape, a) for q, a in weights["nearest"]]  # same layout
    assert any(not np.array_equal(g, n) for (g, _), (n, _) in zip(weights["gptq"], weights["nearest"]))
    assert sqnr["gptq"] > sqnr["nearest"] + 1.0, sqnr


def test_search_reuses_matmul_gptq(monkeypatch: pytest.MonkeyPatch) -> None:
    h, T = onnx.helper, onnx.TensorProto
    w1, w2 = (RNG.standard_normal(s).astype(np.float32) for s in ((64, 64), (64, 32)))
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w1"], ["a"]), h.make_node("Relu", ["a"], ["r"]), h.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["n", 64])], [h.make_tensor_value_info("y", T.FLOAT, ["n", 32])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")],
    )  # fmt: skip
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.from_proto(proto)
    calib = [{"x": RNG.standard_normal((16, 64)).astype(np.float32)} for _ in range(2)]
    import graphopt.passes.quantize_weights as qw_module

    calls = []
    real = qw_module.gptq
    monkeypatch.setattr(qw_module, "gptq", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = calibrated_run(QuantizeWeights(bits=4, block_size=16, rounding="gptq", target_sqnr=90.0), model, calib)
    assert result.stats["search_runs"] >= 2 and len(calls) == 4  # one per weight and bit width (4, and 8 tried before float), whatever the search built


def test_conv_too_wide_for_a_hessian_keeps_plain_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_qconv, "MAX_COLUMNS", 64 * 9 - 1)  # the 64 x 3x3 conv below has 576 columns
    model = _conv_model(64, 32, (3, 3), hw=(6, 6), pads=[1, 1, 1, 1])
    result = calibrated_run(QuantizeWeights(bits=4, rounding="gptq", search=False), model, _data(model, n=2))
    assert result.modified and result.layers[0]["rounding"] == "mse"  # gptq's range search, without the Hessian
