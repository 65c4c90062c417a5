"""GPTQ rounding (Frantar et al., 2022): quantize a weight column by column along the reduction
axis and push each column's rounding error onto the columns not yet quantized, weighted by the
inverse Hessian ``H = X^T X`` of the layer's inputs on calibration data. Same integers and layout
as round-to-nearest, lower output error ``|X W - X W_q|``.

Columns are processed in batches of about :data:`BATCH` ("lazy batch" updates: the errors of a
batch reach the later columns in one matrix product), which is the sequential algorithm's exact
arithmetic regrouped; batches never cut a scale group, so each group's scale is chosen from its
columns after every earlier column's error was pushed onto them.

GPTQ fits the calibration data, and where that data has fewer rows than H has columns (H is
singular: GPTQ pushes rounding errors into directions the calibration never showed) it can
overfit: PP-OCR cls's squeeze-excitation convs read one pooled row per image (16 rows, 50 to 200
columns), and their GPTQ weights had 0.1x plain rounding's output error on the calibration
images and 15x to 180x on the test ones (the model: 49.7 dB against 58.3); PP-OCR det's, from 2
images, up to 900x. So where rows < columns the rounding is chosen by 2-fold cross-validation
(:func:`select`): GPTQ made from one half of the rows at each dampening in :data:`DAMPS` (more
dampening is more regularization; infinite dampening is plain rounding) and plain rounding are
scored by their output error on the other half, both ways, and the winner is remade from all
rows. At 8 bits on PP-OCR det it avoided the three convs where GPTQ had 17x to 940x plain
rounding's test error, and elsewhere chose a rounding within 1.25x of the best one's test error
but once (1.7x); the model went from 23.1 dB (GPTQ everywhere) to 33.3 (plain rounding: 29.8). It
needs no rule for the bit width: at 4 bits plain rounding's error is large enough that GPTQ from
few rows often wins.

Where rows >= columns GPTQ at :data:`DAMP` is used without the check: there, half the rows can
be fewer than the columns when all of them are not, and the check would then misjudge GPTQ.
Measured on EfficientNet-Lite0 at 4 bits (1372 rows for 1152 columns): GPTQ from all rows had
0.07-0.24x plain rounding's test error, GPTQ from half of them looked like 0.6-0.95x, and the
check chose MSE rounding, with 3-6x the error, in four layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.linalg

from graphopt.passes._qmath import QType, QuantizedWeight, quantize_weight

DAMP = 0.01
"""Dampening added to H's diagonal, as a fraction of its mean (the paper's default)."""
DAMPS = (0.01, 0.1, 1.0)
"""Dampenings the cross-validation tries."""
MAX_CV_COLUMNS = 2304
"""Wider layers (resnet50's 512 x 3x3 convs: 4608) keep GPTQ at :data:`DAMP` unchecked: the check's
six extra GPTQ runs cost O(columns^3) each, and took resnet50's int4 run from 110 s to over 600."""
BATCH = 128
"""Columns per lazy-batch update."""


class Inputs(list):
    """A layer input's captured activations (one array per sample), and the GPTQ results made
    from them in one pass run (``done``: the search quantizes clones of the model many times)."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        super().__init__(arrays)
        self.done: dict = {}


@dataclasses.dataclass
class FoldedHessian:
    """``X^T X`` summed over each of two halves (folds) of the calibration rows, per group:
    ``sums[fold, group, K, K]`` and ``rows[fold]``. Dense layers have one group."""

    sums: np.ndarray
    rows: np.ndarray

    @classmethod
    def empty(cls, groups: int, k: int, dtype: type = np.float64) -> FoldedHessian:
        return cls(np.zeros((2, groups, k, k), dtype), np.zeros(2, dtype=np.int64))

    @classmethod
    def of_rows(cls, arrays: Sequence[np.ndarray], features: int) -> FoldedHessian:
        """From a dense layer's input activations, one array per calibration sample (feature axis
        last): samples alternate between the folds; a single sample's rows are cut in two halves."""
        acc = cls.empty(1, features)
        parts = [np.asarray(a, dtype=np.float64).reshape(-1, features) for a in arrays]
        if len(parts) == 1:
            half = len(parts[0]) // 2
            parts = [parts[0][:half], parts[0][half:]]
        for i, x in enumerate(parts):
            acc.add(i % 2, x[None])
        return acc

    def add(self, fold: int, x: np.ndarray) -> None:
        """Rows ``x[group, rows, K]`` into ``fold``."""
        self.sums[fold] += np.matmul(x.transpose(0, 2, 1), x)
        self.rows[fold] += x.shape[1]

    def fold(self, i: int) -> np.ndarray:
        return self.sums[i] * (2.0 / max(int(self.rows[i]), 1))

    def full(self) -> np.ndarray:
        """``2 X_g^T X_g / rows`` over all rows: ``[group, K, K]``."""
        return (self.sums[0] + self.sums[1]) * (2.0 / max(int(self.rows.sum()), 1))


def layer_error(w: np.ndarray, dq: np.ndarray, h: np.ndarray) -> float:
    """Output error ``sum_g tr(D_g H_g D_g^T)`` of the dequantized weight: ``w``/``dq`` as ``[group, outputs, K]``."""
    d = (np.asarray(w, np.float64).reshape(h.shape[0], -1, h.shape[1]) - np.asarray(dq, np.float64).reshape(h.shape[0], -1, h.shape[1]))
    return float(np.sum((d @ h) * d))  # a batched BLAS product: einsum's unoptimized loop was 60x slower at K=2048


def select(
    w_gok: np.ndarray, hessian: FoldedHessian, fit: Callable[[np.ndarray, float], QuantizedWeight],
    plain: Callable[[], Sequence[tuple[str, QuantizedWeight]]],
) -> tuple[QuantizedWeight, dict[str, Any]]:
    """The rounding with the least cross-validated output error (module docstring), remade from all rows.

    ``fit(H[group, K, K], damp)``: GPTQ from that Hessian; ``plain()``: named data-free roundings
    (made only when the check runs).
    ``w_gok``: the float weight as ``[group, outputs, K]`` (the Hessians' column order), which the
    dequantized candidates are reshaped to. Returns the weight and a layer record's fields:
    ``rounding`` (``gptq`` or the plain rounding's name), ``gptq_damp``, ``cross_validated``.
    With at least as many rows as columns, more than :data:`MAX_CV_COLUMNS` columns, or not two
    non-empty folds: GPTQ at :data:`DAMP`, unchecked.
    """
    full = hessian.full()
    k = full.shape[-1]
    if hessian.rows.sum() >= k or k > MAX_CV_COLUMNS or not np.all(hessian.rows > 0):
        return fit(full, DAMP), {"rounding": "gptq", "gptq_damp": DAMP, "cross_validated": False}
    folds = [hessian.fold(0), hessian.fold(1)]

    def cv(make: Callable[[int], QuantizedWeight]) -> float:
        return sum(layer_error(w_gok, make(1 - f).dequantized(), folds[f]) for f in (0, 1))

    scores: dict[float | str, float] = {d: cv(lambda i, d=d: fit(folds[i], d)) for d in DAMPS}
    candidates = dict(plain())
    scores.update({name: cv(lambda i, q=q: q) for name, q in candidates.items()})
    best = min(scores, key=scores.__getitem__)
    if isinstance(best, str):
        return candidates[best], {"rounding": best, "cross_validated": True}
    return fit(full, best), {"rounding": "gptq", "gptq_damp": best, "cross_validated": True}


def gptq(w_nk: np.ndarray, arrays: Sequence[np.ndarray], qt: QType, *, block_size: int, symmetric: bool, search: bool) -> tuple[QuantizedWeight, dict[str, Any]]:
    """GPTQ of ``W[N, K]`` (outputs x reduction) given its inputs (one array per calibration
    sample, K last), with the rounding cross-validated (:func:`select`) against plain rounding.

    Groups: per output row (``block_size == 0``) or blocks of ``block_size`` along K. Returns the
    weight in the ``[N, K]`` layout with ``axis=0`` (per-channel) or ``axis=1`` (blocked), and the choice (:func:`select`).
    """
    k = w_nk.shape[1]
    starts = list(range(0, k, block_size)) if block_size else None

    def fit(h: np.ndarray, damp: float) -> QuantizedWeight:
        q, scale, zero = gptq_h(w_nk, h[0], qt, starts=starts, symmetric=symmetric, search=search, damp=damp)
        if block_size:
            return QuantizedWeight(q, scale, zero, qt, axis=1, block_size=block_size)
        return QuantizedWeight(q, scale[:, 0], zero[:, 0], qt, axis=0)

    plain = functools.partial(plain_roundings, w_nk, qt, axis=1 if block_size else 0, block_size=block_size, symmetric=symmetric)
    return select(w_nk[None], FoldedHessian.of_rows(arrays, k), fit, plain)


def plain_roundings(w: np.ndarray, qt: QType, *, axis: int, block_size: int, symmetric: bool) -> list[tuple[str, QuantizedWeight]]:
    """The data-free candidates: round to nearest with min/max ranges, and with MSE-searched ones."""
    return [(name, quantize_weight(w, qt, axis=axis, block_size=block_size, symmetric=symmetric, search=search)) for name, search in (("nearest", False), ("mse", True))]


def gptq_h(
    w_nk: np.ndarray, h: np.ndarray, qt: QType, *, starts: list[int] | None, symmetric: bool, search: bool, damp: float = DAMP
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of ``W[N, K]`` given the Hessian ``H[K, K]`` of its inputs, or of independent problems
    stacked as ``W[B, N, K]`` and ``H[B, K, K]`` (a grouped Conv's groups: one column loop for all).

    ``starts``: first column of each scale group (ascending, from 0; groups are contiguous), or
    None for one group per output row whose scale comes from the whole row. ``damp``: added to
    H's diagonal as a fraction of its mean. Returns integers ``q[(B,) N, K]`` (``qt.numpy``),
    scales ``[(B,) N, groups]`` (float32) and zero points ``[(B,) N, groups]``. A problem whose
    damped H is not positive definite gets plain rounding (no error feedback).
    """
    stacked = np.ndim(w_nk) == 3
    w = np.array(w_nk, dtype=np.float64).reshape(-1, *np.shape(w_nk)[-2:])
    h = np.array(h, dtype=np.float64).reshape(-1, *np.shape(h)[-2:])
    b, n, k = w.shape
    dead_b, dead_k = np.nonzero(np.diagonal(h, axis1=1, axis2=2) == 0)
    h[dead_b, dead_k, dead_k] = 1.0
    w[dead_b, :, dead_k] = 0.0
    diag = np.arange(k)
    h[:, diag, diag] += damp * np.diagonal(h, axis1=1, axis2=2).mean(axis=1)[:, None]
    hinv = _upper_inverse_cholesky(h)
    bounds = [0, k] if starts is None else [*starts, k]
    groups = len(bounds) - 1
    q = np.zeros((b, n, k), dtype=np.int64)
    scale = np.zeros((b, n, groups), np.float32)
    zero = np.zeros((b, n, groups), np.int64)
    if starts is None:
        whole = quantize_weight(w.reshape(b * n, k).astype(np.float32), qt, axis=0, symmetric=symmetric, search=search)
        scale[:, :, 0], zero[:, :, 0] = whole.scale.reshape(b, n), np.reshape(whole.zero_point, (b, n))
    group_of = np.searchsorted(bounds, np.arange(k), side="right") - 1
    for b0, b1 in _batches(bounds, split=starts is None):
        w1 = w[:, :, b0:b1].copy()
        err = np.zeros((b, n, b1 - b0))
        for i in range(b0, b1):
            g = group_of[i]
            if starts is not None and i == bounds[g]:
                part = quantize_weight(w1[:, :, i - b0 : bounds[g + 1] - b0].reshape(b * n, -1).astype(np.float32), qt, axis=0, symmetric=symmetric, search=search)
                scale[:, :, g], zero[:, :, g] = part.scale.reshape(b, n), np.reshape(part.zero_point, (b, n))
            s, z = scale[:, :, g], zero[:, :, g]
            qi = np.clip(np.rint(w1[:, :, i - b0].astype(np.float32) / s) + z, qt.qmin, qt.qmax)
            q[:, :, i] = qi
            deq = ((qi - z).astype(np.float32) * s).astype(np.float64)
            e = (w1[:, :, i - b0] - deq) / hinv[:, i, i][:, None]
            w1[:, :, i - b0 + 1 :] -= e[:, :, None] * hinv[:, None, i, i + 1 : b1]
            err[:, :, i - b0] = e
        w[:, :, b1:] -= err @ hinv[:, b0:b1, b1:]
    q, scale, zero = q.astype(qt.numpy), scale, zero.astype(qt.numpy)
    return (q, scale, zero) if stacked else (q[0], scale[0], zero[0])


def _upper_inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factors ``U`` of ``H[B]^-1`` (``H^-1 = U^T U``), from one factorization of ``H``:
    with ``J`` the reversal, ``J H J = L L^T`` gives ``U = J L^-1 J`` (upper, positive diagonal), about
    2x faster than inverting ``H`` and factoring the inverse. The identity (no error feedback: plain
    rounding) for a problem whose ``H`` is not positive definite."""
    out = np.empty_like(h)
    for i, hi in enumerate(h):
        try:
            inverse, info = scipy.linalg.lapack.dtrtri(np.linalg.cholesky(hi[::-1, ::-1]), lower=1)
        except np.linalg.LinAlgError:
            info = 1
        out[i] = inverse[::-1, ::-1] if info == 0 else np.eye(len(hi))
    return out


def _batches(bounds: list[int], split: bool) -> list[tuple[int, int]]:
    """Consecutive column ranges of about :data:`BATCH` columns made of whole groups (a group wider
    than BATCH is a batch of its own); ``split``: the one group (per-row scales) is cut every BATCH columns."""
    if split:
        return [(a, min(a + BATCH, bounds[-1])) for a in range(bounds[0], bounds[-1], BATCH)]
    out: list[tuple[int, int]] = []
    start = bounds[0]
    for prev, end in zip(bounds[:-1], bounds[1:]):
        if end - start > BATCH and prev > start:
            out.append((start, prev))
            start = prev
    out.append((start, bounds[-1]))
    return out
