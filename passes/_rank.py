"""The math of svd-split: factorizations, error curves, rank rules and the global allocation.

numpy/scipy only, no ONNX. A layer computes ``Y = X·W (+ bias)`` with ``W[K, N]``; rows of ``X`` are
calibration activations and ``G = XᵀX`` their (uncentred) Gram matrix. Every factorization here
writes ``W = P·diag(s)·Vt`` exactly, with orthonormal rows in ``Vt``; keeping the first ``r``
components gives ``A = P_r·sqrt(s_r)``, ``B = sqrt(s_r)·Vt_r`` and an output error

    ‖X·W − X·A·B‖² = Σ_{i≥r} s_i² · p_iᵀ G p_i        (Vt's rows are orthonormal, so no cross terms)

one non-negative number per component: the whole error-versus-rank curve costs one pass.
Plain SVD takes ``P = U``; the data-aware one (SVD-LLM) whitens with the Cholesky factor of the
regularized Gram, ``G + λI = L·Lᵀ``, takes the SVD of ``Lᵀ·W`` (Eckart–Young is then optimal for the
output error) and un-whitens, ``P = L⁻ᵀ·U``. Without data ``G = I``: the error is the weight error.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import numpy as np
import scipy.linalg


@dataclasses.dataclass
class Activations:
    """What calibration data says about one weight (summed over the nodes that use it)."""

    gram: np.ndarray  # Σ alpha²·XᵀX, [K, K] float64
    signal: float  # Σ ‖Y‖² of the layer outputs, bias included
    rows: np.ndarray  # a subsample of alpha·X rows [n, K] for the max-abs search

    @staticmethod
    def of(parts: list[tuple[np.ndarray, np.ndarray, float]], max_rows: int = 4096) -> Activations:
        """``parts``: (X rows [n, K], Y, alpha) per use of the weight."""
        gram = sum(alpha * alpha * (x.T @ x) for x, _, alpha in parts)
        signal = float(sum(np.vdot(y, y).real for _, y, _ in parts))
        share = max(1, max_rows // len(parts))
        rows = np.concatenate([abs(alpha) * _evenly(x, share) for x, _, alpha in parts], axis=0)
        return Activations(np.asarray(gram, dtype=np.float64), signal, rows)


def _evenly(x: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` rows of ``x``, evenly spaced (deterministic)."""
    return x if len(x) <= n else x[np.linspace(0, len(x) - 1, n).astype(np.int64)]


@dataclasses.dataclass
class Factors:
    """``W = p·diag(s)·vt`` with the output error each component carries (``q``, see the module doc)."""

    p: np.ndarray  # [K, m]
    s: np.ndarray  # [m], non-increasing
    vt: np.ndarray  # [m, N], orthonormal rows
    q: np.ndarray  # [m]: p_iᵀ G p_i (1 without data)
    signal: float  # ‖Y‖² (‖W‖² without data)
    whitened: bool

    @property
    def max_rank(self) -> int:
        return len(self.s)

    def errors(self) -> np.ndarray:
        """``errors()[r]``: squared output error when keeping ``r`` components, r = 0..m."""
        terms = self.s**2 * self.q
        return np.concatenate([np.cumsum(terms[::-1])[::-1], [0.0]])

    def sqnr_db(self, r: int) -> float:
        err = float(self.errors()[r])
        if err <= 0.0:
            return math.inf
        return 10 * math.log10(self.signal / err) if self.signal > 0 else -math.inf

    def energy(self, r: int) -> float:
        """Share of the squared singular values kept (whitened ones when data-aware)."""
        total = float(np.sum(self.s**2))
        return float(np.sum(self.s[:r] ** 2)) / total if total > 0 else 1.0

    def split(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """``A[K, r]``, ``B[r, N]`` in float64 with the singular values shared evenly."""
        root = np.sqrt(self.s[:r])
        return self.p[:, :r] * root, root[:, None] * self.vt[:r]

    def max_abs_error(self, r: int, rows: np.ndarray | None) -> float:
        """max |X·(W − A·B)| over ``rows`` (over the weight's elements without rows)."""
        xp = self.p[:, r:] if rows is None else rows @ self.p[:, r:]
        if xp.shape[1] == 0:
            return 0.0
        return float(np.max(np.abs((xp * self.s[r:]) @ self.vt[r:])))


SINGLE_THREAD_BELOW = 1024
"""Decompose matrices up to this size on one BLAS thread: threads gain little there, and OpenBLAS
threads spinning on a busy machine made a 512x512 SVD 10x slower (0.35 s -> 4.8 s on 2 shared cores)."""


def factorize(w: np.ndarray, data: Activations | None = None, *, data_aware: bool = False, damp: float = 0.01) -> Factors:
    """Plain (or, with ``data`` and ``data_aware``, whitened) SVD of ``w[K, N]`` in float64."""
    if min(w.shape) > SINGLE_THREAD_BELOW:
        return _factorize(w, data, data_aware, damp)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return _factorize(w, data, data_aware, damp)
    with threadpool_limits(limits=1, user_api="blas"):
        return _factorize(w, data, data_aware, damp)


def _factorize(w: np.ndarray, data: Activations | None, data_aware: bool, damp: float) -> Factors:
    w = np.asarray(w, dtype=np.float64)
    gram = data.gram if data is not None else None
    whitened = False
    if gram is not None and data_aware:
        k = gram.shape[0]
        scale = float(np.trace(gram)) / k
        if scale > 0 and np.isfinite(scale):
            chol = scipy.linalg.cholesky(gram + (damp * scale + 1e-12 * scale) * np.eye(k), lower=True)
            u, s, vt = np.linalg.svd(chol.T @ w, full_matrices=False)
            p = scipy.linalg.solve_triangular(chol.T, u, lower=False)
            whitened = True
    if not whitened:
        p, s, vt = np.linalg.svd(w, full_matrices=False)
    if gram is None:
        q, signal = np.ones_like(s), float(np.sum(w * w))
    else:
        q = np.maximum(np.sum(p * (gram @ p), axis=0), 0.0)
        signal = data.signal  # type: ignore[union-attr]
    return Factors(p, s, vt, q, signal, whitened)


def saving_limit(k: int, n: int, min_saving: float) -> int:
    """Largest rank whose factors keep at most ``1 - min_saving`` of ``k·n`` parameters."""
    return min(int(math.floor((1.0 - min_saving) * k * n / (k + n) + 1e-9)), min(k, n))


def rank_for_ratio(k: int, n: int, ratio: float) -> int:
    return max(1, int(math.floor(ratio * k * n / (k + n) + 1e-9)))


def rank_for_energy(f: Factors, energy: float) -> int:
    total = float(np.sum(f.s**2))
    if total <= 0:
        return 1
    kept = np.cumsum(f.s**2) / total
    return max(1, min(int(np.searchsorted(kept, energy - 1e-12)) + 1, f.max_rank))


def rank_for_sqnr(f: Factors, min_sqnr_db: float) -> int:
    """Smallest rank ≥ 1 whose output SQNR reaches ``min_sqnr_db``."""
    allowed = f.signal * 10 ** (-min_sqnr_db / 10)
    errors = f.errors()
    ok = np.nonzero(errors <= allowed)[0]
    return max(1, int(ok[0]) if len(ok) else f.max_rank)


def rank_for_max_error(f: Factors, rows: np.ndarray | None, limit: float, hi: int) -> int | None:
    """Smallest rank in [1, hi] whose max abs output error is ≤ ``limit`` (bisection); None if not even ``hi``."""
    if f.max_abs_error(hi, rows) > limit:
        return None
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        if f.max_abs_error(mid, rows) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return hi


@dataclasses.dataclass
class Unit:
    """One weight in the global allocation: its relative error curve and its sizes."""

    rel_errors: np.ndarray  # error[r] / signal, r = 0..m
    k: int
    n: int
    limit: int  # largest rank that still saves

    @property
    def dense(self) -> int:
        return self.k * self.n

    def cost(self, r: int | None) -> int:
        return self.dense if r is None else r * (self.k + self.n)


def allocate(units: list[Unit], target: float) -> list[int | None]:
    """Ranks (None = leave dense) with Σ cost ≤ ``target``, spread greedily by relative output error
    removed per parameter spent.

    Every unit starts at rank 1; a move takes a unit from rank r to any higher saving rank j, or to
    dense, and the move with the best (error removed) / (parameters added) goes first: the upper
    concave hull of each error curve, so a flat stretch followed by a steep one is not passed over.
    """
    ranks: list[int | None] = [1 if u.limit >= 1 else None for u in units]
    remaining = target - sum(u.cost(r) for u, r in zip(units, ranks))
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        move = _best_move(units[i], ranks[i], remaining)  # type: ignore[arg-type]
        if move is not None:
            heapq.heappush(heap, (-move[0], i, move[1]))

    for i, r in enumerate(ranks):
        if r is not None:
            push(i)
    while heap:
        _, i, j = heapq.heappop(heap)
        u, r = units[i], ranks[i]
        assert r is not None
        new = None if j < 0 else j
        cost = u.cost(new) - u.cost(r)
        if cost > remaining + 1e-9:
            push(i)  # the budget shrank since this move was queued: look for a smaller one
            continue
        ranks[i] = new
        remaining -= cost
        if new is not None:
            push(i)
    return ranks


def _best_move(u: Unit, r: int, remaining: float) -> tuple[float, int] | None:
    """(error removed per parameter, target rank or -1 for dense) of the best affordable move."""
    best: tuple[float, int] | None = None
    if u.limit > r:
        steps = np.arange(r + 1, u.limit + 1)
        cost = (steps - r) * (u.k + u.n)
        gain = u.rel_errors[r] - u.rel_errors[steps]
        affordable = cost <= remaining + 1e-9
        if np.any(affordable):
            rate = np.where(affordable, gain / cost, -np.inf)
            j = int(np.argmax(rate))
            best = (float(rate[j]), int(steps[j]))
    dense_cost = u.dense - u.cost(r)
    if 0 < dense_cost <= remaining + 1e-9:
        rate = float(u.rel_errors[r]) / dense_cost
        if best is None or rate > best[0]:
            best = (rate, -1)
    return best if best is not None and best[0] > 0 else None
