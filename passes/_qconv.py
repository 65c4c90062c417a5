"""Conv weights for the quantize passes: im2col Hessians for GPTQ, and the blocked scale layout.

A Conv with weight ``W[O, C/g, *kernel]`` is, per group ``g``, the product of its im2col rows
``X_g[rows, (C/g)·prod(kernel)]`` (one row per output position: the input patch it reads, in the
weight's ``(channel, kernel...)`` order) with ``W_g[O/g, (C/g)·prod(kernel)]^T``. So GPTQ runs per
group on ``W_g`` with the Hessian ``2 X_g^T X_g / rows``; depthwise (``g == C``) is one tiny
``prod(kernel)``-sized problem per channel (the groups are solved together, one stacked column
loop: a per-group loop made depthwise GPTQ most of a pass run). Strides, dilations, explicit pads and ``auto_pad`` are
honoured; each calibration sample gives a fixed-seed sample of ``MAX_ROWS / samples`` output
positions, which bounds time and memory whatever the resolution (measured on PP-OCR-rec and
EfficientNet-Lite0: 2048 to 16384 rows give the same held-out layer error within 0.1 dB).

Layouts: per output channel (``axis=0``), or blocked along the input channels (``axis=1``,
``block_size`` B: one scale per B input channels at each kernel position, scales
``[O, ceil((C/g)/B), *kernel]``; onnxruntime 1.32 loads it, B need not divide C/g, and runs the
DequantizeLinear as its own node before a float Conv, as for per-channel scales). For the blocked
one GPTQ sees the columns in ``(kernel position, channel)`` order, so each scale group is contiguous.

The Hessians are kept in two folds of the calibration rows, so ``_gptq.select`` can check GPTQ
against plain rounding on rows it was not made from. Used by quantize-weights (``rounding=gptq``, 4 and 8 bits) and quantize-static
(``rounding=gptq``: :func:`static_gptq_weights` fills its weight cache).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.activations import capture
from graphopt.data import dynamic_batch, sample_rows
from graphopt.passes._util import ConvGeometry, conv_geometry, conv_out_size
from graphopt.passes._gptq import DAMP, FoldedHessian, gptq, gptq_h, plain_roundings, select
from graphopt.passes._qmath import QTYPES, QType, QuantizedWeight

logger = logging.getLogger(__name__)

MAX_ROWS = 4096
"""im2col rows (output positions) sampled per Conv for its Hessian."""
CHUNK_ELEMENTS = 1 << 22
"""Bound on the float32 elements of one im2col slice held at a time (16 MB)."""
MAX_COLUMNS = 4608
"""Convs with more columns per group (``(C/g)·prod(kernel)``; 512 x 3x3 is 4608) keep plain rounding."""
MAX_HESSIAN_BYTES = 1 << 30
"""Bound on the float32 Hessians held for one pass run; the Convs past it keep plain rounding."""
CAPTURE_BYTES = 1 << 28
"""Bound on the Conv inputs captured in one onnxruntime run: more runs, the same sums.
EfficientNet-Lite0's 49 Conv inputs over its 28 calibration images are 729 MB."""


def im2col(x: np.ndarray, geo: ConvGeometry, positions: np.ndarray | None = None) -> np.ndarray:
    """Patches ``[rows, C, prod(kernel)]`` (float32) of ``x[N, C, *spatial]``: every output position
    (``positions`` None, in (n, *out) order) or the given flat indices into ``[N, *out]``."""
    x = np.asarray(x, dtype=np.float32)
    out_shape = (x.shape[0], *conv_out_size(geo, x.shape[2:]))
    return _patches(_padded(x, geo), geo, out_shape, np.arange(int(np.prod(out_shape))) if positions is None else positions)


def _padded(x: np.ndarray, geo: ConvGeometry) -> np.ndarray:
    nd = len(geo.kernel)
    return np.pad(x, [(0, 0), (0, 0)] + [(geo.pads[i], geo.pads[nd + i]) for i in range(nd)])


def _patches(padded: np.ndarray, geo: ConvGeometry, out_shape: tuple[int, ...], positions: np.ndarray) -> np.ndarray:
    """im2col rows of an already padded input, written in place (a list of slices and a stack held
    both copies at once: 2x the chunk, EfficientNet int4's largest buffers)."""
    nd = len(geo.kernel)
    idx = np.unravel_index(positions, out_shape)
    out = np.empty((len(positions), padded.shape[1], int(np.prod(geo.kernel))), np.float32)
    for j, offset in enumerate(np.ndindex(*geo.kernel)):
        coords = tuple(idx[1 + i] * geo.strides[i] + offset[i] * geo.dilations[i] for i in range(nd))
        out[:, :, j] = padded[(idx[0], slice(None), *coords)]  # [rows, C]
    return out


def sample_positions(count: int, limit: int, seed: int) -> np.ndarray:
    """Sorted flat output positions: all ``count`` of them, or a fixed-seed uniform sample of ``limit``."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))


class HessianSum:
    """Accumulates ``X_g^T X_g`` per group over sampled im2col rows of a Conv's inputs, in two
    folds for :func:`_gptq.select`: a sample goes to the fold it is given, or (fold None, a lone
    calibration sample) the first half of its sampled rows to one fold, the second to the other.
    K = (C/group)·prod(kernel), in the weight's (channel, kernel) order."""

    def __init__(self) -> None:
        self.folds: FoldedHessian | None = None

    @property
    def rows(self) -> int:
        return 0 if self.folds is None else int(self.folds.rows.sum())

    def add(self, x: np.ndarray, node: ir.Node, w_shape: Sequence[int], limit: int, seed: int, fold: int | None = 0) -> None:
        """``x[N, C, *spatial]``: one input batch of the Conv; at most ``limit`` of its output positions are used."""
        x = np.asarray(x, dtype=np.float32)
        geo = conv_geometry(node, x.shape, w_shape)
        c, p = x.shape[1], int(np.prod(geo.kernel))
        k = c // geo.group * p
        pos = sample_positions(x.shape[0] * int(np.prod(conv_out_size(geo, x.shape[2:]))), limit, seed)
        if self.folds is None:
            self.folds = FoldedHessian.empty(geo.group, k, np.float32)
        parts = [(fold, pos)] if fold is not None else [(0, pos[: len(pos) // 2]), (1, pos[len(pos) // 2 :])]
        per_chunk = max(1, CHUNK_ELEMENTS // max(1, c * p))
        padded, out_shape = _padded(x, geo), (x.shape[0], *conv_out_size(geo, x.shape[2:]))  # once per batch, not per chunk
        for f, part in parts:
            for start in range(0, len(part), per_chunk):
                cols = _patches(padded, geo, out_shape, part[start : start + per_chunk]).reshape(-1, geo.group, k).transpose(1, 0, 2)  # [g, rows, K] float32
                self.folds.add(f, cols)


def conv_hessians(arrays: Sequence[np.ndarray], node: ir.Node, w_shape: Sequence[int], limit: int = MAX_ROWS) -> FoldedHessian:
    """Per-group, per-fold Hessians of a Conv over input batches ``arrays`` (``limit`` rows shared evenly)."""
    acc = HessianSum()
    for i, a in enumerate(arrays):
        acc.add(a, node, w_shape, max(1, limit // len(arrays)), seed=i, fold=i % 2 if len(arrays) > 1 else None)
    assert acc.folds is not None
    return acc.folds


def conv_gptq(w: np.ndarray, h: np.ndarray, qt: QType, *, block_size: int, symmetric: bool, search: bool, damp: float = DAMP) -> QuantizedWeight:
    """GPTQ of a Conv weight ``W[O, C/g, *kernel]`` given its per-group Hessians ``[group, K, K]``.

    ``block_size`` 0: per output channel (``axis=0``); else blocked along the input channels
    (``axis=1``, the same layout as ``quantize_weight(w, qt, axis=1, block_size=B)``).
    """
    o, cg, kernel = w.shape[0], w.shape[1], w.shape[2:]
    p = int(np.prod(kernel))
    groups = h.shape[0]
    og = o // groups
    w_g = w.reshape(groups, og, cg, p)
    if not block_size:  # all groups in one stacked GPTQ
        q, scale, zero = gptq_h(w_g.reshape(groups, og, cg * p), h, qt, starts=None, symmetric=symmetric, search=search, damp=damp)
        return QuantizedWeight(q.reshape(w.shape), scale.reshape(o), zero.reshape(o), qt, axis=0)
    # columns in (kernel position, channel) order: each block of B channels at one position is contiguous
    nb = math.ceil(cg / block_size)
    perm = (np.arange(cg)[None, :] * p + np.arange(p)[:, None]).reshape(-1)  # new column j -> old (c, p) column
    starts = [pp * cg + c0 for pp in range(p) for c0 in range(0, cg, block_size)]
    q, scale, zero = gptq_h(w_g.transpose(0, 1, 3, 2).reshape(groups, og, p * cg), h[:, perm][:, :, perm], qt, starts=starts, symmetric=symmetric, search=search, damp=damp)
    q = q.reshape(o, p, cg).transpose(0, 2, 1)
    scale, zero = (a.reshape(o, p, nb).transpose(0, 2, 1) for a in (scale, zero))
    return QuantizedWeight(np.ascontiguousarray(q).reshape(w.shape), scale.reshape(o, nb, *kernel), zero.reshape(o, nb, *kernel), qt, axis=1, block_size=block_size)


def conv_block(cg: int, block_size: int) -> int:
    """The block size along the input channels for a Conv with ``cg`` channels per group, or 0
    (per output channel) when it would not make at least two blocks."""
    return block_size if block_size and cg > block_size else 0


SAMPLE_CHUNK = 4
"""Calibration samples per onnxruntime run capturing every Conv input (Hessians are kept, activations dropped)."""


@dataclasses.dataclass
class ConvCalibration:
    """One Conv's per-group, per-fold Hessians, and its roundings by layout (made once per pass run)."""

    hessians: FoldedHessian
    done: dict[tuple, tuple[QuantizedWeight, dict[str, Any]]] = dataclasses.field(default_factory=dict)

    def gptq(self, w: np.ndarray, qt: QType, *, block_size: int, symmetric: bool) -> tuple[QuantizedWeight, dict[str, Any]]:
        """GPTQ or plain rounding, whichever :func:`_gptq.select` finds better on held-out rows, and the record of the choice."""
        key = (qt.name, block_size, symmetric, w.shape)
        if key not in self.done:
            groups = self.hessians.sums.shape[1]

            def fit(h: np.ndarray, damp: float) -> QuantizedWeight:
                return conv_gptq(w, h, qt, block_size=block_size, symmetric=symmetric, search=True, damp=damp)

            plain = functools.partial(plain_roundings, w, qt, axis=1 if block_size else 0, block_size=block_size, symmetric=symmetric)
            self.done[key] = select(w.reshape(groups, w.shape[0] // groups, -1), self.hessians, fit, plain)
        return self.done[key]


class ConvInputs(dict):
    """Conv output name -> :class:`ConvCalibration`, for the Convs reading one tensor."""


def conv_calibration(model: ir.Model, layers: Sequence, samples: Sequence) -> dict[str, ConvInputs]:
    """Per Conv input name, the :class:`ConvCalibration` of every Conv among ``layers``
    (``graphopt.layers.LinearLayer``) in the main graph reading it, on the calibration ``samples``
    (each contributes ``MAX_ROWS / len(samples)`` im2col rows)."""
    convs, held = [], 0
    for layer in layers:
        if layer.kind != "conv" or layer.node.graph is not model.graph or layer.node.inputs[0] is None:
            continue
        k = int(np.prod(layer.shape[1:]))
        need = 2 * layer.group * k * k * 4  # two folds
        if k > MAX_COLUMNS or held + need > MAX_HESSIAN_BYTES:
            logger.info("%s: %d columns per group, %d MB of Hessians held: plain rounding", layer.name, k, held >> 20)
            continue
        held += need
        convs.append(layer)
    if not convs or not samples:
        return {}
    wanted = sorted({layer.node.inputs[0].name for layer in convs})
    sums = {id(layer.node): HessianSum() for layer in convs}
    quota = max(1, MAX_ROWS // len(samples))
    readers = {name: [layer for layer in convs if layer.node.inputs[0].name == name] for name in wanted}
    per_row = _bytes_per_row(model, wanted, samples[0])
    for start in range(0, len(samples), SAMPLE_CHUNK):
        chunk = samples[start : start + SAMPLE_CHUNK]
        for names in _capture_groups(wanted, per_row, sum(_rows(s) for s in chunk)):
            captured = capture(model, chunk, names)
            for name in names:
                for layer in readers[name]:
                    for i, a in enumerate(captured[name]):
                        fold = (start + i) % 2 if len(samples) > 1 else None
                        sums[id(layer.node)].add(a, layer.node, layer.shape, quota, seed=start + i, fold=fold)
            del captured
    out: dict[str, ConvInputs] = {}
    for layer in convs:
        folds = sums[id(layer.node)].folds
        assert folds is not None
        out.setdefault(layer.node.inputs[0].name, ConvInputs())[layer.node.outputs[0].name] = ConvCalibration(folds)
    return out


def _bytes_per_row(model: ir.Model, names: list[str], sample: dict) -> dict[str, float]:
    """Bytes per batch row of each named value, from one probe run on ``sample`` (one row of it
    where the batch dim is dynamic): exported models rarely carry intermediate shapes, and onnx's
    inference often leaves spatial dims unknown."""
    probe = {k: v[:1] for k, v in sample.items()} if dynamic_batch(model) else dict(sample)
    return {name: a[0].nbytes / _rows(probe) for name, a in capture(model, [probe], names).items()}


def _capture_groups(names: list[str], per_row: dict[str, float], rows: int) -> list[list[str]]:
    """``names`` in consecutive groups whose values over ``rows`` rows take at most
    :data:`CAPTURE_BYTES` (a value over it is a group of its own)."""
    groups: list[list[str]] = []
    held = math.inf
    for name in names:
        size = per_row[name] * rows
        if held + size > CAPTURE_BYTES:
            groups.append([])
            held = 0
        groups[-1].append(name)
        held += size
    return groups


def _rows(sample: dict) -> int:
    return sample_rows(sample) or 1


def static_gptq_weights(model: ir.Model, layers: Sequence, samples: Sequence, per_channel: bool) -> dict[tuple[int, int | None], QuantizedWeight]:
    """quantize-static's weight cache (``_qstatic.apply_plan``: ``(id(tensor), axis)`` -> int8
    symmetric weight) filled with GPTQ roundings of ``layers`` (Conv per group on im2col Hessians,
    MatMul/Gemm on their captured inputs), per output channel; per-tensor scales keep plain rounding."""
    if not per_channel or not samples:
        return {}
    qt = QTYPES["int8"]
    out: dict[tuple[int, int | None], QuantizedWeight] = {}
    for convs in conv_calibration(model, layers, samples).values():
        for layer in layers:
            if layer.kind == "conv" and layer.node.outputs[0].name in convs:
                out[(id(layer.tensor), 0)] = convs[layer.node.outputs[0].name].gptq(layer.tensor.numpy(), qt, block_size=0, symmetric=True)[0]
    dense = [layer for layer in layers if layer.kind in ("matmul", "gemm") and layer.node.graph is model.graph]
    acts = capture(model, samples, sorted({layer.node.inputs[0].name for layer in dense}))
    for layer in dense:
        w_nk = layer.matrix().T
        g, _ = gptq(w_nk, acts[layer.node.inputs[0].name], qt, block_size=0, symmetric=True, search=True)
        if layer.output_axis == 1:  # the stored weight is [K, N]
            g = QuantizedWeight(np.ascontiguousarray(g.q.T), g.scale, g.zero_point, qt, axis=1)
        out[(id(layer.tensor), layer.output_axis)] = g
    return out
