"""quantize-weights' sensitivity search: the layer whose weights int8 ruins stays float, a model
within budget is quantized whole after one check, search=false keeps the old behaviour."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from conftest import assert_valid, calibrated_run, deploy_sqnr, outputs

from graphopt.passes.quantize_weights import QuantizeWeights


def _mlp(outlier: float) -> ir.Model:
    """x[n,16] -> mm1 -> Relu -> mm2 -> Relu -> mm3 -> y[n,8]. With ``outlier`` > 1, mm1's column 0 is
    scaled down by it and mm2's row 0 up: the same function, but every column of mm2 spans a range
    ~``outlier`` times its other weights', so int8 (even per column) rounds those to zero."""
    rng = np.random.default_rng(0)
    w1, w2, w3 = ((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in ((16, 64), (64, 64), (64, 8)))
    w1[:, 0] /= outlier
    w2[0, :] = np.abs(w2[0, :]) * outlier
    h, T = onnx.helper, onnx.TensorProto
    inits = [onnx.numpy_helper.from_array(w, n) for n, w in (("w1", w1), ("w2", w2), ("w3", w3))]
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"), h.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        h.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"), h.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        h.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3"),
    ]  # fmt: skip
    graph = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", T.FLOAT, ["n", 16])], [h.make_tensor_value_info("y", T.FLOAT, ["n", 8])], inits)
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def _data(seed: int = 1, n: int = 32) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)}]


def _quantize(model: ir.Model, data: list, **options: object):  # noqa: ANN202
    return calibrated_run(QuantizeWeights(**options), model, data)  # type: ignore[arg-type]


def test_search_keeps_exactly_the_sensitive_layer_in_float() -> None:
    model, data = _mlp(1000.0), _data()
    reference = outputs(model, data)
    full = model.clone()
    old = _quantize(full, data, search=False)
    assert old.stats["quantized"] == 3 and "search_runs" not in old.stats  # the old behaviour: everything, no search
    assert all(r["choice"] == "quantized" for r in old.layers)
    assert deploy_sqnr(full, data, reference) < 30.0  # all-int8 misses the default budget
    result = _quantize(model, data)
    float_layers = [r for r in result.layers if r["choice"] == "float"]
    assert [r["name"] for r in float_layers] == ["mm2"] and float_layers[0]["reason"].startswith("sensitivity")
    assert min(result.layers, key=lambda r: r["alone_sqnr_db"])["name"] == "mm2"  # ranked most harmful
    assert result.stats["kept_float_sensitivity"] == 1 and result.stats["quantized"] == 2
    assert result.stats["all_quantized_sqnr_centi_db"] < 3000 <= result.stats["reached_sqnr_centi_db"] - 100  # budget + 1 dB margin
    assert_valid(model)
    assert [n.op_type for n in model.graph].count("DequantizeLinear") == 2
    mm2 = next(n for n in model.graph if n.name == "mm2")
    assert mm2.inputs[1].const_value is not None and mm2.inputs[1].dtype == ir.DataType.FLOAT  # float weight read directly
    assert deploy_sqnr(model, data, reference) >= 31.0
    other = _data(seed=7)
    assert deploy_sqnr(model, other, outputs(_mlp(1000.0), other)) >= 30.0  # holds on other inputs
    assert not _quantize(model, data).modified  # idempotent


def test_model_within_budget_is_quantized_whole_after_one_check() -> None:
    model, data = _mlp(1.0), _data()
    reference = outputs(model, data)
    result = _quantize(model, data)
    assert result.stats["quantized"] == 3 and "kept_float_sensitivity" not in result.stats
    assert result.stats["search_runs"] == 1  # one check of the all-quantized model, no ranking
    assert all(r["choice"] == "quantized" and "alone_sqnr_db" not in r for r in result.layers)
    assert deploy_sqnr(model, data, reference) >= 30.0


def test_budget_option_is_the_search_target() -> None:
    """A budget the all-quantized model meets: nothing kept float, even with the sensitive layer."""
    model, data = _mlp(1000.0), _data()
    result = _quantize(model, data, budget_min_sqnr=-50.0, budget_min_cosine=0.0)
    assert result.stats["quantized"] == 3 and result.stats["search_runs"] == 1


def _int4(outlier: float, **options: object) -> tuple[ir.Model, object, float]:
    model, data = _mlp(outlier), _data()
    reference = outputs(model, data)
    result = _quantize(model, data, bits=4, block_size=16, **options)
    assert_valid(model)
    return model, result, deploy_sqnr(model, data, reference)


def test_int4_search_keeps_the_sensitive_layer_at_8_bits() -> None:
    """At 4 bits the layer the search keeps gets 8-bit per-channel weights (fallback-bits=8), not float."""
    model, result, sqnr = _int4(30.0)
    by_name = {r["name"]: r for r in result.layers}
    assert (by_name["mm2"]["bits"], by_name["mm2"]["scales"]) == (8, "per-channel") and by_name["mm2"]["reason"].startswith("sensitivity")
    assert by_name["mm1"]["bits"] == by_name["mm3"]["bits"] == 4
    assert result.stats["kept_8bit_sensitivity"] == 1 and "kept_float_sensitivity" not in result.stats
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.outputs[0].uses()[0][0].name == "mm2")
    assert dq.inputs[0].dtype == ir.DataType.INT8 and dq.attributes.get_int("axis") == 1
    assert sqnr >= 16.0  # the 4-bit budget (15 dB) plus the margin
    _, floated, _ = _int4(30.0, fallback_bits=0)
    assert next(r for r in floated.layers if r["name"] == "mm2")["choice"] == "float"


def test_int4_search_falls_back_to_float_where_8_bits_miss() -> None:
    """An outlier int8 ruins too: with every layer at 8 bits the budget is missed, so the search runs again with float."""
    model, result, sqnr = _int4(100.0)
    assert result.stats["fallback_float"] == 1 and result.stats["kept_float_sensitivity"] == 1
    assert [r["name"] for r in result.layers if r["choice"] == "float"] == ["mm2"]
    assert sqnr >= 16.0
