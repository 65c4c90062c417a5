"""Empirical bias correction (passes/_biascorr.py) in quantize-weights and quantize-static.

Test layers get weights that all round the same way (``s * (k + 0.45)`` rounds to ``k``), read an
input with a non-zero mean, so the quantized output has a large per-channel mean error: after the
correction its mean over the calibration data is ~0 (against onnxruntime's own float vs quantized
outputs), the new bias is the old one minus that measured shift, and the output SQNR is higher."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import assert_valid, calibrated_run, deploy_sqnr, outputs
from test_quantize_static_search import _data as _mlp_data
from test_quantize_static_search import _mlp
from test_quantize_weights import _optimized_ops

from graphopt.edit import constant_array
from graphopt.passes._biascorr import _chunks
from graphopt.passes._util import conv_geometry, conv_out_size
from graphopt.passes.quantize_static import QuantizeStatic
from graphopt.passes.quantize_weights import QuantizeWeights

H, T = onnx.helper, onnx.TensorProto
_Y = ["d0", "d1", "d2", "d3"]


def _biased_weight(shape: tuple[int, ...], axis: int, rng: np.random.Generator) -> np.ndarray:
    """Weights ``s * (k + 0.45)`` (k in [-100, 100)) with one ``127 * s`` per output channel: per-channel
    symmetric int8 rounds every other element down by 0.45 steps."""
    w = (rng.integers(-100, 100, size=shape) + 0.45).astype(np.float64)
    w = np.moveaxis(w, axis, 0)
    w.reshape(w.shape[0], -1)[:, 0] = 127.0
    scale = rng.uniform(0.5, 2.0, size=w.shape[0]) / 127.0
    return np.moveaxis(w * scale.reshape(-1, *[1] * (w.ndim - 1)), 0, axis).astype(np.float32)


CONVS = {  # name: (C_in, C_out, group, kernel, attributes, bias)
    "conv3x3-pad1": (8, 16, 1, 3, {"pads": [1, 1, 1, 1]}, True),
    "depthwise-stride2-asym-pad-no-bias": (16, 16, 16, 3, {"strides": [2, 2], "pads": [0, 1, 1, 0]}, False),
    "grouped-dilated-pad2": (8, 12, 4, 3, {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, True),
    "stride2-same-upper": (4, 8, 1, 3, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, True),
    "strided-5x5-same-lower": (4, 8, 1, 5, {"strides": [2, 2], "auto_pad": "SAME_LOWER"}, True),
}


def _conv(case: str, seed: int = 0, tail: bool = False) -> ir.Model:
    """One Conv; ``tail``: read by a 1x1 AveragePool (an identity), so quantize-static's Conv has a
    quantized output and ORT fuses it into QLinearConv (a graph output stays float)."""
    cin, cout, group, k, attrs, bias = CONVS[case]
    rng = np.random.default_rng(seed)
    inits = [onnx.numpy_helper.from_array(_biased_weight((cout, cin // group, k, k), 0, rng), "w")]
    if bias:
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
    nodes = [H.make_node("Conv", ["x", "w", *(["b"] if bias else [])], ["h" if tail else "y"], name="conv", group=group, **attrs)]
    if tail:
        nodes.append(H.make_node("AveragePool", ["h"], ["y"], kernel_shape=[1, 1]))
    graph = H.make_graph(nodes, "g", [H.make_tensor_value_info("x", T.FLOAT, ["n", cin, 11, 10])], [H.make_tensor_value_info("y", T.FLOAT, _Y)], inits)
    return ir.from_proto(H.make_model(graph, opset_imports=[H.make_opsetid("", 17)]))


def _dense(op: str, seed: int = 0, bias: str = "vector") -> ir.Model:
    """Gemm(transB=1, C[N]) or MatMul followed by Add of ``bias``: vector [N], row [1, N], input (a graph input), full [M, N]."""
    k, n, m = 40, 24, 6
    rng = np.random.default_rng(seed)
    inputs = [H.make_tensor_value_info("x", T.FLOAT, [m, k])]
    b = rng.standard_normal((m, n) if bias == "full" else (1, n) if bias == "row" else n).astype(np.float32)
    if op == "Gemm":
        inits = [onnx.numpy_helper.from_array(_biased_weight((n, k), 0, rng), "w"), onnx.numpy_helper.from_array(b, "b")]
        nodes = [H.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)]
    else:
        inits = [onnx.numpy_helper.from_array(_biased_weight((k, n), 1, rng), "w")]
        if bias == "input":
            inputs.append(H.make_tensor_value_info("b", T.FLOAT, [n]))
        else:
            inits.append(onnx.numpy_helper.from_array(b, "b"))
        nodes = [H.make_node("MatMul", ["x", "w"], ["h"], name="matmul"), H.make_node("Add", ["h", "b"], ["y"], name="add")]
    graph = H.make_graph(nodes, "g", inputs, [H.make_tensor_value_info("y", T.FLOAT, [m, n])], inits)
    return ir.from_proto(H.make_model(graph, opset_imports=[H.make_opsetid("", 17)]))


def _feeds(model: ir.Model, rows: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Inputs with mean 1.5 (so the weight error's mean reaches the output)."""
    rng = np.random.default_rng(seed)
    out = {}
    for v in model.graph.inputs:
        shape = [rows if not isinstance(d, int) else d for d in v.shape]
        out[v.name] = (1.5 + rng.standard_normal(shape)).astype(np.float32)
    return [out]


def _channel_mean_error(model: ir.Model, data: list, reference: list, axis: int) -> np.ndarray:
    got, want = outputs(model, data)[0]["y"], reference[0]["y"]
    d = np.moveaxis(got.astype(np.float64) - want, axis, 0)
    return d.reshape(d.shape[0], -1).mean(axis=1)


def _weights(model: ir.Model, **options: object) -> tuple[ir.Model, object]:
    result = calibrated_run(QuantizeWeights(search=False, min_elements=1, **options), model, _feeds(model))  # type: ignore[arg-type]
    return model, result


def _check(case_model, axis: int) -> tuple[ir.Model, object]:  # noqa: ANN001
    """Corrected vs uncorrected quantize-weights on one model: mean error ~0, SQNR up, bias = b - measured shift."""
    data = _feeds(case_model())
    reference = outputs(case_model(), data)
    plain, _ = _weights(case_model(), bias_correction=False)
    fixed, result = _weights(case_model())
    assert result.stats["bias_corrected"] == 1 and result.layers[0]["bias_correction"] == "applied"
    assert result.layers[0]["bias_shift_rms"] > 0 and result.layers[0]["bias_shift_rel"] > 0
    assert_valid(fixed)
    shift = _channel_mean_error(plain, data, reference, axis)  # what correction must remove, measured by ORT
    scale = np.sqrt(np.mean(shift**2))
    assert scale > 0.01  # the test weights do round one way
    residual = _channel_mean_error(fixed, data, reference, axis)
    assert np.max(np.abs(residual)) < 1e-3 * scale + 1e-5
    for level in ("exact", "deploy"):
        plain_err = deploy_sqnr(plain, data, reference) if level == "deploy" else min(_sqnr(plain, data, reference))
        fixed_err = deploy_sqnr(fixed, data, reference) if level == "deploy" else min(_sqnr(fixed, data, reference))
        assert fixed_err > plain_err + 3.0, (level, plain_err, fixed_err)
    other = _feeds(case_model(), seed=5)  # held-out inputs from the same distribution: still better
    assert deploy_sqnr(fixed, other, outputs(case_model(), other)) > deploy_sqnr(plain, other, outputs(case_model(), other)) + 3.0
    assert not calibrated_run(QuantizeWeights(search=False, min_elements=1), fixed, data).modified  # idempotent
    return fixed, shift


def _sqnr(model: ir.Model, data: list, reference: list) -> list[float]:
    from graphopt.metrics import compare_outputs

    return [e.sqnr_db for e in compare_outputs(reference, outputs(model, data, "exact"))]


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_mean_error_removed(case: str) -> None:
    fixed, shift = _check(lambda: _conv(case), axis=1)
    conv = next(n for n in fixed.graph if n.op_type == "Conv")
    new_bias = constant_array(conv.inputs[2])
    old = constant_array(_conv(case).graph.initializers["b"]) if CONVS[case][5] else np.zeros(CONVS[case][1], np.float32)
    np.testing.assert_allclose(new_bias, old - shift, rtol=1e-4, atol=1e-4 * np.abs(shift).max())
    if not CONVS[case][5]:
        assert conv.inputs[2].name not in ("", None) and "b" not in fixed.graph.initializers  # a new bias, nothing overwritten


@pytest.mark.parametrize(("op", "bias"), [("Gemm", "vector"), ("MatMul", "vector"), ("MatMul", "row")])
def test_dense_mean_error_removed(op: str, bias: str) -> None:
    fixed, shift = _check(lambda: _dense(op, bias=bias), axis=1)
    host = next(n for n in fixed.graph if n.op_type == ("Gemm" if op == "Gemm" else "Add"))
    value = host.inputs[2] if op == "Gemm" else host.inputs[1]
    new_bias = constant_array(value)
    assert new_bias.shape == ((24,) if bias == "vector" else (1, 24))  # shape kept
    beta = 2.0 if op == "Gemm" else 1.0
    old = constant_array(_dense(op, bias=bias).graph.initializers["b"])
    np.testing.assert_allclose(new_bias.reshape(-1), old.reshape(-1) - shift / beta, rtol=1e-4, atol=1e-4 * np.abs(shift).max())


def test_shared_bias_left_alone() -> None:
    rng = np.random.default_rng(0)
    w1, w2 = (_biased_weight((8, 4, 3, 3), 0, rng) for _ in range(2))
    b = rng.standard_normal(8).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (b, "b"))]
    nodes = [H.make_node("Conv", ["x", "w1", "b"], ["y1"], pads=[1, 1, 1, 1]), H.make_node("Conv", ["x", "w2", "b"], ["y2"], pads=[1, 1, 1, 1]), H.make_node("Add", ["y1", "y2"], ["y"])]
    graph = H.make_graph(nodes, "g", [H.make_tensor_value_info("x", T.FLOAT, ["n", 4, 6, 6])], [H.make_tensor_value_info("y", T.FLOAT, _Y)], inits)
    model = ir.from_proto(H.make_model(graph, opset_imports=[H.make_opsetid("", 17)]))
    _, result = _weights(model)
    assert result.stats["quantized"] == 2 and result.stats["bias_uncorrected_bias_shared"] == 2 and "bias_corrected" not in result.stats
    shared = model.graph.initializers["b"]
    assert len(shared.uses()) == 2 and np.array_equal(constant_array(shared), b)
    assert_valid(model)


@pytest.mark.parametrize(("bias", "why"), [("input", "bias_not_constant"), ("full", "bias_not_per_channel"), (None, "no_bias_add")])
def test_matmul_without_per_column_constant_add_is_skipped(bias: str | None, why: str) -> None:
    if bias is None:
        model = _dense("MatMul")
        add = next(n for n in model.graph if n.op_type == "Add")
        model.graph.outputs[0] = add.inputs[0]  # y = MatMul output, no Add reading it
        y = model.graph.outputs[0]
        y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape([6, 24])
        model.graph.remove(add, safe=True)
        model.graph.initializers.pop("b")
    else:
        model = _dense("MatMul", bias=bias)
    before = {n: constant_array(v) for n, v in model.graph.initializers.items() if n != "w"}
    _, result = _weights(model)
    assert result.stats["quantized"] == 1 and result.stats[f"bias_uncorrected_{why}"] == 1 and "bias_corrected" not in result.stats
    assert result.layers[0]["bias_correction"] == why
    after = {n: constant_array(v) for n, v in model.graph.initializers.items() if n in before}
    assert after.keys() == before.keys() and all(np.array_equal(after[n], before[n]) for n in before)
    assert_valid(model)


def test_no_calibration_no_correction() -> None:
    model = _conv("conv3x3-pad1")
    result = QuantizeWeights(search=False)(model)
    assert result.modified and result.stats["bias_correction_no_calibration"] == 1 and "bias_corrected" not in result.stats
    assert np.array_equal(constant_array(next(n for n in model.graph if n.op_type == "Conv").inputs[2]), constant_array(_conv("conv3x3-pad1").graph.initializers["b"]))


@pytest.mark.parametrize("case", ["conv3x3-pad1", "depthwise-stride2-asym-pad-no-bias"])
def test_static_corrected_and_still_fused(case: str) -> None:
    data = _feeds(_conv(case), rows=16)
    reference = outputs(_conv(case, tail=True), data)
    runs = {}
    for bc in (False, True):
        model = _conv(case, tail=True)
        runs[bc] = (model, calibrated_run(QuantizeStatic(search=False, bias_correction=bc), model, data))
    model, result = runs[True]
    assert result.stats["bias_corrected"] == 1 and result.layers[0]["bias_correction"] == "applied"
    assert "bias_corrected" not in runs[False][1].stats
    assert_valid(model)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    dq = conv.inputs[2].producer()
    assert dq is not None and dq.op_type == "DequantizeLinear" and constant_array(dq.inputs[0]).dtype == np.int32  # corrected, then int32
    assert "QLinearConv" in _optimized_ops(model)
    assert deploy_sqnr(model, data, reference) > deploy_sqnr(runs[False][0], data, reference) + 2.0
    residual = _channel_mean_error(model, data, reference, 1)
    plain = _channel_mean_error(runs[False][0], data, reference, 1)
    assert np.sqrt(np.mean(residual**2)) < 0.2 * np.sqrt(np.mean(plain**2))  # activation rounding's mean stays
    assert not calibrated_run(QuantizeStatic(search=False), model, data).modified  # idempotent


def test_static_layer_kept_float_by_search_gets_no_correction() -> None:
    model, data = _mlp(300.0), _mlp_data()
    b3 = constant_array(model.graph.initializers["b3"])
    result = calibrated_run(QuantizeStatic(), model, data)
    by_name = {r["name"]: r for r in result.layers}
    assert by_name["Gemm3"]["choice"] == "float" and "bias_correction" not in by_name["Gemm3"]
    assert by_name["Gemm1"]["bias_correction"] == "applied" and result.stats["bias_corrected"] == 2
    gemm3 = next(n for n in model.graph if n.name == "Gemm3")
    assert gemm3.inputs[2].name == "b3" and np.array_equal(constant_array(gemm3.inputs[2]), b3)
    assert collections.Counter(_optimized_ops(model))["QGemm"] == 2


def test_weights_layer_kept_float_by_search_gets_no_correction() -> None:
    model, data = _mlp(300.0), _mlp_data()
    b = {n: constant_array(model.graph.initializers[n]) for n in ("b1", "b2", "b3")}
    result = calibrated_run(QuantizeWeights(min_elements=1, target_sqnr=60.0), model, data)
    kept = [r for r in result.layers if r["choice"] == "float"]
    assert kept and all("bias_correction" not in r for r in kept)
    for r in result.layers:
        gemm = next(n for n in model.graph if n.name == r["name"])
        name = "b" + r["name"][-1]
        if r["choice"] == "float":
            assert gemm.inputs[2].name == name and np.array_equal(constant_array(gemm.inputs[2]), b[name])
        else:
            assert r["bias_correction"] == "applied" and gemm.inputs[2].name != name


def conv_pads(size: list[int], kernel: list[int], strides: list[int], dilations: list[int], pads: list[int], auto_pad: str) -> tuple[list[int], list[int], list[int]]:
    """(begin pads, end pads, output sizes) from the shared Conv geometry, for a 1-d Conv with these attributes."""
    node = ir.Node("", "Conv", [], attributes=[ir.AttrInt64s("strides", strides), ir.AttrInt64s("dilations", dilations),
                                                 ir.AttrInt64s("pads", pads), ir.AttrString("auto_pad", auto_pad)])  # fmt: skip
    geo = conv_geometry(node, [1, 1, *size], [1, 1, *kernel])
    return list(geo.pads[:1]), list(geo.pads[1:]), list(conv_out_size(geo, size))


def test_conv_pads_match_onnx_auto_pad() -> None:
    assert conv_pads([11], [3], [2], [1], [0, 0], "SAME_UPPER") == ([1], [1], [6])
    assert conv_pads([10], [3], [2], [1], [0, 0], "SAME_UPPER") == ([0], [1], [5])
    assert conv_pads([10], [3], [2], [1], [0, 0], "SAME_LOWER") == ([1], [0], [5])
    assert conv_pads([10], [3], [3], [2], [0, 0], "VALID") == ([0], [0], [2])
    assert conv_pads([10], [3], [1], [1], [2, 1], "NOTSET") == ([2], [1], [11])


def test_chunks_cap_rows_along_a_dynamic_batch() -> None:
    model = _conv("conv3x3-pad1")
    samples = [{"x": np.zeros((20, 8, 11, 10), np.float32)}, {"x": np.zeros((20, 8, 11, 10), np.float32)}]
    chunks = _chunks(model, samples)
    assert [n for _, n in chunks] == [8, 8, 4, 8, 4] and all(c["x"].shape[0] == n for c, n in chunks)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_dynamic_mean_error_removed(op: str) -> None:
    from graphopt.passes.quantize_dynamic import QuantizeDynamic

    data = _feeds(_dense(op), rows=6)
    reference = outputs(_dense(op), data)
    runs = {}
    for bc in (False, True):
        model = _dense(op)
        runs[bc] = (model, calibrated_run(QuantizeDynamic(search=False, min_elements=1, bias_correction=bc), model, data))
    model, result = runs[True]
    assert result.stats["bias_corrected"] == 1 and result.layers[0]["bias_correction"] == "applied" and "bias_corrected" not in runs[False][1].stats
    assert_valid(model)
    assert "MatMulInteger" in [n.op_type for n in model.graph]
    residual = _channel_mean_error(model, data, reference, 1)
    plain = _channel_mean_error(runs[False][0], data, reference, 1)
    assert np.sqrt(np.mean(residual**2)) < 0.2 * np.sqrt(np.mean(plain**2))  # run-time activation rounding's mean stays
    assert deploy_sqnr(model, data, reference) > deploy_sqnr(runs[False][0], data, reference) + 3.0
    assert not calibrated_run(QuantizeDynamic(search=False, min_elements=1), model, data).modified


def test_benchmark_quick() -> None:
    from benchmarks import bias_correction

    rows = bias_correction.main(["--quick", "--no-write"])
    assert len(rows) == 4 and all(r["verdict"] == "ok" and r["sqnr_db"] > 30 for r in rows)
    for setting in ("static all-int8", "weights all-int8"):
        off, on = (next(r for r in rows if r["setting"] == setting and r["bias_correction"] is bc) for bc in (False, True))
        assert off["corrected"] == 0 < on["corrected"] and on["sqnr_db"] > off["sqnr_db"]


def test_matmul_left_has_no_bias_path() -> None:
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(_biased_weight((24, 40), 0, rng), "w")
    b = onnx.numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")
    nodes = [H.make_node("MatMul", ["w", "x"], ["h"]), H.make_node("Add", ["h", "b"], ["y"])]  # W @ X: Add's [6] runs along X's columns
    graph = H.make_graph(nodes, "g", [H.make_tensor_value_info("x", T.FLOAT, [40, 6])], [H.make_tensor_value_info("y", T.FLOAT, [24, 6])], [w, b])
    model = ir.from_proto(H.make_model(graph, opset_imports=[H.make_opsetid("", 17)]))
    _, result = _weights(model)
    assert result.stats["quantized"] == 1 and result.layers[0]["bias_correction"] == "no_bias_path" and "bias_corrected" not in result.stats
    assert np.array_equal(constant_array(model.graph.initializers["b"]), onnx.numpy_helper.to_array(b))
