"""quantize-static's budget-driven search and mask handling: the most harmful layer stays float, the
budget (default or overridden) is met at ORT's deploy level, a model within budget is quantized whole,
and attention-mask ranges never get a Q."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import assert_valid, calibrated_run, deploy_sqnr, outputs
from test_quantize_weights import _optimized_ops

from graphopt.metrics import Tolerance, compare_outputs
from graphopt.passes._calibrate import mask_like
from graphopt.passes._qsearch import tightened
from graphopt.passes.quantize_static import QuantizeStatic


def _mlp(outlier: float) -> ir.Model:
    """x[n,16] -> Gemm1 -> Relu -> Gemm2 -> Gemm3 -> y[n,8]. With ``outlier`` > 1, Gemm2's
    output channel 0 is scaled up by it and Gemm3's matching weight row down: the same function,
    but the tensor Gemm3 reads spans a range ~``outlier`` times its other channels' (an outlier channel)."""
    rng = np.random.default_rng(0)
    w1, w2, w3 = ((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in ((16, 32), (32, 32), (32, 8)))
    b1, b2, b3 = ((rng.standard_normal(n) * 0.1).astype(np.float32) for n in (32, 32, 8))
    w2[:, 0] *= outlier
    b2[0] *= outlier
    w3[0, :] /= outlier
    inits = {n: ir.Value(name=n, const_value=ir.tensor(a)) for n, a in dict(w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3).items()}
    x = ir.Value(name="x", shape=ir.Shape(["n", 16]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, h = [], x
    for k in (1, 2, 3):
        g = ir.node("Gemm", [h, inits[f"w{k}"], inits[f"b{k}"]], name=f"Gemm{k}")
        g.outputs[0].name = f"h{k}"
        nodes.append(g)
        h = g.outputs[0]
        if k == 1:  # no Relu after Gemm2: ORT fuses a float-output Gemm+Relu into FusedGemm before its QDQ fusions
            r = ir.node("Relu", [h], name=f"Relu{k}")
            r.outputs[0].name = f"r{k}"
            nodes.append(r)
            h = r.outputs[0]
    y = ir.node("Identity", [h], name="out")
    y.outputs[0].name = "y"
    y.outputs[0].dtype = ir.DataType.FLOAT
    y.outputs[0].shape = ir.Shape(["n", 8])
    nodes.append(y)
    graph = ir.Graph([x], [y.outputs[0]], nodes=nodes, initializers=list(inits.values()), opset_imports={"": 17}, name="mlp")
    return ir.Model(graph, ir_version=8)


def _data(seed: int = 1, n: int = 64) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)}]


def _quantize(model: ir.Model, data: list, **options: object):  # noqa: ANN202
    return calibrated_run(QuantizeStatic(**options), model, data)  # type: ignore[arg-type]


def test_search_keeps_exactly_the_outlier_layer_in_float() -> None:
    model, data = _mlp(300.0), _data()
    reference = outputs(model, data)
    full = model.clone()
    assert _quantize(full, data, search=False).stats["quantized_nodes"] == 3
    assert deploy_sqnr(full, data, reference) < 20.0  # all-int8 misses the default budget
    result = _quantize(model, data)
    float_layers = [r for r in result.layers if r["choice"] == "float"]
    assert [r["name"] for r in float_layers] == ["Gemm3"] and float_layers[0]["reason"].startswith("sensitivity")
    assert min(result.layers, key=lambda r: r["alone_sqnr_db"])["name"] == "Gemm3"  # ranked most harmful
    assert result.stats["kept_float_sensitivity"] == 1 and result.stats["quantized_nodes"] == 2
    assert result.stats["all_int8_sqnr_centi_db"] < 2000 <= result.stats["reached_sqnr_centi_db"] - 100  # budget + 1 dB margin
    assert_valid(model)
    assert deploy_sqnr(model, data, reference) >= 21.0
    assert deploy_sqnr(model, _data(seed=7), outputs(model.clone(), _data(seed=7), "exact")) > 0  # runs on other inputs
    ops = collections.Counter(_optimized_ops(model))
    assert ops["QGemm"] == 2 and ops["Gemm"] == 1, ops  # still fused by ORT where quantized
    assert not _quantize(model, data).modified  # idempotent


def test_model_within_budget_is_quantized_whole() -> None:
    model, data = _mlp(1.0), _data()
    reference = outputs(model, data)
    result = _quantize(model, data)
    assert result.stats["quantized_nodes"] == 3 and "kept_float_sensitivity" not in result.stats
    assert result.stats["search_runs"] == 1  # one check of the all-int8 model, no ranking
    assert all(r["choice"] == "int8" for r in result.layers)
    assert deploy_sqnr(model, data, reference) >= 21.0
    assert collections.Counter(_optimized_ops(model))["QGemm"] == 3


@pytest.mark.parametrize(("options", "kept"), [({"budget_min_sqnr": -20.0, "budget_min_cosine": 0.0}, 0), ({"search": False}, 0)])
def test_loose_budget_or_no_search_keeps_all_int8(options: dict, kept: int) -> None:
    model, data = _mlp(300.0), _data()
    result = _quantize(model, data, **options)
    assert result.stats["quantized_nodes"] == 3 and result.stats.get("kept_float_sensitivity", 0) == kept


def test_budget_override_is_the_search_target() -> None:
    model, data = _mlp(1.0), _data()
    reference = outputs(model, data)
    whole = model.clone()
    _quantize(whole, data)
    floor = deploy_sqnr(whole, data, reference) + 6.0  # out of reach of the all-int8 model
    result = _quantize(model, data, budget_min_sqnr=floor)
    assert 0 < result.stats["kept_float_sensitivity"] <= 3
    assert deploy_sqnr(model, data, reference) >= floor + 1.0
    assert tightened(Tolerance(min_sqnr_db=20.0, min_cosine=0.99), 1.0) == pytest.approx(Tolerance(min_sqnr_db=21.0, min_cosine=1 - 0.01 / 10**0.1))  # type: ignore[arg-type]


def _attention() -> ir.Model:
    """scores = x @ W + (1 - mask) * finfo.min; y = Softmax(scores) @ x: the mask Add reads two activations."""
    from conftest import from_text

    rng = np.random.default_rng(0)
    w = ", ".join(f"{v:.4f}" for v in rng.standard_normal(16 * 8) * 0.3)
    return from_text(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[b, 8, 16] x, int64[b, 8] mask) => (float[b, 8, 16] y) <float[16, 8] w = {{{w}}}, float one = {{1.0}}, float big = {{-3.4028234e38}}, int64[1] ax = {{1}}> {{
            s = MatMul(x, w)
            mf = Cast<to = 1>(mask)
            inv = Sub(one, mf)
            neg = Mul(inv, big)
            m3 = Unsqueeze(neg, ax)
            a = Add(s, m3)
            p = Softmax<axis = -1>(a)
            y = MatMul(p, x)
        }}""")


def test_mask_add_stays_float_and_the_rest_is_quantized() -> None:
    model = _attention()
    rng = np.random.default_rng(3)
    mask = np.ones((16, 8), np.int64)
    mask[:, 5:] = 0
    data = [{"x": rng.standard_normal((16, 8, 16)).astype(np.float32), "mask": mask}]
    reference = outputs(model, data)
    result = _quantize(model, data)
    by_op = {r["op"]: r for r in result.layers}
    assert by_op["Add"]["choice"] == "float" and by_op["Add"]["reason"] == "mask_range"
    assert result.stats["kept_float_mask_range"] == 1 and result.stats["quantized_nodes"] == 2
    assert "kept_float_sensitivity" not in result.stats  # the two MatMuls alone meet the budget
    assert_valid(model)
    assert deploy_sqnr(model, data, reference) >= 21.0


def test_mask_like_ranges() -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(1000).astype(np.float32) * 5
    for big in (np.finfo(np.float32).min, -1e4, -1e9, -np.inf):
        masked = scores.copy()
        masked[::3] = big
        assert mask_like([masked]), big
    assert not mask_like([scores])
    assert not mask_like([np.concatenate([rng.uniform(0.5, 1.0, 900), np.full(100, 1e-12)]).astype(np.float32)])  # a sigmoid's tail
    assert mask_like([np.concatenate([scores, [3e4]]).astype(np.float32)])  # one far outlier sets the range: the same harm
    assert not mask_like([rng.uniform(0, 6e4, 1000).astype(np.float32)])  # raw 16-bit data: big but no gap


def test_time_bounded_ranking_still_meets_the_budget() -> None:
    model, data = _mlp(300.0), _data()
    reference = outputs(model, data)
    result = _quantize(model, data, search_seconds=0.0)  # no node ranked: bisection and refinement on graph order
    assert result.stats["search_unranked"] == 3
    assert 1 <= result.stats["kept_float_sensitivity"] <= 2
    assert next(r for r in result.layers if r["name"] == "Gemm3")["choice"] == "float"
    assert deploy_sqnr(model, data, reference) >= 21.0


def test_runner_budget_and_tolerance_drive_the_search() -> None:
    import graphopt

    data = _data()
    strict_db = 35.0  # all-int8 gets about 33.5 dB here
    cases = (({}, "quantize-static"), ({"tolerance": Tolerance(min_sqnr_db=20.0)}, "quantize-static{budget-min-sqnr=35}"), ({"tolerance": Tolerance(min_sqnr_db=strict_db)}, "quantize-static"))
    for kwargs, pipeline in cases:
        model, report = graphopt.optimize(_mlp(1.0), pipeline, inputs=data, calibration=data, **kwargs)  # on_violation=fail: must meet it
        record = next(r for r in report.records if r.name == "quantize-static")
        assert record.verdict == "ok"
        strict = kwargs.get("tolerance") == Tolerance(min_sqnr_db=strict_db) or "budget" in pipeline
        assert (record.stats.get("kept_float_sensitivity", 0) > 0) == bool(strict), (pipeline, record.stats)
        assert min(e.sqnr_db for e in record.deploy) >= (strict_db if strict else 20.0)
        assert_valid(model)


def test_search_rows_bound_rows_not_samples() -> None:
    """Samples are taken in order up to the row budget, cut only along a dynamic batch axis: a batch-1
    model's one-row samples all count (a cap on samples let a search choose from 2 images)."""
    from graphopt.passes._qsearch import search_rows as _rows

    def shapes(data: list[dict], model: ir.Model) -> list[tuple[int, ...]]:
        return [s["x"].shape for s in _rows(data, 4, model)]

    dynamic = _mlp(1.0)
    assert shapes([{"x": np.zeros((40, 16), np.float32)}], dynamic) == [(4, 16)]
    assert shapes([{"x": np.zeros((3, 16), np.float32)}] * 3, dynamic) == [(3, 16), (1, 16)]
    fixed = _mlp(1.0)
    fixed.graph.inputs[0].shape = ir.Shape([1, 16])
    assert shapes([{"x": np.zeros((1, 16), np.float32)}] * 6, fixed) == [(1, 16)] * 4
    fixed.graph.inputs[0].shape = ir.Shape([40, 16])
    assert shapes([{"x": np.zeros((40, 16), np.float32)}] * 2, fixed) == [(40, 16)]


def _conv_chain() -> ir.Model:
    """x[n,3,12,12] -> A (3x3, 8 ch) -> Relu -> B (depthwise 3x3) -> Relu -> C (1x1, 64) -> Relu -> D (1x1, 512).
    A's odd output channels are scaled down 1000x and B's matching weights up: the same function,
    but the tensor between A and B has channels 1000x apart, which one int8 scale cannot hold
    (what folded BatchNorms leave in MobileNet/EfficientNet stems). A and B are 0.9% of the weights."""
    rng = np.random.default_rng(2)
    h, T = onnx.helper, onnx.TensorProto
    wa = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 5
    wb = rng.standard_normal((8, 1, 3, 3)).astype(np.float32) / 3
    wa[1::2] /= 1000.0
    wb[1::2] *= 1000.0
    wc = rng.standard_normal((64, 8, 1, 1)).astype(np.float32) / 3
    wd = rng.standard_normal((512, 64, 1, 1)).astype(np.float32) / 8
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in (("wa", wa), ("wb", wb), ("wc", wc), ("wd", wd))]
    nodes = [
        h.make_node("Conv", ["x", "wa"], ["a"], name="A", pads=[1, 1, 1, 1]), h.make_node("Relu", ["a"], ["ra"], name="ReluA"),
        h.make_node("Conv", ["ra", "wb"], ["b"], name="B", pads=[1, 1, 1, 1], group=8), h.make_node("Relu", ["b"], ["rb"], name="ReluB"),
        h.make_node("Conv", ["rb", "wc"], ["c"], name="C"), h.make_node("Relu", ["c"], ["rc"], name="ReluC"),
        h.make_node("Conv", ["rc", "wd"], ["y"], name="D"),
    ]  # fmt: skip
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, ["n", 3, 12, 12])], [h.make_tensor_value_info("y", T.FLOAT, ["n", 512, 12, 12])], inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.from_proto(proto)


def _images(seed: int) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(seed).standard_normal((4, 3, 12, 12)).astype(np.float32)}]


def test_a_conv_kept_float_runs_in_float_at_the_deploy_level() -> None:
    """ORT's WeightBiasQuantization quantizes a float Conv's weight per tensor when its input comes
    from a one-scale DequantizeLinear: the Conv kept in float reads a per-axis one instead."""
    model, data = _conv_chain(), _images(1)
    reference = outputs(model, data)
    result = _quantize(model, data, exclude=["B"], search=False)
    assert result.stats["quantized_nodes"] == 3
    b = next(n for n in model.graph if n.name == "B")
    dq = b.inputs[0].producer()
    assert dq.op_type == "DequantizeLinear" and dq.attributes.get_int("axis") == 1 and dq.inputs[1].const_value.shape == (8,)
    assert b.inputs[1].const_value is not None and b.inputs[1].dtype == ir.DataType.FLOAT
    assert_valid(model)
    exact = min(e.sqnr_db for e in compare_outputs(reference, outputs(model, data, "exact")))
    assert deploy_sqnr(model, data, reference) >= exact - 0.5  # per-tensor int8 weights in B (1000x apart) would lose tens of dB


def test_cheap_layers_are_kept_float_within_budget() -> None:
    """A and B hold 0.9% of the weights; the tensor between them is what int8 ruins, so only
    keeping both in float helps: the pair is found within budget, and the SQNR is higher for it."""
    data, other = _images(1), _images(5)
    sqnr = {}
    for share in (0.0, 0.01):
        model = _conv_chain()
        result = _quantize(model, data, cheap_float_share=share, budget_min_sqnr=0.0, budget_min_cosine=0.0)
        kept = sorted(r["name"] for r in result.layers if r["choice"] == "float")
        if share:
            assert kept == ["A", "B"] and result.stats["kept_float_cheap"] == 2
            assert all(r["reason"].startswith("sensitivity: cheap") for r in result.layers if r["choice"] == "float")
        else:
            assert kept == [] and "kept_float_cheap" not in result.stats
        assert_valid(model)
        sqnr[share] = deploy_sqnr(model, other, outputs(_conv_chain(), other))
    assert sqnr[0.01] > sqnr[0.0] + 3.0, sqnr
