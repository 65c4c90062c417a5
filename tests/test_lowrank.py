"""svd-split: structure, numbers against onnxruntime, rank rules, data-aware mode, idempotence, budgets."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import MODELS, assert_valid, assert_within, outputs

import graphopt
from graphopt.data import load_npz
from graphopt.errors import PipelineError, VerificationError
from graphopt.metrics import Tolerance, compare_arrays
from graphopt.passbase import TAG, Calibration
from graphopt.passes import _rank
from graphopt.passes.lowrank import SvdSplit
from graphopt.pipeline import format_pipeline, parse_pipeline

HEAD = '<ir_version: 8, opset_import: ["" : 17]>'
NEAR_EXACT = Tolerance(min_sqnr_db=100.0)  # float32 rounding of the factors sits near 130 dB


def build(text: str, **weights: np.ndarray) -> ir.Model:
    """Model from ONNX text where the named inputs become initializers holding ``weights``."""
    proto = onnx.parser.parse_model(text)
    kept = [i for i in proto.graph.input if i.name not in weights]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    for name, array in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def low_rank(k: int, n: int, r: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / math.sqrt(r)).astype(np.float32)


def spectrum(k: int, n: int, s: np.ndarray, seed: int = 0) -> np.ndarray:
    """A [k, n] matrix with singular values ``s``."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((k, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return ((u * s) @ v.T).astype(np.float32)


def data(model: ir.Model, n: int = 3, seed: int = 0, scale: np.ndarray | None = None, batch: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sample = {}
        for v in model.graph.inputs:
            shape = [d if isinstance(d, int) else batch for d in v.shape]
            x = rng.standard_normal(shape)
            if scale is not None:
                x = x * scale
            sample[v.name] = x.astype(np.float32)
        out.append(sample)
    return out


def split(model: ir.Model, calibration: list[dict[str, np.ndarray]] | None = None, **options: object) -> SvdSplit:
    p = SvdSplit(**options)  # type: ignore[arg-type]
    p.calibration = Calibration(tuple(calibration)) if calibration else None
    return p


def run_split(model: ir.Model, calibration: list | None = None, **options: object):  # type: ignore[no-untyped-def]
    result = split(model, calibration, **options)(model)
    if result.modified:
        assert_valid(model)
    return result


def op_types(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


MATMUL = HEAD + "g (float[B,64] x, float[64,48] W) => (float[B,48] y) { y = MatMul(x, W) }"


# -- the math ----------------------------------------------------------------------------------


@pytest.mark.parametrize("data_aware", [False, True])
def test_factors_reconstruct_at_full_rank(data_aware: bool) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 24))
    x = rng.standard_normal((30, 40)) * np.geomspace(0.01, 10, 40)  # rank-deficient Gram (30 rows)
    acts = _rank.Activations.of([(x, x @ w, 1.0)])
    f = _rank.factorize(w, acts, data_aware=data_aware)
    a, b = f.split(f.max_rank)
    np.testing.assert_allclose(a @ b, w, atol=1e-9)
    assert f.whitened == data_aware
    assert f.errors()[f.max_rank] == 0.0
    for r in (1, 5, 12):  # the closed-form error curve is the true output error on the rows
        a, b = f.split(r)
        assert f.errors()[r] == pytest.approx(np.sum((x @ (w - a @ b)) ** 2), rel=1e-8)


def test_allocate_prefers_the_steep_spectrum() -> None:
    steep = _rank.Unit(np.concatenate([0.5 ** np.arange(64), [0.0]]), 64, 64, 28)
    flat = _rank.Unit(np.linspace(1.0, 0.0, 65), 64, 64, 28)
    ranks = _rank.allocate([steep, flat], 0.3 * 2 * 64 * 64)
    assert ranks[0] is not None and ranks[1] is not None and ranks[0] < ranks[1]
    assert sum(u.cost(r) for u, r in zip((steep, flat), ranks)) <= 0.3 * 2 * 64 * 64
    assert _rank.allocate([steep, flat], 2 * 64 * 64) == [None, None]  # budget for everything: dense


# -- rewrites --------------------------------------------------------------------------------


def test_low_rank_matmul_is_reconstructed_exactly() -> None:
    model = build(MATMUL, W=low_rank(64, 48, 4))
    feed = data(model)
    reference = outputs(model, feed)
    result = run_split(model, min_params=0)
    assert op_types(model) == ["MatMul", "MatMul"]
    assert [(r["rank"], r["shape"], r["params_after"]) for r in result.layers] == [(4, [64, 48], 4 * 112)]
    assert result.layers[0]["sqnr_basis"] == "weights" and result.layers[0]["sqnr_db"] > 100
    assert "W" not in model.graph.initializers
    assert sorted(v.const_value.shape.dims for v in model.graph.initializers.values()) == [(4, 48), (64, 4)]
    assert all(n.metadata_props[TAG] == "svd-split" for n in model.graph)
    assert_within(model, feed, reference, NEAR_EXACT)
    assert not split(model, min_params=0)(model).modified  # idempotent


def test_weight_on_the_left() -> None:
    model = build(HEAD + "g (float[64,5] x, float[48,64] W) => (float[48,5] y) { y = MatMul(W, x) }", W=low_rank(48, 64, 4))
    feed = data(model)
    reference = outputs(model, feed)
    result = run_split(model, data(model, seed=9), min_params=0)
    assert result.layers[0]["rank"] == 4 and result.layers[0]["sqnr_basis"] == "calibration"
    assert_within(model, feed, reference, NEAR_EXACT)


GEMMS = {  # signature, call, stored W shape, bias shape (None: no bias), output shape
    "transB-bias": ("float[B,64] x", "Gemm<transB=1>(x, W, c)", (48, 64), [48], "[B,48]"),
    "transA": ("float[64,B] x", "Gemm<transA=1>(x, W, c)", (64, 48), [48], "[B,48]"),
    "transA-transB-alpha-beta": ("float[64,B] x", "Gemm<transA=1, transB=1, alpha=0.5, beta=2.0>(x, W, c)", (48, 64), [1, 48], "[B,48]"),
    "full-bias": ("float[4,64] x", "Gemm<beta=-1.5>(x, W, c)", (64, 48), [4, 48], "[4,48]"),
    "column-bias": ("float[4,64] x", "Gemm(x, W, c)", (64, 48), [4, 1], "[4,48]"),
    "scalar-bias": ("float[B,64] x", "Gemm<alpha=3.0>(x, W, c)", (64, 48), [], "[B,48]"),
    "no-bias-alpha": ("float[B,64] x", "Gemm<alpha=-2.0>(x, W)", (64, 48), None, "[B,48]"),
    "no-bias": ("float[B,64] x", "Gemm(x, W)", (64, 48), None, "[B,48]"),
}


@pytest.mark.parametrize("case", sorted(GEMMS))
def test_gemm_attributes(case: str) -> None:
    x, call, shape, c_shape, out = GEMMS[case]
    weights = {"W": low_rank(*shape, 4)}
    signature = f"{x}, float{list(shape)} W".replace(" ", "").replace(",float", ", float")
    if c_shape is not None:
        weights["c"] = np.random.default_rng(3).standard_normal(c_shape).astype(np.float32)
        signature += f", float{list(c_shape) if c_shape else ''} c".replace(" ", "").replace("floatc", "float c").replace(",float", ", float")
    model = build(f"{HEAD} g ({signature}) => (float{out} y) {{ y = {call} }}", **weights)
    feed = data(model)
    reference = outputs(model, feed)
    result = run_split(model, data(model, seed=7), min_params=0)
    assert result.layers[0]["rank"] == 4 and result.layers[0]["sqnr_basis"] == "calibration"
    assert "W" not in model.graph.initializers and ("c" in model.graph.initializers) == ("c" in weights)
    assert_within(model, feed, reference, NEAR_EXACT)
    deploy = compare_arrays("y", [r["y"] for r in reference], [o["y"] for o in outputs(model, feed, "deploy")])
    assert deploy.sqnr_db > 100


def test_pointwise_conv_strided_padded() -> None:
    text = HEAD + "g (float[2,64,7,7] x, float[48,64,1,1] W, float[48] b) => (float[2,48,5,5] y) { y = Conv<strides=[2,2], pads=[1,1,1,1]>(x, W, b) }"
    weights = {"W": spectrum(48, 64, 0.7 ** np.arange(48)).reshape(48, 64, 1, 1), "b": np.linspace(-1, 1, 48).astype(np.float32)}
    model = build(text, **weights)
    calib = data(model, seed=5)
    reference = outputs(model, calib)
    result = run_split(model, calib, min_params=0, rank=12)
    assert op_types(model) == ["Conv", "Conv"]
    first, second = list(model.graph)
    assert first.inputs[1].const_value.shape.dims == (12, 64, 1, 1) and list(first.attributes.get_ints("strides")) == [2, 2]
    assert second.inputs[1].const_value.shape.dims == (48, 12, 1, 1) and second.inputs[2].name == "b" and "strides" not in second.attributes
    # the layer SQNR predicted from the strided calibration rows is what ORT measures on them
    measured = compare_arrays("y", [r["y"] for r in reference], [o["y"] for o in outputs(model, calib)])
    assert result.layers[0]["sqnr_db"] == pytest.approx(measured.sqnr_db, abs=0.01)
    assert 20 < measured.sqnr_db < 60


@pytest.mark.parametrize(
    "attrs, stat",
    [("<kernel_shape=[3,3], pads=[1,1,1,1]>", "not_pointwise"), ("<group=2>", "grouped_conv")],
)
def test_conv_left_alone(attrs: str, stat: str) -> None:
    cin = 32 if "group" in attrs else 64
    k = 3 if "kernel" in attrs else 1
    text = f"{HEAD} g (float[1,64,6,6] x, float[64,{cin},{k},{k}] W) => (float[1,64,6,6] y) {{ y = Conv{attrs}(x, W) }}"
    model = build(text, W=np.ones((64, cin, k, k), np.float32))
    result = run_split(model, min_params=0, rank=2)
    assert not result.modified and result.stats == {stat: 1}


def test_layer_that_would_not_save_is_left_alone() -> None:
    text = HEAD + "g (float[B,64] x, float[64,8] W) => (float[B,8] y) { y = MatMul(x, W) }"
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    model = build(text, W=w)
    result = run_split(model, min_params=0)  # 30 dB needs all 8 ranks; 6 is the most that saves 10 %
    assert not result.modified and result.stats == {"left_dense": 1, "data_free": 1}
    assert "needs rank 8 > 6" in result.layers[0]["rule"] and not result.layers[0]["rewritten"]
    assert not run_split(model, min_params=0, rank=7).modified
    assert run_split(model).stats == {"too_small": 1}  # 512 < the default min-params
    assert op_types(model) == ["MatMul"] and model.graph.initializers["W"].const_value.numpy() is not None


def spectrum_model() -> ir.Model:
    return build(MATMUL.replace("[64,48]", "[64,64]").replace("48]", "64]"), W=spectrum(64, 64, 0.5 ** np.arange(64)))


@pytest.mark.parametrize(
    "options, rank",
    [({"rank": 5}, 5), ({"ratio": 0.25}, 8), ({"energy": 0.999}, 5), ({"min_sqnr": 40.0}, 7), ({}, 5)],
)
def test_rank_rules(options: dict[str, float], rank: int) -> None:
    model = spectrum_model()  # s_i = 2^-i: weight SQNR at rank r is 6.02·r dB, energy 1 - 4^-r
    result = run_split(model, min_params=0, **options)
    assert result.layers[0]["rank"] == rank


def test_rank_rule_max_error() -> None:
    w = spectrum(64, 64, 0.5 ** np.arange(64)).astype(np.float64)
    u, s, vt = np.linalg.svd(w)
    error = [np.abs(w - (u[:, :r] * s[:r]) @ vt[:r]).max() for r in range(12)]
    result = run_split(spectrum_model(), min_params=0, max_error=1e-3)
    r = result.layers[0]["rank"]
    assert error[r] <= 1e-3 < error[r - 1]


def test_global_ratio_spreads_by_error() -> None:
    text = HEAD + "g (float[B,64] x, float[64,64] W1, float[64,64] W2) => (float[B,64] y) { h = MatMul(x, W1) y = MatMul(h, W2) }"
    model = build(text, W1=spectrum(64, 64, 0.6 ** np.arange(64), 1), W2=spectrum(64, 64, np.linspace(1, 0.5, 64), 2))
    result = run_split(model, data(model, seed=3), min_params=0, global_ratio=0.4)
    by_weight = {r["weight"]: r for r in result.layers}
    assert by_weight["W1"]["rank"] < by_weight["W2"]["rank"]
    assert sum(r["params_after"] for r in result.layers) <= 0.4 * 2 * 64 * 64
    assert not split(model, data(model, seed=3), min_params=0, global_ratio=0.4)(model).modified  # idempotent


def test_shared_weight_is_factored_once() -> None:
    text = HEAD + "g (float[B,64] x, float[B,64] z, float[64,48] W) => (float[B,48] y, float[B,48] v) { y = MatMul(x, W) v = MatMul(z, W) }"
    model = build(text, W=low_rank(64, 48, 4))
    feed = data(model)
    reference = outputs(model, feed)
    result = run_split(model, data(model, seed=4), min_params=0)
    assert result.stats["split"] == 1 and result.stats["nodes_split"] == 2
    assert len(model.graph.initializers) == 2 and result.layers[0]["layer"].count(",") == 1
    assert_within(model, feed, reference, NEAR_EXACT)


def test_shared_with_another_op_is_left_alone() -> None:
    text = HEAD + "g (float[B,64] x, float[64,48] W) => (float[B,48] y, float[64,48] w2) { y = MatMul(x, W) w2 = Relu(W) }"
    model = build(text, W=low_rank(64, 48, 4))
    assert run_split(model, min_params=0).stats == {"shared_other_use": 1}


def test_include_exclude_and_ops() -> None:
    text = HEAD + "g (float[B,64] x, float[64,64] W1, float[64,64] W2) => (float[B,64] y) { h = MatMul(x, W1) y = Gemm(h, W2) }"
    weights = {"W1": low_rank(64, 64, 3, 1), "W2": low_rank(64, 64, 3, 2)}
    assert run_split(build(text, **weights), min_params=0, exclude=["W1"]).stats["excluded"] == 1
    assert [r["weight"] for r in run_split(build(text, **weights), min_params=0, include=["W2"]).layers] == ["W2"]
    assert [r["op"] for r in run_split(build(text, **weights), min_params=0, ops=["Gemm"]).layers] == ["Gemm"]


def test_float16_weight_keeps_its_dtype() -> None:
    text = HEAD + "g (float16[B,64] x, float16[64,48] W) => (float16[B,48] y) { y = MatMul(x, W) }"
    model = build(text, W=low_rank(64, 48, 4).astype(np.float16))
    assert run_split(model, min_params=0).modified
    assert {v.const_value.dtype for v in model.graph.initializers.values()} == {ir.DataType.FLOAT16}


def test_inside_if_branch_capturing_an_outer_weight() -> None:
    text = HEAD + """g (bool c, float[2,64] x, float[64,48] W) => (float[2,48] y) {
        y = If(c) <then_branch = t () => (float[2,48] a) { a = MatMul(x, W) },
                   else_branch = e () => (float[2,48] b) { b = Neg(x2) }>
        x2 = MatMul(x, W)
    }"""
    text = text.replace("x2 = MatMul(x, W)\n", "").replace("b = Neg(x2)", "m = MatMul(x, W) b = Neg(m)")
    model = build(text, W=low_rank(64, 48, 4))
    feeds = [{"c": np.array(flag), "x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)} for flag in (True, False)]
    reference = outputs(model, feeds)
    result = run_split(model, feeds, min_params=0)
    assert result.stats["nodes_split"] == 2 and result.stats["data_free"] == 1
    assert_within(model, feeds, reference, NEAR_EXACT)


# -- data-aware ------------------------------------------------------------------------------


def test_data_aware_beats_plain_on_anisotropic_inputs() -> None:
    """Inputs whose features span 3 decades: plain SVD spends rank on directions the data never
    excites; whitening by the input statistics keeps what matters for the output."""
    text = HEAD + "g (float[B,64] x, float[64,64] W) => (float[B,64] y) { y = MatMul(x, W) }"
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)  # flat spectrum
    scale = np.geomspace(10.0, 0.01, 64)
    figures = {}
    for data_aware in (False, True):
        model = build(text, W=w)
        calib, test = data(model, 4, seed=1, scale=scale, batch=128), data(model, 4, seed=2, scale=scale, batch=128)
        reference = outputs(model, test)
        result = run_split(model, calib, min_params=0, rank=16, data_aware=data_aware)
        assert result.layers[0]["mode"] == ("data-aware" if data_aware else "plain")
        measured = compare_arrays("y", [r["y"] for r in reference], [o["y"] for o in outputs(model, test)]).sqnr_db
        predicted = result.layers[0]["sqnr_db"]  # on the calibration rows, exact for them
        assert measured == pytest.approx(predicted, abs=1.5)
        figures[data_aware] = measured
    assert figures[True] > figures[False] + 10


def test_data_aware_without_calibration_falls_back_to_plain() -> None:
    model = build(MATMUL, W=low_rank(64, 48, 4))
    result = run_split(model, None, min_params=0, data_aware=True)
    assert result.layers[0]["mode"] == "plain" and result.stats["plain_no_data"] == 1


# -- options, pipeline, runner ---------------------------------------------------------------


def test_options_round_trip_and_conflicts() -> None:
    p = parse_pipeline("svd-split{global-ratio=0.5,data-aware=true,exclude=['*head*'],min-params=0}")
    assert parse_pipeline(format_pipeline(p)) == p
    with pytest.raises(PipelineError, match="one rank rule"):
        parse_pipeline("svd-split{rank=4,energy=0.9}")
    with pytest.raises(PipelineError, match="ratio must be in"):
        parse_pipeline("svd-split{ratio=1.5}")


def test_budget_that_cannot_be_met_fails_or_rolls_back() -> None:
    model = build(MATMUL, W=spectrum(64, 48, 0.7 ** np.arange(48)))
    feed = data(model)
    pipeline = "svd-split{rank=2,min-params=0,budget-min-sqnr=25}"
    with pytest.raises(VerificationError, match=r"svd-split.*SQNR [0-9.]+ dB < 25 dB; lowest layer SQNR of the 1 changed: layer 'W' [0-9.]+ dB"):
        graphopt.optimize(model, pipeline, inputs=feed)
    out, report = graphopt.optimize(model, pipeline, inputs=feed, on_violation="rollback")
    assert report.records[0].verdict == "rolled-back" and op_types(out) == ["MatMul"]
    out, report = graphopt.optimize(model, "svd-split{min-params=0,min-sqnr=28}", inputs=feed)
    assert report.records[0].verdict == "ok" and report.records[0].layers[0]["sqnr_db"] >= 28


def test_trained_mlp_keeps_accuracy_at_half_the_parameters() -> None:
    path = MODELS / "digits_mlp_wide.onnx"
    model = ir.load(path)
    samples, labels = load_npz(MODELS / "digits_mlp_wide_test.npz", model)
    x = samples[0]["input"]
    calib, test = [{"input": x[::2]}], [{"input": x[1::2]}]
    base = float(np.mean(outputs(model, test)[0]["logits"].argmax(-1) == labels[1::2]))
    result = run_split(model, calib, global_ratio=0.5, data_aware=True, min_params=0)
    kept = sum(r["params_after"] for r in result.layers) / sum(r["params_before"] for r in result.layers)
    accuracy = float(np.mean(outputs(model, test)[0]["logits"].argmax(-1) == labels[1::2]))
    assert kept <= 0.5 and accuracy >= base - 0.01


def test_benchmark_quick_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import svd

    assert svd.main(["--quick"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| digits_skl_mlp")]
    assert [line.split("|")[2].strip() for line in lines] == ["original", "plain", "plain", "data-aware", "data-aware"]
