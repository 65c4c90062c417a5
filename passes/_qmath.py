"""Quantization arithmetic shared by the quantize passes: types, scales and zero points, rounding.

Everything follows the ONNX operator spec of ``QuantizeLinear``/``DequantizeLinear``:
``q = saturate(round_half_to_even(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``,
with the division and the product done in the scale's float type (float32 here), so what we
compute offline is bit-identical to what ORT's (and onnx.reference's) kernels compute.

Layouts: per-tensor (scalar scale), per-axis (1-D scale along ``axis``), blocked (scale of the
input's rank with ``axis`` shrunk to ``ceil(D / block_size)``, opset 21).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir


@dataclasses.dataclass(frozen=True)
class QType:
    """An integer type a tensor is quantized to."""

    name: str
    dtype: ir.DataType
    numpy: type
    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def symmetric_range(self) -> tuple[int, int, int]:
        """(lo, hi, zero point) of symmetric quantization: -127..127 around 0 for int8, 1..255 around 128 for uint8."""
        half = (1 << (self.bits - 1)) - 1
        mid = 0 if self.signed else 1 << (self.bits - 1)
        return mid - half, mid + half, mid


QTYPES = {
    "int8": QType("int8", ir.DataType.INT8, np.int8, 8, True),
    "uint8": QType("uint8", ir.DataType.UINT8, np.uint8, 8, False),
    "int4": QType("int4", ir.DataType.INT4, ml_dtypes.int4, 4, True),
    "uint4": QType("uint4", ir.DataType.UINT4, ml_dtypes.uint4, 4, False),
    "int32": QType("int32", ir.DataType.INT32, np.int32, 32, True),
}


def qtype(bits: int, signed: bool) -> QType:
    return QTYPES[f"{'' if signed else 'u'}int{bits}"]


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qt: QType) -> np.ndarray:
    """The spec's QuantizeLinear on already-broadcast parameters (float32 division, half to even, saturate)."""
    x32 = np.asarray(x, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.rint(x32 / np.asarray(scale, dtype=np.float32)).astype(np.float64) + np.asarray(zero_point, dtype=np.float64)
    return np.clip(r, qt.qmin, qt.qmax).astype(qt.numpy)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """The spec's DequantizeLinear on already-broadcast parameters (float32)."""
    diff = np.asarray(q, dtype=np.int64) - np.asarray(zero_point, dtype=np.int64)
    return (diff.astype(np.float32) * np.asarray(scale, dtype=np.float32)).astype(np.float32)


def scale_zero_point(rmin: np.ndarray | float, rmax: np.ndarray | float, qt: QType, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (qt) covering ``[rmin, rmax]``; 0.0 is always exactly representable.

    Symmetric: ``scale = max(|rmin|, |rmax|) / half`` with half = 127 (int8) or 7 (int4), zero point
    0 (signed) or 128/8 (unsigned). Asymmetric: the range is widened to include 0, ``scale =
    (rmax - rmin) / (qmax - qmin)`` and ``zero_point = round(qmin - rmin / scale)``. An all-zero
    range gets scale 1.
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if symmetric:
        lo, hi, mid = qt.symmetric_range()
        absmax = np.maximum(-rmin, rmax)
        scale = absmax / ((hi - lo) / 2)
        zp = np.full(scale.shape, mid, dtype=np.float64)
    else:
        scale = (rmax - rmin) / (qt.qmax - qt.qmin)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale > 0, np.rint(qt.qmin - rmin / np.where(scale > 0, scale, 1.0)), qt.qmin)
        zp = np.clip(zp, qt.qmin, qt.qmax)
    scale32 = scale.astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    scale32 = np.where(scale32 > tiny, scale32, np.float32(1.0)).astype(np.float32)  # all-zero (or denormal) range
    return scale32, zp.astype(qt.numpy)


def expand(param: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int = 0) -> np.ndarray:
    """A per-tensor / per-axis / blocked parameter broadcast to the full tensor ``shape``."""
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return np.broadcast_to(param.reshape(()), shape)
    axis = axis % len(shape)
    if block_size:
        return np.repeat(param, block_size, axis=axis).take(range(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(param.reshape(view), shape)


def _group_extrema(w: np.ndarray, axis: int | None, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Min and max per quantization group, in the parameter's own shape (scalar, [D] or blocked)."""
    if axis is None:
        return np.asarray(w.min(initial=0.0)), np.asarray(w.max(initial=0.0))
    axis = axis % w.ndim
    if not block_size:
        others = tuple(i for i in range(w.ndim) if i != axis)
        return w.min(axis=others, initial=0.0), w.max(axis=others, initial=0.0)
    d = w.shape[axis]
    nb = math.ceil(d / block_size)
    moved = np.moveaxis(w, axis, 0)
    pad = nb * block_size - d
    if pad:
        moved = np.concatenate([moved, np.zeros((pad, *moved.shape[1:]), moved.dtype)], axis=0)  # zeros never widen a range
    blocks = moved.reshape(nb, block_size, *moved.shape[1:])
    return np.moveaxis(blocks.min(axis=1), 0, axis), np.moveaxis(blocks.max(axis=1), 0, axis)


def _as_groups(x: np.ndarray, axis: int | None, block_size: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """``x`` as ``[groups, elements]`` (blocks zero-padded), and the two maps between a parameter
    (one value per group, in its own shape) and a flat ``[groups]`` vector in the same order."""
    if axis is None:
        return x.reshape(1, -1), lambda p: np.reshape(p, 1), lambda v: v.reshape(())
    axis = axis % x.ndim
    if not block_size:
        return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1), lambda p: p, lambda v: v
    moved = np.moveaxis(x, axis, -1)
    nb = math.ceil(moved.shape[-1] / block_size)
    padded = np.concatenate([moved, np.zeros((*moved.shape[:-1], nb * block_size - moved.shape[-1]), x.dtype)], axis=-1)
    return (padded.reshape(-1, block_size), lambda p: np.moveaxis(p, axis, -1).reshape(-1),
            lambda v: np.moveaxis(v.reshape(*moved.shape[:-1], nb), -1, axis))  # fmt: skip


@dataclasses.dataclass
class QuantizedWeight:
    q: np.ndarray  # in qt.numpy
    scale: np.ndarray  # float32, parameter shape
    zero_point: np.ndarray  # qt.numpy, parameter shape
    qt: QType
    axis: int | None
    block_size: int = 0

    def dequantized(self) -> np.ndarray:
        shape = self.q.shape
        return dequantize(self.q, expand(self.scale, shape, self.axis, self.block_size), expand(self.zero_point, shape, self.axis, self.block_size))


SEARCH_GRID = np.linspace(0.5, 1.0, 26)
"""Range shrink factors tried by the MSE-optimal search (1.0 = plain min/max)."""
SEARCH_CHUNK = 1 << 21
"""Candidate elements (factors x weights) the search quantizes at once: bounds its memory."""


def quantize_weight(
    w: np.ndarray, qt: QType, *, axis: int | None, block_size: int = 0, symmetric: bool = True, search: bool = False
) -> QuantizedWeight:
    """Round-to-nearest quantization of a constant weight; with ``search``, each group's range is
    shrunk by the factor in :data:`SEARCH_GRID` that minimizes its squared reconstruction error
    (ties: the full range, then the smaller factor)."""
    w = np.asarray(w, dtype=np.float32)
    lo, hi = _group_extrema(w, axis, block_size)
    if search:
        factor = _best_shrink(w, lo, hi, qt, axis, block_size, symmetric)
        lo, hi = lo * factor, hi * factor
    return _quantize_with(w, lo, hi, qt, axis, block_size, symmetric)


def _best_shrink(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, qt: QType, axis: int | None, block_size: int, symmetric: bool) -> np.ndarray:
    """Per group, the :data:`SEARCH_GRID` factor with the least squared error, in the parameters'
    shape; all factors of a chunk are quantized in one array operation (a loop over the 26
    factors was most of int4 GPTQ's MSE scale search)."""
    groups, flat, shaped = _as_groups(w, axis, block_size)
    lo_g, hi_g = (flat(np.asarray(v, np.float64)) for v in (lo, hi))
    factors = np.concatenate([SEARCH_GRID[-1:], SEARCH_GRID[:-1]])  # 1.0 first: it wins ties
    best_err = np.full(len(groups), np.inf)
    best = np.ones(len(groups))
    step = max(1, SEARCH_CHUNK // max(groups.size, 1))
    for start in range(0, len(factors), step):
        f = factors[start : start + step, None]
        scale, zp = scale_zero_point(lo_g * f, hi_g * f, qt, symmetric)
        s, z = scale[..., None], zp[..., None].astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):  # quantize and dequantize in float32: the same numbers, no integer round trips
            levels = np.clip(np.rint(groups / s) + z, qt.qmin, qt.qmax)
        err = (((levels - z) * s - groups).astype(np.float64) ** 2).sum(axis=-1)
        pick = err.argmin(axis=0)
        err = err[pick, np.arange(len(groups))]
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, f[pick, 0], best)
    return shaped(best)


def _quantize_with(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, qt: QType, axis: int | None, block_size: int, symmetric: bool) -> QuantizedWeight:
    scale, zp = scale_zero_point(lo, hi, qt, symmetric)
    s_full, z_full = expand(scale, w.shape, axis, block_size), expand(zp, w.shape, axis, block_size)
    return QuantizedWeight(quantize(w, s_full, z_full, qt), scale, zp, qt, axis, block_size)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2); inf when equal."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(approx, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def pack_matmulnbits(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``com.microsoft.MatMulNBits`` inputs from a uint4 weight ``[K, N]`` blocked along K (axis 0).

    Returns B ``uint8 [N, n_blocks, block_size / 2]`` (low nibble first, K zero-padded to whole blocks
    with the block's zero point, so padding dequantizes to 0), scales ``float32 [N * n_blocks]`` and
    packed zero points ``uint8 [N * ceil(n_blocks / 2)]``.
    """
    assert qw.qt.name == "uint4" and qw.axis == 0 and qw.block_size and qw.q.ndim == 2
    k, n = qw.q.shape
    bs = qw.block_size
    nb = math.ceil(k / bs)
    q = np.asarray(qw.q, dtype=np.uint8).T  # [N, K]
    zp = np.asarray(qw.zero_point, dtype=np.uint8).T  # [N, nb]
    padded = np.repeat(zp, bs, axis=1)  # [N, nb * bs]
    padded[:, :k] = q
    nibbles = padded.reshape(n, nb, bs)
    packed = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)
    scales = np.ascontiguousarray(np.asarray(qw.scale, dtype=np.float32).T).reshape(-1)
    if nb % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    zp_packed = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return packed, scales, zp_packed
