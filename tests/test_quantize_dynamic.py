"""quantize-dynamic: the fused layout (ORT's optimized graph), per-channel axes, Gather tables,
the sensitivity search, opsets, idempotence and what must be left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import assert_valid, feeds, from_text, outputs
from test_quantize_weights import _optimized_ops

import graphopt
from graphopt.edit import constant_array, onnx_opset
from graphopt.metrics import compare_outputs
from graphopt.passbase import Calibration
from graphopt.passes import quantize_dynamic as qd
from graphopt.passes.quantize_dynamic import QuantizeDynamic

RNG = np.random.default_rng(0)


def _mlp(*, opset: int = 17, k: int = 128, n: int = 96, gemm: bool = False, trans_b: int = 0, scales: np.ndarray | None = None) -> ir.Model:
    """x[B, K] -> MatMul/Gemm(constant W) -> Relu -> MatMul(constant W2) -> y. ``scales`` multiplies
    the first layer's output channels (to tell a per-channel axis from the wrong one)."""
    h, T = onnx.helper, onnx.TensorProto
    w = (RNG.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    if scales is not None:
        w = (w * scales[None, :]).astype(np.float32)
    w2 = (RNG.standard_normal((n, 64)) / np.sqrt(n)).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(w2, "w2"), onnx.numpy_helper.from_array(b, "b")]
    if gemm:
        inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(w.T) if trans_b else w, "w"))
        first = [h.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc1", transB=trans_b, alpha=0.5, beta=2.0)]
    else:
        inits.append(onnx.numpy_helper.from_array(w, "w"))
        first = [h.make_node("MatMul", ["x", "w"], ["m"], name="fc1"), h.make_node("Add", ["b", "m"], ["h"], name="bias1")]
    nodes = [*first, h.make_node("Relu", ["h"], ["r"]), h.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["B", k])], [h.make_tensor_value_info("y", T.FLOAT, ["B", 64])], inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    proto.ir_version = 7
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _run(model: ir.Model, samples: list | None = None, **options: object) -> tuple[ir.Model, object]:
    p = QuantizeDynamic(**options)  # type: ignore[arg-type]
    p.calibration = Calibration(tuple(samples)) if samples else None
    result = p(model)
    return result.model, result


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_layout_fuses_in_onnxruntime_and_stays_close() -> None:
    model = _mlp()
    data = feeds(model, samples=4, spec=None)
    reference = outputs(model, data)
    out, result = _run(model.clone(), data, search=False)
    assert result.modified and result.stats["dynamic_matmuls"] == 2 and result.stats["bias_add_swapped"] == 1
    assert_valid(out)
    ops = _ops(out)
    assert ops.count("DynamicQuantizeLinear") == 2 and ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    mmi = [n for n in out.graph if n.op_type == "MatMulInteger"]
    assert all(len(n.inputs) == 3 for n in mmi)  # symmetric int8 weights: no weight zero point
    assert all(n.inputs[1].const_value.dtype == ir.DataType.INT8 for n in mmi)
    add = next(n for n in out.graph if n.op_type == "Add")
    assert constant_array(add.inputs[1]) is not None  # bias second: ORT folds it into the fused op
    optimized = _optimized_ops(out)
    assert "DynamicQuantizeMatMul" in optimized and "MatMulInteger" not in optimized and "Add" not in optimized
    for level in ("exact", "deploy"):
        (err,) = compare_outputs(reference, outputs(out, data, level))
        assert err.sqnr_db > 30 and err.cosine > 0.999, (level, err)
    assert [r["choice"] for r in result.layers] == ["int8 dynamic"] * 2


def test_shared_input_gets_one_dynamic_quantize_and_fuses_to_matmul_integer_to_float() -> None:
    model = from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[B, 64] x) => (float[B, 64] y) <float[64, 64] wa = {%s}, float[64, 64] wb = {%s}> {
            a = MatMul(x, wa)
            b = MatMul(x, wb)
            y = Add(a, b)
        }""" % (",".join(map(str, RNG.standard_normal(4096).round(3))), ",".join(map(str, RNG.standard_normal(4096).round(3)))))
    out, result = _run(model, feeds(model), search=False)
    assert result.stats["dynamic_quantize_linear"] == 1 and result.stats["dynamic_matmuls"] == 2
    assert _optimized_ops(out).count("MatMulIntegerToFloat") == 2


@pytest.mark.parametrize("gemm,trans_b", [(False, 0), (True, 0), (True, 1)])
def test_per_channel_scales_follow_output_columns(gemm: bool, trans_b: int) -> None:
    """Output channels scaled 1e-3..1: per-column scales keep the small ones accurate; a scale
    along the wrong axis (or per tensor) would zero them."""
    col = np.geomspace(1e-3, 1.0, 96).astype(np.float32)
    model = _mlp(gemm=gemm, trans_b=trans_b, scales=col)
    w = model.graph.initializers["w"].const_value.numpy()
    w_kn = w.T if trans_b else w
    bias = model.graph.initializers["b"].const_value.numpy() * (2.0 if gemm else 1.0)
    out, result = _run(model.clone(), feeds(model), search=False, ops=["MatMul", "Gemm"])
    first = next(n for n in out.graph if n.op_type == "MatMulInteger")
    q = first.inputs[1].const_value.numpy()
    scale_mul = next(n for n in out.graph if n.op_type == "Mul" and n.inputs[1] is not None and n.inputs[1].const_value is not None and n.inputs[1].const_value.numpy().shape == (96,))
    s = scale_mul.inputs[1].const_value.numpy()
    alpha = 0.5 if gemm else 1.0
    np.testing.assert_allclose(s, np.abs(w_kn).max(axis=0) / 127 * alpha, rtol=1e-6)
    assert q.shape == (128, 96) and np.abs(q).max(axis=0).min() == 127  # every column uses the full range
    # the first layer's output alone, at ORT's deploy level, per column
    probe = out.clone()
    h = next(n for n in probe.graph if n.op_type == "Relu").inputs[0]
    probe.graph.outputs.append(h)
    ref_probe = model.clone()
    ref_probe.graph.outputs.append(next(n for n in ref_probe.graph if n.op_type == "Relu").inputs[0])
    data = feeds(model, samples=8)
    got, ref = outputs(probe, data, "deploy"), outputs(ref_probe, data)
    hn = h.name
    d = np.concatenate([g[hn] - r[hn] for g, r in zip(got, ref)])
    b_term = np.concatenate([r[hn] for r in ref])
    rel = np.linalg.norm(d, axis=0) / np.linalg.norm(b_term - bias, axis=0)  # per column; 1.0 where the weights rounded to 0
    assert rel.max() < 0.05, rel.max()


def test_gather_table_weight_only_per_row() -> None:
    table = (RNG.standard_normal((300, 64)) * np.geomspace(1e-2, 10, 300)[:, None]).astype(np.float32)
    h, T = onnx.helper, onnx.TensorProto
    graph = h.make_graph([h.make_node("Gather", ["emb", "ids"], ["y"])], "g", [h.make_tensor_value_info("ids", T.INT64, [2, 5])],
                         [h.make_tensor_value_info("y", T.FLOAT, [2, 5, 64])], [onnx.numpy_helper.from_array(table, "emb")])  # fmt: skip
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model = ir.from_proto(proto)
    data = [{"ids": np.array([[0, 1, 2, 3, 299], [7, 7, 150, 298, 0]], np.int64)}]
    out, result = _run(model, data)
    assert result.stats["gather_weight_only"] == 1 and "emb" not in out.graph.initializers
    assert_valid(out)
    assert sorted(_ops(out)) == ["Cast", "Gather", "Gather", "Mul"]
    scale = np.abs(table).max(axis=1, keepdims=True) / 127
    expected = (np.clip(np.rint(table / scale), -127, 127) * scale.astype(np.float32)).astype(np.float32)[data[0]["ids"]]
    for level in ("exact", "deploy"):
        np.testing.assert_array_equal(outputs(out, data, level)[0]["y"], expected)


def _outlier_model() -> ir.Model:
    """y = x @ Wa + (x * c) @ Wb, c has one entry 1e4 whose Wb row is 0: run-time quantization
    of x * c (one range for the whole tensor) wipes out every other feature of the second MatMul."""
    h, T = onnx.helper, onnx.TensorProto
    c = np.ones(128, np.float32)
    c[5] = 1e4
    wb = RNG.standard_normal((128, 64)).astype(np.float32)
    wb[5] = 0
    inits = [onnx.numpy_helper.from_array(RNG.standard_normal((128, 64)).astype(np.float32), "wa"), onnx.numpy_helper.from_array(wb, "wb"),
             onnx.numpy_helper.from_array(c, "c")]  # fmt: skip
    nodes = [h.make_node("MatMul", ["x", "wa"], ["a"], name="plain"), h.make_node("Mul", ["x", "c"], ["xc"]),
             h.make_node("MatMul", ["xc", "wb"], ["b"], name="outlier"), h.make_node("Add", ["a", "b"], ["y"])]  # fmt: skip
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["B", 128])], [h.make_tensor_value_info("y", T.FLOAT, ["B", 64])], inits)
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def test_search_keeps_the_harmful_matmul_in_float() -> None:
    model = _outlier_model()
    data = feeds(model, samples=3)
    reference = outputs(model, data)
    out, result = _run(model.clone(), data)
    assert result.stats["kept_float"] == 1 and result.stats["dynamic_matmuls"] == 1
    choices = {r["name"]: r["choice"] for r in result.layers}
    assert choices == {"plain": "int8 dynamic", "outlier": "float"}
    assert [n.name for n in out.graph if n.op_type == "MatMul"] == ["outlier"]
    (err,) = compare_outputs(reference, outputs(out, data, "deploy"))
    assert err.sqnr_db >= 21
    _, blind = _run(model.clone(), data, search=False)
    assert blind.stats["dynamic_matmuls"] == 2 and "kept_float" not in blind.stats


def test_through_the_runner_with_its_budget() -> None:
    model = _outlier_model()
    data = feeds(model, samples=3)
    out, report = graphopt.optimize(model, "quantize-dynamic", inputs=data, calibration=data)
    (record,) = report.records
    assert record.verdict == "ok" and record.stats["dynamic_matmuls"] == 1


def test_idempotent_and_already_quantized_left_alone() -> None:
    model = _mlp()
    data = feeds(model)
    out, _ = _run(model, data, search=False)
    again, result = _run(out, data)
    assert not result.modified and result.stats == {"already_quantized": 1}
    assert _ops(again) == _ops(out)


def test_non_constant_weights_and_small_weights_left_alone() -> None:
    model = from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[B, 8] x, float[8, 4] w) => (float[B, 4] y, float[B, 4] z) <float[8, 4] small = {%s}> {
            y = MatMul(x, w)
            z = MatMul(x, small)
        }""" % ",".join(["0.5"] * 32))
    out, result = _run(model, feeds(model))
    assert not result.modified and result.stats == {"non_constant_weight": 1, "too_small": 1}
    assert _ops(out) == ["MatMul", "MatMul"]


def test_old_opset_is_converted() -> None:
    model = _mlp(opset=9)
    data = feeds(model)
    reference = outputs(model, data)
    out, result = _run(model, data, search=False)
    assert result.stats["opset_upgraded_to"] == 11 and onnx_opset(out) == 11 and "DynamicQuantizeLinear" in _ops(out)
    assert_valid(out)
    (err,) = compare_outputs(reference, outputs(out, data, "deploy"))
    assert err.sqnr_db > 30


def test_opset_onnxruntime_cannot_run_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert qd.ort_runs_dynamic(17)
    monkeypatch.setattr(qd, "ort_runs_dynamic", lambda opset: False)
    model = _mlp()
    out, result = _run(model, feeds(model))
    assert not result.modified and result.stats["skipped_ort_opset"] == 2 and "MatMul" in _ops(out)


def test_convolutions_are_left_alone() -> None:
    h, T = onnx.helper, onnx.TensorProto
    w = onnx.numpy_helper.from_array(RNG.standard_normal((64, 64, 3, 3)).astype(np.float32), "w")
    graph = h.make_graph([h.make_node("Conv", ["x", "w"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 64, 8, 8])], [h.make_tensor_value_info("y", T.FLOAT, None)], [w])
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    out, result = _run(model, feeds(model))
    assert not result.modified and _ops(out) == ["Conv"]


def _lstm(direction: str = "forward", layout: int = 0, hidden: int = 48) -> ir.Model:
    """x -> LSTM(constant W, R, B; Y and Y_h used, Y_c not) -> MatMul head on Y_h."""
    h, T = onnx.helper, onnx.TensorProto
    d = 2 if direction == "bidirectional" else 1
    seq, batch, k = 6, 3, 32
    w = (RNG.standard_normal((d, 4 * hidden, k)) / np.sqrt(k)).astype(np.float32)
    r = (RNG.standard_normal((d, 4 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    r[:, :hidden] *= 4.0  # the input gate's rows 4x wider than the others: per-row scales pay
    b = (RNG.standard_normal((d, 8 * hidden)) / 4).astype(np.float32)
    head = (RNG.standard_normal((hidden, 10)) / np.sqrt(hidden)).astype(np.float32)
    x_shape, y_shape = ([batch, seq, k], [batch, seq, d, hidden]) if layout else ([seq, batch, k], [seq, d, batch, hidden])
    nodes = [h.make_node("LSTM", ["x", "W", "R", "B"], ["y", "yh", ""], name="rnn", hidden_size=hidden, direction=direction, layout=layout),
             h.make_node("MatMul", ["yh", "head"], ["z"], name="head")]  # fmt: skip
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"), (head, "head"))]
    hs = [batch, d, hidden] if layout else [d, batch, hidden]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, x_shape)],
                         [h.make_tensor_value_info("y", T.FLOAT, y_shape), h.make_tensor_value_info("z", T.FLOAT, [*hs[:-1], 10])], inits)  # fmt: skip
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_lstm_becomes_dynamic_quantize_lstm(direction: str, per_channel: bool) -> None:
    """W/R int8 transposed to [directions, K, 4H], one scale per gate row (or per direction), the
    other inputs and outputs as they were; ORT runs it at both levels close to float."""
    model = _lstm(direction)
    data = feeds(model, samples=4)
    reference = outputs(model, data)
    p = QuantizeDynamic(per_channel=per_channel, ops=["LSTM"])
    p.calibration = Calibration(tuple(data))
    result = p(model)
    assert result.stats["dynamic_lstms"] == 1, result.stats
    assert_valid(model)
    node = next(n for n in model.graph if n.op_type == "DynamicQuantizeLSTM")
    d = 2 if direction == "bidirectional" else 1
    wq, ws, rq, rs = (constant_array(node.inputs[i]) for i in (1, 8, 2, 10))
    assert wq.dtype == rq.dtype == np.int8 and wq.shape == (d, 32, 192) and rq.shape == (d, 48, 192)
    assert ws.shape == rs.shape == ((d, 192) if per_channel else (d,))
    assert node.inputs[3].name == "B" and [o.name for o in node.outputs[:2]] == ["y", "yh"]
    assert result.layers[0]["scales"] == ("per-gate-row" if per_channel else "per-direction")
    for level in ("exact", "deploy"):
        assert min(e.sqnr_db for e in compare_outputs(reference, outputs(model, data, level))) > (35.0 if per_channel else 25.0)
    assert not p(model).modified


def test_lstm_per_gate_row_scales_beat_per_direction() -> None:
    model, single = _lstm(), _lstm()
    data = feeds(model, samples=4)
    reference = outputs(model, data)
    sqnr = {}
    for m, per_channel in ((model, True), (single, False)):
        QuantizeDynamic(per_channel=per_channel, ops=["LSTM"], search=False)(m)
        sqnr[per_channel] = min(e.sqnr_db for e in compare_outputs(reference, outputs(m, data)))
    assert sqnr[True] > sqnr[False] + 3.0, sqnr


def test_batch_first_and_shared_lstm_weights_are_left_alone() -> None:
    result = QuantizeDynamic(ops=["LSTM"])(_lstm(layout=1))
    assert result.stats.get("lstm_layout_batch_first") == 1 and not result.modified
    shared = _lstm()
    shared.graph.outputs.append(shared.graph.initializers["R"])
    result = QuantizeDynamic(ops=["LSTM"])(shared)
    assert result.stats.get("shared_weight") == 1 and not result.modified


def test_torch_lstm_export_runs_as_dynamic_quantize_lstm() -> None:
    """models/digits_lstm (torch's export: W/R/B sliced and concatenated per gate): the pass folds
    those chains itself, both LSTMs become DynamicQuantizeLSTM and the test accuracy stays within
    0.5 points of float."""
    from conftest import MODELS

    from graphopt.data import load_npz

    model = ir.load(MODELS / "digits_lstm.onnx")
    samples, labels = load_npz(MODELS / "digits_lstm_test.npz", model)
    out, report = graphopt.optimize(model, "quantize-dynamic", inputs=samples, calibration=samples)
    stats = report.records[-1].stats
    assert stats["dynamic_lstms"] == 2 and stats["folded_weight_chain_nodes"] > 0, stats
    assert [n.op_type for n in out.graph].count("DynamicQuantizeLSTM") == 2
    assert not any(n.op_type == "Slice" and constant_array(n.inputs[0]) is not None for n in out.graph)  # the weights' slices folded
    accuracy = {name: float((outputs(m, samples, "deploy")[0]["logits"].argmax(-1) == labels).mean()) for name, m in (("float", ir.load(MODELS / "digits_lstm.onnx")), ("int8", out))}
    assert abs(accuracy["int8"] - accuracy["float"]) <= 0.005, accuracy


@pytest.mark.parametrize(
    ("attributes", "optional_inputs"),
    [({"clip": 0.8}, False), ({"input_forget": 1}, False), ({"activations": ["HardSigmoid", "Tanh", "Tanh"]}, False), ({"direction": "reverse"}, False), ({}, True)],
    ids=["clip", "input_forget", "activations", "reverse", "bias-seqlens-peephole"],
)
def test_lstm_attributes_and_optional_inputs_carry_over(attributes: dict, optional_inputs: bool) -> None:
    """DynamicQuantizeLSTM takes the LSTM's attributes and its B, sequence_lens and P (initial states
    left out in between) as they were: the same numbers up to int8 rounding, at both levels."""
    h, T = onnx.helper, onnx.TensorProto
    hidden, k, seq, batch = 32, 24, 5, 2
    inits = [onnx.numpy_helper.from_array((RNG.standard_normal((1, 4 * hidden, k)) / 5).astype(np.float32), "W"),
             onnx.numpy_helper.from_array((RNG.standard_normal((1, 4 * hidden, hidden)) / 6).astype(np.float32), "R")]  # fmt: skip
    names = ["x", "W", "R"]
    if optional_inputs:
        inits += [onnx.numpy_helper.from_array((RNG.standard_normal((1, 8 * hidden)) / 6).astype(np.float32), "B"),
                  onnx.numpy_helper.from_array(np.array([seq, seq - 2], np.int32), "lens"),
                  onnx.numpy_helper.from_array((RNG.standard_normal((1, 3 * hidden)) / 6).astype(np.float32), "P")]  # fmt: skip
        names += ["B", "lens", "", "", "P"]
    node = h.make_node("LSTM", names, ["y"], hidden_size=hidden, **attributes)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.FLOAT, [seq, batch, k])], [h.make_tensor_value_info("y", T.FLOAT, [seq, 1, batch, hidden])], inits)
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    data = feeds(model, samples=2)
    reference = outputs(model, data)
    assert QuantizeDynamic(ops=["LSTM"], min_elements=0)(model).stats["dynamic_lstms"] == 1
    assert_valid(model)
    (new,) = model.graph
    assert {a.name for a in new.attributes.values()} == set(attributes) | {"hidden_size"}
    assert [v.name if v is not None else "" for v in new.inputs[3:8]] == (["B", "lens", "", "", "P"] if optional_inputs else [""] * 5)
    for level in ("exact", "deploy"):
        assert compare_outputs(reference, outputs(model, data, level))[0].sqnr_db > 33.0
