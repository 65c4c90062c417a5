"""GPTQ rounding (Frantar et al., 2022): quantize a weight column by column along the reduction
axis and push each column's rounding error onto the columns not yet quantized, weighted by the
inverse Hessian ``H = X^T X`` of the layer's inputs on calibration data. Same integers and layout
as round-to-nearest, lower output error ``|X W - X W_q|``.
"""

from __future__ import annotations

import numpy as np

from graphopt.passes._qmath import QType, QuantizedWeight, quantize_weight

DAMP = 0.01
"""Dampening added to H's diagonal, as a fraction of its mean (the paper's default)."""


def gptq(w_nk: np.ndarray, x: np.ndarray, qt: QType, *, block_size: int, symmetric: bool, search: bool) -> QuantizedWeight:
    """GPTQ of ``W[N, K]`` (outputs x reduction) given inputs ``X[rows, K]``.

    Groups: per output row (``block_size == 0``) or blocks of ``block_size`` along K. Returns the
    weight in the ``[N, K]`` layout with ``axis=0`` (per-channel) or ``axis=1`` (blocked).
    """
    w = np.array(w_nk, dtype=np.float64)
    n, k = w.shape
    h = x.T.astype(np.float64) @ x.astype(np.float64) * (2.0 / max(len(x), 1))
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += DAMP * float(np.mean(np.diag(h)))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    except np.linalg.LinAlgError:
        hinv = None
    if hinv is None:  # not positive definite even damped: fall back to plain rounding
        return quantize_weight(w.astype(np.float32), qt, axis=1 if block_size else 0, block_size=block_size, symmetric=symmetric, search=search)

    q = np.zeros((n, k), dtype=np.int64)
    if block_size:
        nb = -(-k // block_size)
        scale = np.zeros((n, nb), np.float32)
        zero = np.zeros((n, nb), np.int64)
    else:
        whole = quantize_weight(w.astype(np.float32), qt, axis=0, symmetric=symmetric, search=search)
        scale, zero = whole.scale.astype(np.float32), whole.zero_point.astype(np.int64)
    for i in range(k):
        if block_size and i % block_size == 0:
            b = i // block_size
            group = quantize_weight(w[:, i : i + block_size].astype(np.float32), qt, axis=0, symmetric=symmetric, search=search)
            scale[:, b], zero[:, b] = group.scale, group.zero_point
        s = scale[:, i // block_size] if block_size else scale
        z = zero[:, i // block_size] if block_size else zero
        col = w[:, i].astype(np.float32)
        qi = np.clip(np.rint(col / s) + z, qt.qmin, qt.qmax)
        q[:, i] = qi
        deq = ((qi - z).astype(np.float32) * s).astype(np.float64)
        err = (w[:, i] - deq) / hinv[i, i]
        w[:, i + 1 :] -= np.outer(err, hinv[i, i + 1 :])
    if block_size:
        return QuantizedWeight(q.astype(qt.numpy), scale, zero.astype(qt.numpy), qt, axis=1, block_size=block_size)
    return QuantizedWeight(q.astype(qt.numpy), scale, zero.astype(qt.numpy), qt, axis=0)
