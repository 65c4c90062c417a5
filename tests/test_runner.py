"""Verification after every pass: lossless passes bit-exact, budgets enforced, fail and rollback."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphopt
from graphopt.api import PIPELINE_KEY, VERIFIED_KEY
from graphopt.errors import PassFailed, VerificationError
from graphopt.metrics import Tolerance
from graphopt.passbase import GraphPass, PassResult, option

from conftest import MODELS, from_text

MLP = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y) <float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float[3] b = {0.5, -1, 2}> {
    h = MatMul(x, w)
    y = Add(h, b)
}"""


@dataclasses.dataclass
class ScaleWeights(GraphPass):
    """Test pass: multiplies every float initializer by ``factor`` (lossy on purpose)."""

    name = "scale-weights"
    lossless = False
    tolerance = Tolerance(min_sqnr_db=30.0)
    factor: float = option(1.01, "scale")

    def call(self, model: ir.Model) -> PassResult:
        for value in list(model.graph.initializers.values()):
            array = value.const_value.numpy()
            value.const_value = ir.tensor(array * np.float32(self.factor), name=value.name)
        return PassResult(model, modified=True)


@dataclasses.dataclass
class Nudge(ScaleWeights):
    """Test pass claiming to be lossless while changing outputs."""

    name = "nudge"
    lossless = True
    tolerance = Tolerance.exact()


@dataclasses.dataclass
class Round(ScaleWeights):
    """Test pass standing for a float-rounding fold: a tiny change judged on its own (stepwise)."""

    name = "round"
    stepwise = True
    tolerance = Tolerance(min_sqnr_db=80.0)
    factor: float = option(1.0000001, "scale")


@dataclasses.dataclass
class RenameOutput(GraphPass):
    """Test pass that breaks the signature."""

    name = "rename-output"

    def call(self, model: ir.Model) -> PassResult:
        model.graph.outputs[0].name = "renamed"
        return PassResult(model, modified=True)


def test_lossy_within_budget_is_verified() -> None:
    model, report = graphopt.optimize(from_text(MLP), [ScaleWeights(factor=1.001)])
    (record,) = report.records
    assert record.verdict == "ok"
    assert 55 < record.to_json()["sqnr_db"] < 65  # 20*log10(1/0.001) = 60 dB
    assert report.verified and model.metadata_props[VERIFIED_KEY] == "true"


def test_lossy_over_budget_fails_naming_pass_and_output() -> None:
    with pytest.raises(VerificationError) as info:
        graphopt.optimize(from_text(MLP), [ScaleWeights(factor=1.5)])
    message = str(info.value)
    assert "pass 'scale-weights'" in message and "output 'y'" in message and "SQNR" in message


def test_budget_option_overrides_default() -> None:
    _, report = graphopt.optimize(from_text(MLP), [ScaleWeights(factor=1.5, budget_min_sqnr=5.0)])
    assert report.records[0].verdict == "ok"
    with pytest.raises(VerificationError):
        graphopt.optimize(from_text(MLP), [ScaleWeights(factor=1.001, budget_min_sqnr=70.0)])


def test_global_tolerance_applies_to_lossy_passes_only() -> None:
    _, report = graphopt.optimize(from_text(MLP), [ScaleWeights(factor=1.5)], tolerance=Tolerance(min_sqnr_db=5.0))
    assert report.records[0].verdict == "ok"
    with pytest.raises(VerificationError, match="pass 'nudge'"):
        graphopt.optimize(from_text(MLP), [Nudge(factor=1.0001)], tolerance=Tolerance(min_sqnr_db=5.0))


def test_stepwise_pass_is_judged_on_its_own_change() -> None:
    """After a 40 dB lossy pass, a fold with an 80 dB noise-floor budget is held to its own change,
    not to the distance to the input model (which only the lossy pass answers for)."""
    _, report = graphopt.optimize(from_text(MLP), [ScaleWeights(factor=1.01), Round()])
    assert [r.verdict for r in report.records] == ["ok", "ok"]
    assert report.records[1].to_json()["sqnr_db"] < 60  # end to end it is far from the input model
    with pytest.raises(VerificationError, match=r"pass 'round'.*exact level.*SQNR"):
        graphopt.optimize(from_text(MLP), [Round(factor=1.001)])  # 60 dB of its own: over its budget


def test_lossless_pass_must_be_bit_exact() -> None:
    with pytest.raises(VerificationError, match=r"pass 'nudge'.*exact level.*max abs error"):
        graphopt.optimize(from_text(MLP), [Nudge(factor=1.0001)])


def test_rollback_restores_model_and_goes_on() -> None:
    source = from_text(MLP)
    pipeline = [ScaleWeights(factor=1.5), ScaleWeights(factor=1.001)]
    model, report = graphopt.optimize(source, pipeline, on_violation="rollback")
    first, second = report.records
    assert first.verdict == "rolled-back" and first.to_json()["rolled_back"] is True and first.to_json()["verified"] is False
    assert second.verdict == "ok"
    w = model.graph.initializers["w"].const_value.numpy()
    np.testing.assert_array_equal(w, source.graph.initializers["w"].const_value.numpy() * np.float32(1.001))
    # the stamped pipeline is what was really applied: the rolled-back pass is left out
    assert model.metadata_props[PIPELINE_KEY] == "scale-weights{factor=1.001}"
    assert not report.verified


def test_input_model_never_modified() -> None:
    source = from_text(MLP)
    before = ir.to_proto(source).SerializeToString()
    graphopt.optimize(source, [ScaleWeights(factor=1.001)])
    proto = ir.to_proto(source)
    proto.ClearField("metadata_props")
    assert proto.SerializeToString() == before


def test_signature_change_is_a_pass_failure() -> None:
    with pytest.raises(PassFailed, match="pass 'rename-output' changed the model signature: lost output 'y'"):
        graphopt.optimize(from_text(MLP), [RenameOutput()])


def test_report_json_keys() -> None:
    _, report = graphopt.optimize(str(MODELS / "digits_cnn.onnx"), "dce,lift-constants", inputs=str(MODELS / "digits_cnn_test.npz"))
    data = json.loads(json.dumps(report.to_json()))
    keys = {
        "pass", "options", "nodes_before", "nodes_after", "params_before", "params_after", "bytes_before",
        "bytes_after", "seconds", "max_abs_error", "max_rel_error", "sqnr_db", "cosine", "verified",
    }
    for entry in data["passes"]:
        assert keys <= set(entry)
    assert data["summary"]["verified"] is True
    assert data["summary"]["samples"] == 1  # the npz holds one batch of 360 images


def test_stamps_pipeline_and_version() -> None:
    model, _ = graphopt.optimize(from_text(MLP), "dce,lift-constants{min-elements=4}")
    assert model.metadata_props[PIPELINE_KEY] == "dce,lift-constants{min-elements=4,all-forms=false}"
    assert model.metadata_props["graphopt.version"] == graphopt.__version__


def test_no_verify_is_recorded() -> None:
    model, report = graphopt.optimize(from_text(MLP), [ScaleWeights(factor=2.0)], verify=False)
    assert report.records[0].verdict == "not-verified"
    assert model.metadata_props[VERIFIED_KEY] == "false" and not report.verified


def test_accepts_proto_path_and_ir_model(tmp_path) -> None:
    proto = ir.to_proto(from_text(MLP))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    for source in (proto, str(path), from_text(MLP)):
        model, report = graphopt.optimize(source, "dce")
        assert isinstance(model, ir.Model) and report.verified


def test_repeat_stops_when_nothing_changes() -> None:
    _, report = graphopt.optimize(from_text(MLP), "repeat{n=5}(dce,lift-constants)")
    assert [r.iteration for r in report.records] == [1, 1]


def test_lossless_pass_after_deploy_fusion_is_judged_against_the_same_level() -> None:
    """int4 weights become MatMulNBits at ORT's default level (int8 activations), tens of dB away from
    the exact level; a later lossless pass must not be blamed for that gap."""
    model, report = graphopt.optimize(
        str(MODELS / "digits_mlp_wide.onnx"), "quantize-weights{bits=4,block-size=32},remove-dropout", inputs=str(MODELS / "digits_mlp_wide_test.npz")
    )
    quantized, cleanup = report.records
    assert quantized.verdict == "ok" and cleanup.modified
    assert cleanup.to_json()["deploy"]["sqnr_db"] < 80  # the fusion's own gap: vs the reference, far from bit-exact
    assert cleanup.verdict == "ok", cleanup.violations


@pytest.mark.parametrize(
    ("dtype", "scale", "ok"),
    [("float16", "0.33325", True), ("float16", "0.34", False), ("float", "0.33333334", False)],
    ids=["float16-reciprocal", "float16-wrong", "float32-reciprocal"],
)
def test_lossless_check_on_float16_outputs_allows_rounding_placement_only(dtype: str, scale: str, ok: bool) -> None:
    """A lossless pass is bit-exact on float32 outputs; on float16 ones onnxruntime's own Cast
    placement moves roundings, so a few float16 steps at SQNR >= 50 dB pass (x/3 -> x*0.33325, one
    rounding apart) and a change of meaning (x*0.34) does not."""
    from graphopt.verify import Verifier

    head = f'<ir_version: 9, opset_import: ["" : 17]> g ({dtype}[4,64] x) => ({dtype}[4,64] y)'
    to = 10 if dtype == "float16" else 1
    before = from_text(head + f" {{ c = Constant<value=float[1] {{3}}>()  t = Cast<to={to}>(c)  h = Tanh(x)  y = Div(h, t) }}")
    after = from_text(head + f" {{ c = Constant<value=float[1] {{{scale}}}>()  t = Cast<to={to}>(c)  h = Tanh(x)  y = Mul(h, t) }}")
    np_type = np.float16 if dtype == "float16" else np.float32
    samples = [{"x": (np.random.default_rng(k).standard_normal((4, 64)) * 2).astype(np_type)} for k in range(3)]
    check = Verifier(before, samples).check(after, lossless=True, budget=Tolerance.exact())
    assert (not check.violations) == ok, check.violations
    if dtype == "float16":
        assert check.vs_previous[0].max_abs > 0  # not bit-exact: the float16 allowance is what passes it
