"""fold-conv-scale: Conv + per-channel constant Mul becomes Conv with scaled weights and bias (within
fold-batchnorm's tolerance); everything else is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt.passes.conv_scale import FoldConvScale

from conftest import assert_valid, assert_within, feeds, outputs

W = ",".join(str(v) for v in np.random.default_rng(1).standard_normal(4 * 3 * 9).round(3))


def model(mul_shape: str, mul_values: int, *, bias: bool = False, extra_use: bool = False, transpose: bool = False, scale_first: bool = False) -> ir.Model:
    values = ",".join(str(0.5 * (i + 1) - 1.3) for i in range(mul_values))
    conv = "ConvTranspose" if transpose else "Conv"
    wshape = "[3, 4, 3, 3]" if transpose else "[4, 3, 3, 3]"
    outputs_ = "float[1, 4, 6, 6] y" + (", float[1, 4, 6, 6] c" if extra_use else "")
    side, pad = (4, 0) if transpose else (6, 1)
    mul = "Mul(s, c)" if scale_first else "Mul(c, s)"
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, {side}, {side}] x) => ({outputs_})
    <float{wshape} w = {{{W}}}, float{mul_shape} s = {{{values}}}{', float[4] b = {1, 2, 3, 4}' if bias else ''}> {{
        c = {conv}<pads = [{pad}, {pad}, {pad}, {pad}]>(x, w{', b' if bias else ''})
        y = {mul}
    }}"""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


@pytest.mark.parametrize(
    "shape,n,kwargs",
    [("[1, 4, 1, 1]", 4, {}), ("[4, 1, 1]", 4, {"scale_first": True}), ("[1]", 1, {}), ("[1, 4, 1, 1]", 4, {"bias": True})],
    ids=["nchw", "chw-scale-first", "scalar", "with-bias"],
)
def test_folds_within_tolerance(shape: str, n: int, kwargs: dict) -> None:
    m = model(shape, n, **kwargs)
    data = feeds(m)
    reference = outputs(m, data)
    result = FoldConvScale()(m)
    assert result.stats == {"folded": 1}
    assert [node.op_type for node in m.graph] == ["Conv"] and m.graph.outputs[0].name == "y"
    assert_valid(m)
    assert_within(m, data, reference, FoldConvScale.tolerance)
    assert not FoldConvScale()(m).modified


@pytest.mark.parametrize(
    "shape,n,kwargs,reason",
    [
        ("[1, 4, 6, 6]", 144, {}, "not_per_channel"),
        ("[1, 4, 1, 1]", 4, {"extra_use": True}, "conv_output_shared"),
        ("[1, 4, 1, 1]", 4, {"transpose": True}, None),
    ],
    ids=["spatial", "shared", "conv-transpose"],
)
def test_leaves_alone(shape: str, n: int, kwargs: dict, reason: str | None) -> None:
    m = model(shape, n, **kwargs)
    result = FoldConvScale()(m)
    assert not result.modified and result.stats == ({reason: 1} if reason else {})
