"""GPTQ rounding (Frantar et al., 2022): quantize a weight column by column along the reduction
axis and push each column's rounding error onto the columns not yet quantized, weighted by the
inverse Hessian ``H = X^T X`` of the layer's inputs on calibration data. Same integers and layout
as round-to-nearest, lower output error ``|X W - X W_q|``.

Columns are processed in batches of about :data:`BATCH` ("lazy batch" updates: the errors of a
batch reach the later columns in one matrix product), which is the sequential algorithm's exact
arithmetic regrouped; batches never cut a scale group, so each group's scale is chosen from its
columns after every earlier column's error was pushed onto them.
"""

from __future__ import annotations

import numpy as np

from graphopt.passes._qmath import QType, QuantizedWeight, quantize_weight

DAMP = 0.01
"""Dampening added to H's diagonal, as a fraction of its mean (the paper's default)."""
BATCH = 128
"""Columns per lazy-batch update."""


class Inputs(list):
    """A layer input's captured activations (one array per sample), and the GPTQ results made
    from them in one pass run (``done``: the search quantizes clones of the model many times)."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        super().__init__(arrays)
        self.done: dict = {}


def hessian(x: np.ndarray) -> np.ndarray:
    """``2 X^T X / rows`` (float64) of inputs ``X[rows, K]``."""
    x = np.asarray(x, dtype=np.float64)
    return x.T @ x * (2.0 / max(len(x), 1))


def gptq(w_nk: np.ndarray, x: np.ndarray, qt: QType, *, block_size: int, symmetric: bool, search: bool) -> QuantizedWeight:
    """GPTQ of ``W[N, K]`` (outputs x reduction) given inputs ``X[rows, K]``.

    Groups: per output row (``block_size == 0``) or blocks of ``block_size`` along K. Returns the
    weight in the ``[N, K]`` layout with ``axis=0`` (per-channel) or ``axis=1`` (blocked).
    """
    k = w_nk.shape[1]
    starts = list(range(0, k, block_size)) if block_size else None
    q, scale, zero = gptq_h(w_nk, hessian(x), qt, starts=starts, symmetric=symmetric, search=search)
    if block_size:
        return QuantizedWeight(q, scale, zero, qt, axis=1, block_size=block_size)
    return QuantizedWeight(q, scale[:, 0], zero[:, 0], qt, axis=0)


def gptq_h(
    w_nk: np.ndarray, h: np.ndarray, qt: QType, *, starts: list[int] | None, symmetric: bool, search: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of ``W[N, K]`` given the Hessian ``H[K, K]`` of its inputs.

    ``starts``: first column of each scale group (ascending, from 0; groups are contiguous), or
    None for one group per output row whose scale comes from the whole row. Returns integers
    ``q[N, K]`` (``qt.numpy``), scales ``[N, groups]`` (float32) and zero points ``[N, groups]``.
    """
    w = np.array(w_nk, dtype=np.float64)
    n, k = w.shape
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += DAMP * float(np.mean(np.diag(h)))
    bounds = [0, k] if starts is None else [*starts, k]
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    except np.linalg.LinAlgError:
        hinv = None
    if hinv is None:  # not positive definite even damped: fall back to plain rounding, group by group
        return _nearest(w.astype(np.float32), qt, bounds, per_row=starts is None, symmetric=symmetric, search=search)

    groups = len(bounds) - 1
    q = np.zeros((n, k), dtype=np.int64)
    scale = np.zeros((n, groups), np.float32)
    zero = np.zeros((n, groups), np.int64)
    if starts is None:
        whole = quantize_weight(w.astype(np.float32), qt, axis=0, symmetric=symmetric, search=search)
        scale[:, 0], zero[:, 0] = whole.scale, whole.zero_point
    group_of = np.searchsorted(bounds, np.arange(k), side="right") - 1
    for b0, b1 in _batches(bounds, split=starts is None):
        w1 = w[:, b0:b1].copy()
        err = np.zeros((n, b1 - b0))
        for i in range(b0, b1):
            g = group_of[i]
            if starts is not None and i == bounds[g]:
                part = quantize_weight(w1[:, i - b0 : bounds[g + 1] - b0].astype(np.float32), qt, axis=0, symmetric=symmetric, search=search)
                scale[:, g], zero[:, g] = part.scale, part.zero_point
            s, z = scale[:, g], zero[:, g]
            qi = np.clip(np.rint(w1[:, i - b0].astype(np.float32) / s) + z, qt.qmin, qt.qmax)
            q[:, i] = qi
            deq = ((qi - z).astype(np.float32) * s).astype(np.float64)
            e = (w1[:, i - b0] - deq) / hinv[i, i]
            w1[:, i - b0 + 1 :] -= np.outer(e, hinv[i, i + 1 : b1])
            err[:, i - b0] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return q.astype(qt.numpy), scale, zero.astype(qt.numpy)


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


def _nearest(w: np.ndarray, qt: QType, bounds: list[int], *, per_row: bool, symmetric: bool, search: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if per_row:
        r = quantize_weight(w, qt, axis=0, symmetric=symmetric, search=search)
        return r.q, r.scale[:, None].astype(np.float32), np.asarray(r.zero_point)[:, None].astype(qt.numpy)
    parts = [quantize_weight(w[:, a:b], qt, axis=0, symmetric=symmetric, search=search) for a, b in zip(bounds[:-1], bounds[1:])]
    q = np.concatenate([p.q for p in parts], axis=1)
    return q, np.stack([p.scale for p in parts], axis=1).astype(np.float32), np.stack([p.zero_point for p in parts], axis=1).astype(qt.numpy)
