"""fold-conv-bias: Conv + per-channel constant Add becomes Conv with a bias (bit-exact unless a bias was
already there); everything else is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphopt
from graphopt.passes.conv_bias import FoldConvBias

from conftest import assert_valid, feeds, outputs

W = ",".join(str(v) for v in np.random.default_rng(0).standard_normal(4 * 3 * 9).round(3))


def model(add_shape: str, add_values: int, *, bias: bool = False, extra_use: bool = False, transpose: bool = False) -> ir.Model:
    values = ",".join(str(0.5 * (i + 1)) for i in range(add_values))
    conv = "ConvTranspose" if transpose else "Conv"
    wshape = "[3, 4, 3, 3]" if transpose else "[4, 3, 3, 3]"
    outputs_ = "float[1, 4, 6, 6] y" + (", float[1, 4, 6, 6] c" if extra_use else "")
    side, pad = (4, 0) if transpose else (6, 1)  # both give a 6x6 output
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, {side}, {side}] x) => ({outputs_})
    <float{wshape} w = {{{W}}}, float{add_shape} a = {{{values}}}{', float[4] b = {1, 2, 3, 4}' if bias else ''}> {{
        c = {conv}<pads = [{pad}, {pad}, {pad}, {pad}]>(x, w{', b' if bias else ''})
        y = Add(c, a)
    }}"""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


@pytest.mark.parametrize(
    ("shape", "n", "kwargs"),
    [("[1, 4, 1, 1]", 4, {}), ("[4, 1, 1]", 4, {}), ("[1]", 1, {}), ("[1, 4, 1, 1]", 4, {"bias": True}), ("[1, 4, 1, 1]", 4, {"transpose": True})],
    ids=["nchw", "chw", "scalar", "existing-bias", "conv-transpose"],
)
def test_folds_bit_exact(shape: str, n: int, kwargs: dict) -> None:
    m = model(shape, n, **kwargs)
    data = feeds(m)
    reference = outputs(m, data)
    result = FoldConvBias()(m)
    assert result.modified and result.stats == {"folded": 1}
    assert [node.op_type for node in m.graph] == ["ConvTranspose" if kwargs.get("transpose") else "Conv"]
    assert m.graph.outputs[0].name == "y"
    assert_valid(m)
    for r, g in zip(reference, outputs(m, data)):
        if kwargs.get("bias"):  # (conv + b) + a vs conv + (b + a): float rounding, within the stated tolerance
            np.testing.assert_allclose(g["y"], r["y"], atol=1e-5, rtol=1e-4)
        else:  # the bias is added after the sums, as the Add was: bit for bit
            np.testing.assert_array_equal(r["y"], g["y"])
    assert not FoldConvBias()(m).modified


@pytest.mark.parametrize(
    ("shape", "n", "kwargs", "reason"),
    [("[1, 4, 6, 6]", 144, {}, "not_per_channel"), ("[1, 4, 1, 1]", 4, {"extra_use": True}, "conv_output_shared")],
)
def test_leaves_alone(shape: str, n: int, kwargs: dict, reason: str) -> None:
    m = model(shape, n, **kwargs)
    result = FoldConvBias()(m)
    assert not result.modified and result.stats == {reason: 1}


def test_in_cleanup_preset_verified() -> None:
    m = model("[1, 4, 1, 1]", 4)
    _, report = graphopt.optimize(m, "cleanup")
    record = next(r for r in report.records if r.name == "fold-conv-bias" and r.modified)
    assert record.verdict == "ok" and record.to_json()["bit_exact"] is True
