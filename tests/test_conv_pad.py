"""fold-pad-into-conv: a zero constant Pad of the spatial axes becomes the Conv's own pads, bit-exact at
any input size; every other Pad is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt.passes.conv_pad import FoldPadIntoConv

from conftest import assert_valid, outputs

W = ",".join(str(v) for v in np.random.default_rng(0).standard_normal(4 * 1 * 9).round(3))


def model(pad: str, *, opset: int = 17, conv_attrs: str = "group = 4", inits: str = "", extra_out: bool = False, weight: str = W) -> ir.Model:
    outs = "float[N, 4, H2, W2] y" + (", float[N, 4, H1, W1] p" if extra_out else "")
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N, 4, H, W] x) => ({outs}) <float[4, 1, 3, 3] w = {{{weight}}}{inits}> {{
        p = {pad}
        y = Conv<{conv_attrs}>(p, w)
    }}"""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def sizes() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for shape in ((1, 4, 7, 9), (2, 4, 12, 5), (1, 4, 3, 3))]


CASES = {
    "input-pads": ("Pad(x, pads)", 17, ", int64[8] pads = {0, 0, 1, 2, 0, 0, 1, 0}", "group = 4"),
    "zero-value-and-conv-pads": ("Pad(x, pads, v)", 17, ", int64[8] pads = {0, 0, 0, 1, 0, 0, 2, 1}, float v = {0}", "group = 4, pads = [1, 1, 0, 0]"),
    "axes-opset18": ("Pad(x, pads, v, axes)", 18, ", int64[4] pads = {1, 1, 1, 1}, float v = {0}, int64[2] axes = {-2, 3}", "group = 4"),
    "attribute-opset10": ("Pad<pads = [0, 0, 1, 1, 0, 0, 1, 1]>(x)", 10, "", "group = 4"),
}


@pytest.mark.parametrize("case", CASES)
def test_folds_bit_exact_at_every_size(case: str) -> None:
    pad, opset, inits, attrs = CASES[case]
    m = model(pad, opset=opset, inits=inits, conv_attrs=attrs)
    data = sizes()
    reference = outputs(m, data)
    result = FoldPadIntoConv()(m)
    assert result.modified and result.stats == {"folded": 1}
    assert [n.op_type for n in m.graph] == ["Conv"] and m.graph.initializers.keys() == {"w"}
    assert_valid(m)
    for r, g in zip(reference, outputs(m, data)):
        np.testing.assert_array_equal(r["y"], g["y"])
    for r, g in zip(reference, outputs(m, data, "deploy")):  # ORT's NCHWc kernels skip padded taps instead
        np.testing.assert_allclose(g["y"], r["y"], rtol=1e-6, atol=1e-6)
    assert not FoldPadIntoConv()(m).modified


NEGATIVE = {
    "reflect": (dict(pad="Pad<mode = \"reflect\">(x, pads)", inits=", int64[8] pads = {0, 0, 1, 1, 0, 0, 1, 1}"), "mode_reflect"),
    "nonzero-fill": (dict(pad="Pad(x, pads, v)", inits=", int64[8] pads = {0, 0, 1, 1, 0, 0, 1, 1}, float v = {1}"), "fill_not_zero"),
    "channel-axis": (dict(pad="Pad(x, pads)", inits=", int64[8] pads = {0, 1, 1, 1, 0, 0, 1, 1}", conv_attrs="group = 1"), "pads_not_spatial_constant"),
    "crop": (dict(pad="Pad(x, pads)", inits=", int64[8] pads = {0, 0, -1, 1, 0, 0, 1, 1}"), "pads_not_spatial_constant"),
    "shared-output": (dict(pad="Pad(x, pads)", inits=", int64[8] pads = {0, 0, 1, 1, 0, 0, 1, 1}", extra_out=True), "pad_output_shared"),
    "inf-weight": (dict(pad="Pad(x, pads)", inits=", int64[8] pads = {0, 0, 1, 1, 0, 0, 1, 1}", weight="inf," + W.split(",", 1)[1]), "weight_not_constant_finite"),
    "auto-pad": (dict(pad="Pad(x, pads)", inits=", int64[8] pads = {0, 0, 1, 1, 0, 0, 1, 1}", conv_attrs="group = 4, auto_pad = \"SAME_UPPER\""), "conv_auto_pad"),
}


@pytest.mark.parametrize("case", NEGATIVE)
def test_leaves_alone_what_it_cannot_prove(case: str) -> None:
    kwargs, reason = NEGATIVE[case]
    m = model(**kwargs)
    result = FoldPadIntoConv()(m)
    assert not result.modified and result.stats == {reason: 1}
    assert [n.op_type for n in m.graph] == ["Pad", "Conv"]


def test_computed_pads_are_left_alone() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4, 5, 5] x, int64[8] pads) => (float[1, 4, 5, 5] y) <float[4, 1, 3, 3] w = {%s}> {
        p = Pad(x, pads)
        y = Conv<group = 4>(p, w)
    }""" % W
    m = ir.from_proto(onnx.parser.parse_model(text))
    assert FoldPadIntoConv()(m).stats == {"pads_not_spatial_constant": 1}
