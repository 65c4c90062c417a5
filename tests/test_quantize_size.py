"""quantize-weights on disk: what the bytes of the output are (no redundant zero points, shared
scales, per-tensor scales where per-channel gains nothing, no initializer value_info), the file
ratio on the wide MLP, and opsets (old ones upgraded, ones whose Q/DQ onnxruntime lacks refused)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, assert_valid, feeds, outputs

import graphopt
from benchmarks.qsize import breakdown
from graphopt.edit import constant_array, onnx_opset
from graphopt.metrics import compare_outputs
from graphopt.passes._qgraph import ort_qdq_gap
from graphopt.passes.quantize_weights import QuantizeWeights

RNG = np.random.default_rng(1)


def _mlp(weights: list[np.ndarray], opset: int = 17, *, conv: bool = False) -> ir.Model:
    """x -> MatMul(w0) -> Relu -> MatMul(w1) ...; with ``conv`` a 3x3 Conv (+ Flatten) comes first."""
    h, T = onnx.helper, onnx.TensorProto
    nodes, inits, prev = [], [], "x"
    x_shape = [2, weights[0].shape[0]]
    if conv:
        inits += [onnx.numpy_helper.from_array(RNG.standard_normal((4, 2, 3, 3)).astype(np.float32), "cw"), onnx.numpy_helper.from_array(RNG.standard_normal(4).astype(np.float32), "cb")]
        nodes += [h.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Flatten", ["c"], ["f"])]
        prev, x_shape = "f", [2, 2, 4, 4]
        assert weights[0].shape[0] == 64
    for i, w in enumerate(weights):
        inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        if conv and i == len(weights) - 1:
            inits.append(onnx.numpy_helper.from_array(RNG.standard_normal(w.shape[1]).astype(np.float32), "gb"))
            nodes.append(h.make_node("Gemm", [prev, f"w{i}", "gb"], [f"m{i}"]))
        else:
            nodes.append(h.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(h.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        prev = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, x_shape)], [h.make_tensor_value_info("y", T.FLOAT, [2, weights[-1].shape[1]])], inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    proto.ir_version = 7 if opset <= 21 else onnx.helper.find_min_ir_version_for(list(proto.opset_import), True)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _dqs(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "DequantizeLinear"]


def _runs_close(model: ir.Model, data: list, reference: list, floor: float = 35.0) -> None:
    assert_valid(model)
    for level in ("exact", "deploy"):
        assert all(e.sqnr_db >= floor for e in compare_outputs(reference, outputs(model, data, level))), level


def test_no_zero_points_short_names_shared_scales_and_per_tensor() -> None:
    w = RNG.standard_normal((64, 32)).astype(np.float32)
    flat = np.sign(RNG.standard_normal((32, 32))).astype(np.float32) * 0.5  # every channel spans the same range: per-channel gains nothing
    model = _mlp([w, flat, flat.copy()])  # two layers with equal (but separate) weights
    data = feeds(model)
    reference = outputs(model, data)
    result = QuantizeWeights(search=False, bias_correction=False)(model)  # (the search and bias correction would add their stats)
    assert result.stats == {"quantized": 3, "per_tensor_scale": 2, "shared_initializers": 1}, result.stats
    dqs = _dqs(model)
    assert all(len(dq.inputs) == 2 and not dq.name and not dq.metadata_props for dq in dqs)  # int8 symmetric: the spec's default zero point
    assert [dq.attributes.get_int("axis") for dq in dqs] == [1, None, None]
    assert dqs[1].inputs[1] is dqs[2].inputs[1] and constant_array(dqs[1].inputs[1]).shape == ()  # one shared scalar scale
    assert {v.name for v in model.graph.initializers.values()} == {"w0_q", "w0_s", "w1_q", "w1_s", "w2_q"}
    _runs_close(model, data, reference)
    assert not QuantizeWeights()(model).modified
    assert QuantizeWeights(per_channel_min_gain=0)(_mlp([w, flat])).stats.get("per_tensor_scale") is None


def test_asymmetric_keeps_zero_points() -> None:
    model = _mlp([RNG.standard_normal((64, 32)).astype(np.float32)])
    QuantizeWeights(symmetric=False, per_channel_min_gain=0)(model)
    (dq,) = _dqs(model)
    assert len(dq.inputs) == 3 and constant_array(dq.inputs[2]).dtype == np.int8


def test_saved_file_has_no_initializer_value_info(tmp_path) -> None:
    model = _mlp([RNG.standard_normal((64, 32)).astype(np.float32)])
    QuantizeWeights()(model)
    graphopt.save(model, tmp_path / "q.onnx")
    proto = onnx.load(tmp_path / "q.onnx")
    assert not proto.graph.value_info and breakdown(tmp_path / "q.onnx")["value_info"] == 0
    onnx.checker.check_model(proto, full_check=True)
    assert ir.load(tmp_path / "q.onnx").graph.initializers["w0_q"].type == ir.TensorType(ir.DataType.INT8)  # read back from the tensor


def test_wide_mlp_file_ratio(tmp_path) -> None:
    src = MODELS / "digits_mlp_wide.onnx"
    model, report = graphopt.optimize(src, "quantize-weights", inputs=MODELS / "digits_mlp_wide_test.npz")
    assert report.records[-1].verdict == "ok"
    graphopt.save(model, tmp_path / "q.onnx")
    ratio = (tmp_path / "q.onnx").stat().st_size / src.stat().st_size
    parts = breakdown(tmp_path / "q.onnx")
    assert ratio <= 0.27, (ratio, parts)
    assert parts.get("zero point", 0) == 0 and parts.get("float weight", 0) == 0


def test_opset11_conv_gemm_model_is_upgraded(tmp_path) -> None:
    model = _mlp([RNG.standard_normal((64, 32)).astype(np.float32)], opset=11, conv=True)
    assert [n.op_type for n in model.graph] == ["Conv", "Flatten", "Gemm", "Relu"]
    data = feeds(model)
    reference = outputs(model, data)
    result = QuantizeWeights(min_elements=64, per_channel_min_gain=0)(model)  # the conv has 72 weights; per channel whatever the random weights
    assert result.stats["opset_upgraded_to"] == 13 and onnx_opset(model) == 13 and result.stats["quantized"] == 2
    assert sorted(dq.attributes.get_int("axis") for dq in _dqs(model)) == [0, 1]  # Conv per output channel, Gemm [K, N] axis 1
    _runs_close(model, data, reference)
    graphopt.save(model, tmp_path / "q.onnx")
    assert not onnx.load(tmp_path / "q.onnx").graph.value_info  # none in the input: the version converter's inferred ones are dropped


def test_opset10_falls_back_per_tensor_when_conversion_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt.passes.quantize_weights as qw

    monkeypatch.setattr(qw, "upgrade_opset", lambda *a: "converter failed (simulated)")
    model = _mlp([RNG.standard_normal((64, 32)).astype(np.float32)], opset=10)
    data = feeds(model)
    reference = outputs(model, data)
    result = QuantizeWeights()(model)
    assert result.stats["per_tensor_fallback"] == 1 and onnx_opset(model) == 10
    assert constant_array(_dqs(model)[0].inputs[1]).shape == ()
    _runs_close(model, data, reference, 30.0)


@pytest.mark.parametrize("bits", [8, 4])
def test_newest_opset_is_refused_or_runs(bits: int) -> None:
    """onnx 1.23 defines Q/DQ-28; onnxruntime 1.32 implements up to 25 (it loads the opset-28 model itself)."""
    top = onnx.defs.onnx_opset_version()
    model = _mlp([RNG.standard_normal((64, 32)).astype(np.float32)], opset=top)
    data = feeds(model)
    reference = outputs(model, data)
    dtype = ir.DataType.INT8 if bits == 8 else ir.DataType.INT4
    why, best = ort_qdq_gap(top, dtype, layout="blocked" if bits == 4 else "axis")
    result = QuantizeWeights(bits=bits, block_size=32)(model)
    if why:
        assert "onnxruntime" in why and 21 <= best < top
        assert not result.modified and result.stats == {"skipped_ort_opset": 1, "ort_qdq_max_opset": best}
        assert not _dqs(model) and onnx_opset(model) == top
    else:  # a newer onnxruntime: quantized and runnable
        assert result.modified
        _runs_close(model, data, reference, 15.0)


def test_qdq_gap_probe() -> None:
    assert ort_qdq_gap(13, ir.DataType.INT8) == ("", 13)
    assert ort_qdq_gap(21, ir.DataType.INT4, layout="blocked") == ("", 21)
    assert ort_qdq_gap(10, ir.DataType.INT8, layout="tensor") == ("", 10)
    why, best = ort_qdq_gap(10, ir.DataType.INT8, layout="axis")  # no axis attribute before DequantizeLinear-13
    assert "DequantizeLinear-10" in why and best == 0
    assert ort_qdq_gap(21, ir.DataType.UINT8, activations=True) == ("", 21)


def test_breakdown_adds_up_to_the_file(tmp_path) -> None:
    model = _mlp([RNG.standard_normal((64, 32)).astype(np.float32)], conv=True)
    QuantizeWeights(symmetric=False)(model)
    graphopt.save(model, tmp_path / "q.onnx")
    parts = breakdown(tmp_path / "q.onnx")
    assert sum(parts.values()) == (tmp_path / "q.onnx").stat().st_size
    assert parts["quantized weight"] > parts["scale"] > 0 and parts["zero point"] > 0 and parts["bias"] > 0


def test_static_at_newest_opset_is_refused_before_calibrating_or_runs() -> None:
    from graphopt.passbase import Calibration
    from graphopt.passes.quantize_static import QuantizeStatic

    top = onnx.defs.onnx_opset_version()
    model = _mlp([RNG.standard_normal((64, 32)).astype(np.float32)], opset=top)
    data = feeds(model)
    reference = outputs(model, data)
    why, best = ort_qdq_gap(top, ir.DataType.UINT8, activations=True)
    q = QuantizeStatic(search=False)
    q.calibration = Calibration(tuple(data))
    result = q(model)
    if why:
        assert result.stats["skipped_ort_opset"] >= 1 and result.stats["ort_qdq_max_opset"] == best
        assert not _dqs(model) and onnx_opset(model) == top
    else:  # a newer onnxruntime: quantized and runnable
        assert result.modified
        _runs_close(model, data, reference, 15.0)
