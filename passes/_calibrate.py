"""Activation ranges from calibration data: minmax, percentile, entropy (KL) and MSE-optimal clipping.

Each method sees every calibration value of one tensor and returns the ``[rmin, rmax]`` its
QuantizeLinear will cover (widened to include 0 by the scale math). Large tensors are subsampled
with a fixed seed so calibration stays cheap and deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from graphopt.passes._qmath import QType, dequantize, quantize, scale_zero_point

Method = Literal["minmax", "percentile", "entropy", "mse"]
MAX_VALUES = 1 << 21
"""Values kept per tensor for percentile/entropy/mse (subsampled uniformly beyond this)."""


def tensor_range(arrays: Sequence[np.ndarray], method: Method, qt: QType, *, percentile: float = 99.999) -> tuple[float, float]:
    """``(rmin, rmax)`` for one activation tensor over all calibration samples."""
    lo = float(min(np.min(a) for a in arrays if a.size)) if any(a.size for a in arrays) else 0.0
    hi = float(max(np.max(a) for a in arrays if a.size)) if any(a.size for a in arrays) else 0.0
    if method == "minmax" or lo == hi:
        return lo, hi
    x = _values(arrays)
    if method == "percentile":
        return (float(np.percentile(x, 100 - percentile)) if lo < 0 else lo), float(np.percentile(x, percentile))
    if method == "mse":
        return _mse_range(x, lo, hi, qt)
    if method == "entropy":
        return _entropy_range(x, lo, hi, qt)
    raise ValueError(f"unknown calibration method '{method}'")


def _values(arrays: Sequence[np.ndarray]) -> np.ndarray:
    x = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])
    if x.size > MAX_VALUES:
        x = np.random.default_rng(0).choice(x, MAX_VALUES, replace=False)
    return x


def _qdq_error(x: np.ndarray, lo: float, hi: float, qt: QType) -> float:
    scale, zp = scale_zero_point(lo, hi, qt, symmetric=False)
    return float(np.mean((dequantize(quantize(x, scale, zp, qt), scale, zp) - x).astype(np.float64) ** 2))


def _mse_range(x: np.ndarray, lo: float, hi: float, qt: QType) -> tuple[float, float]:
    """Shrink the range (both ends by the same factor) to the factor with the least quantization MSE."""
    best = (lo, hi)
    best_err = _qdq_error(x, lo, hi, qt)
    for f in np.linspace(0.2, 0.98, 40):
        err = _qdq_error(x, lo * f, hi * f, qt)
        if err < best_err:
            best, best_err = (lo * f, hi * f), err
    return float(best[0]), float(best[1])


def _entropy_range(x: np.ndarray, lo: float, hi: float, qt: QType, bins: int = 2048) -> tuple[float, float]:
    """TensorRT-style KL calibration on |x|: the clip threshold whose ``levels``-bin quantized
    histogram diverges least from the clipped reference histogram."""
    absmax = max(abs(lo), abs(hi))
    one_sided = lo >= 0
    levels = (qt.qmax - qt.qmin + 1) if one_sided else (qt.qmax - qt.qmin + 1) // 2
    hist, edges = np.histogram(np.abs(x), bins=bins, range=(0.0, absmax))
    hist = hist.astype(np.float64)
    best_i, best_kl = bins, np.inf
    for i in range(levels, bins + 1, 8):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nz = p > 0
        # a `levels`-bin quantization of hist[:i], expanded back to i bins over the non-empty ones
        starts = (np.arange(levels) * i) // levels  # `levels` near-equal, non-empty chunks of hist[:i]
        sums = np.add.reduceat(hist[:i], starts)
        counts = np.add.reduceat((hist[:i] > 0).astype(np.float64), starts)
        lengths = np.diff(np.append(starts, i))
        q = np.repeat(np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0), lengths)
        q[~nz] = 0
        if q[nz].sum() == 0:
            continue
        pn, qn = p / p.sum(), q / q.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = float(np.sum(pn[nz] * np.log(pn[nz] / np.where(qn[nz] > 0, qn[nz], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    t = float(edges[best_i])
    return (0.0 if one_sided else max(lo, -t)), min(hi, t) if hi > 0 else hi


MASK_GAP_DECADES = 2.0
"""A tensor whose magnitudes split into two clusters this many decades apart is mask-like."""
MASK_MIN_MAGNITUDE = 1e3


def mask_like(arrays: Sequence[np.ndarray], min_share: float = 0.01) -> bool:
    """True when the tensor's range is set by a few huge values far from the bulk (an attention mask's
    ``finfo.min`` or ``-1e4`` added to scores): an 8-bit grid over that range maps the bulk, which
    carries the information (scores differing by units), onto one or two levels.

    The test: the nonzero magnitudes have an empty band of :data:`MASK_GAP_DECADES` decades with at
    least ``min_share`` of the values below it, and the values above it are at least
    :data:`MASK_MIN_MAGNITUDE` (what masks use; a sigmoid's 1e-12 tail under a bulk near 1 is not a mask).
    """
    x = _values(arrays)
    a = np.abs(x[np.isfinite(x) & (x != 0)]).astype(np.float64)
    if not np.all(np.isfinite(x)):  # -inf masks: no 8-bit grid covers them
        return True
    if a.size < 2:
        return False
    logs = np.sort(np.log10(a))
    gaps = np.diff(logs)
    k = int(np.argmax(gaps))
    return bool(gaps[k] >= MASK_GAP_DECADES and (k + 1) >= min_share * logs.size and logs[k + 1] >= np.log10(MASK_MIN_MAGNITUDE))
