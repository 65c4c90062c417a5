"""Scale/zero-point math of the quantize passes against the ONNX spec, onnx.reference and onnxruntime."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx.reference
import onnxruntime as ort
import pytest

from graphopt.passes._calibrate import tensor_range
from graphopt.passes._qmath import QTYPES, SEARCH_GRID, dequantize, expand, pack_matmulnbits, quantize, quantize_weight, scale_zero_point

ONNX_TYPE = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8, "int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}


def _ties(qt_name: str) -> np.ndarray:
    """Values landing exactly on .5 after division by 0.5, both signs, and far out of range."""
    return np.array([0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 2.25, 1e6, -1e6, 0.0, 3.3, -7.9], dtype=np.float32)


def test_round_half_to_even_and_saturation() -> None:
    qt = QTYPES["int8"]
    q = quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0], np.float32), np.float32(1.0), np.int8(0), qt)
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]
    qu = quantize(np.array([0.5, 1.5, -10.0, 1000.0], np.float32), np.float32(1.0), np.uint8(3), QTYPES["uint8"])
    assert qu.tolist() == [3, 5, 0, 255]  # 0+3, 2+3, saturated low, saturated high
    q4 = quantize(np.array([7.5, -8.5, 6.5, 100.0], np.float32), np.float32(1.0), np.int8(0), QTYPES["int4"])
    assert np.asarray(q4, dtype=np.int8).tolist() == [7, -8, 6, 7]


@pytest.mark.parametrize("name", ["int8", "uint8", "int4", "uint4"])
def test_quantize_matches_onnx_reference_and_onnxruntime(name: str) -> None:
    qt = QTYPES[name]
    x = _ties(name)
    scale = np.float32(0.5)
    zp = np.array(qt.symmetric_range()[2], dtype=qt.numpy)
    ours = quantize(x, scale, zp, qt)
    zp_tensor = onnx.helper.make_tensor("z", ONNX_TYPE[name], [], [int(zp)])
    opset = 21 if qt.bits == 4 else 13
    nodes = [onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), onnx.helper.make_node("Cast", ["q"], ["y"], to=onnx.TensorProto.INT32)]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [len(x)])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [len(x)])],
        [onnx.numpy_helper.from_array(np.array(scale), "s"), zp_tensor],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 10
    reference = onnx.reference.ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert np.array_equal(np.asarray(ours, np.int32), reference)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(np.asarray(ours, np.int32), got)
    back = dequantize(ours, scale, zp)
    assert back.dtype == np.float32 and np.array_equal(back, (np.asarray(ours, np.int32) - int(zp)).astype(np.float32) * scale)


@pytest.mark.parametrize("name", ["int8", "uint8", "int4", "uint4"])
def test_scale_zero_point_symmetric_and_asymmetric(name: str) -> None:
    qt = QTYPES[name]
    lo, hi, mid = qt.symmetric_range()
    scale, zp = scale_zero_point(np.float32(-3.0), np.float32(2.0), qt, symmetric=True)
    assert zp == mid and np.isclose(scale, 3.0 / ((hi - lo) / 2))
    scale, zp = scale_zero_point(np.float32(-1.0), np.float32(3.0), qt, symmetric=False)
    assert np.isclose(scale, 4.0 / (qt.qmax - qt.qmin))
    # zero is exact: quantizing 0.0 gives the zero point, which dequantizes back to 0.0
    assert dequantize(quantize(np.float32(0.0), scale, zp, qt), scale, zp) == 0.0
    scale, zp = scale_zero_point(np.float32(0.5), np.float32(2.0), qt, symmetric=False)  # range widened to 0
    assert zp == qt.qmin
    scale, zp = scale_zero_point(np.float32(0.0), np.float32(0.0), qt, symmetric=False)
    assert scale == 1.0  # empty range: no division by zero


def test_per_channel_and_blocked_parameters_have_spec_shapes() -> None:
    w = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    per_axis = quantize_weight(w, QTYPES["int8"], axis=1)
    assert per_axis.scale.shape == (6,)
    assert np.allclose(per_axis.scale, np.abs(w).max(axis=0) / 127)
    blocked = quantize_weight(w, QTYPES["int4"], axis=0, block_size=16)
    assert blocked.scale.shape == (3, 6)  # ceil(40 / 16) blocks along axis 0
    assert np.allclose(blocked.scale[2], np.abs(w[32:]).max(axis=0) / 7)  # the last, partial block
    assert expand(blocked.scale, w.shape, 0, 16).shape == w.shape
    search = quantize_weight(w, QTYPES["int4"], axis=0, block_size=16, search=True)
    err = lambda qw: float(np.sum((qw.dequantized() - w) ** 2))  # noqa: E731
    assert err(search) <= err(blocked)


@pytest.mark.parametrize(("axis", "block", "qt_name", "symmetric"), [(None, 0, "int8", True), (0, 0, "int4", True), (1, 0, "uint8", False), (1, 16, "int4", True), (0, 16, "uint4", False)])
def test_mse_search_takes_each_groups_best_factor(axis: int | None, block: int, qt_name: str, symmetric: bool) -> None:
    """Each group (tensor, row/column, block; the last block partial) gets the range factor of
    SEARCH_GRID with its least squared error, as a brute force over the groups one by one finds it."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((40, 50)) * rng.uniform(0.1, 2.0, (40, 1))).astype(np.float32)
    qt = QTYPES[qt_name]
    got = quantize_weight(w, qt, axis=axis, block_size=block, symmetric=symmetric, search=True).dequantized()
    rows, cols = w.shape
    groups = {
        (None, 0): [np.s_[:, :]],
        (0, 0): [np.s_[i, :] for i in range(rows)],
        (1, 0): [np.s_[:, j] for j in range(cols)],
        (1, 16): [np.s_[i, j : j + 16] for i in range(rows) for j in range(0, cols, 16)],
        (0, 16): [np.s_[i : i + 16, j] for i in range(0, rows, 16) for j in range(cols)],
    }[axis, block]
    for index in groups:
        g = w[index]
        errs = []
        for f in SEARCH_GRID:
            s, z = scale_zero_point(g.min() * f, g.max() * f, qt, symmetric)
            errs.append(float(np.sum((dequantize(quantize(g, s, z, qt), s, z) - g).astype(np.float64) ** 2)))
        assert float(np.sum((got[index] - g).astype(np.float64) ** 2)) == min(errs), index


def test_pruned_zeros_stay_zero() -> None:
    w = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    w[::2] = 0.0
    for sym in (True, False):
        qw = quantize_weight(w, QTYPES["uint4"], axis=0, block_size=16, symmetric=sym)
        assert np.all(qw.dequantized()[::2] == 0.0)


def test_matmulnbits_packing_roundtrip() -> None:
    w = np.random.default_rng(2).standard_normal((40, 3)).astype(np.float32)
    qw = quantize_weight(w, QTYPES["uint4"], axis=0, block_size=16, symmetric=False)
    packed, scales, zp = pack_matmulnbits(qw)
    assert packed.shape == (3, 3, 8) and scales.shape == (9,) and zp.shape == (6,)
    lo_nibble = packed[0, 0, 0] & 0x0F
    assert lo_nibble == int(np.asarray(qw.q, np.uint8)[0, 0])
    assert (zp[0] & 0x0F) == int(np.asarray(qw.zero_point, np.uint8)[0, 0])
    assert ml_dtypes.uint4 is QTYPES["uint4"].numpy


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_calibration_ranges(method: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(20000).astype(np.float32)
    x[0] = 40.0  # one outlier
    lo, hi = tensor_range([x], method, QTYPES["uint8"])
    assert lo < 0 < hi <= 40.0
    if method == "minmax":
        assert hi == 40.0
    else:
        assert hi < 40.0  # the outlier is clipped
    relu = np.maximum(x, 0)
    lo, hi = tensor_range([relu], method, QTYPES["uint8"])
    assert lo == 0.0 and hi > 0
