"""Empirical bias correction for weight quantization (Nagel et al. 2019 §4.2; Finkelstein et al. 2019).

Quantizing a weight ``W`` to ``W_q`` shifts a layer's output by ``(W_q - W) * x``, whose mean per
output channel is not zero (a depthwise 3x3 conv sums only 9 rounding errors per channel), and
the shift accumulates through the network. Subtracting its mean over the calibration data from the
layer's bias removes it exactly on average:

- Conv: ``mean over batch and positions of conv(x, W_q - W)`` per output channel equals
  ``sum(dW[o] * M[group(o)])`` where ``M[c, k]`` is the mean of the zero-padded input seen at kernel
  offset ``k`` over every output position (strides, dilations, pads/auto_pad, groups as in the node).
  ``M`` only needs the batch mean of ``x``, which onnxruntime computes in-graph (one run, memory
  bounded by the layer inputs' size, not the number of rows).
- MatMul ``X @ W`` / Gemm: ``alpha * E[x] @ dW`` with ``E[x]`` the mean input row.

Where the shift goes: Conv's bias input (a bias is added when there is none), Gemm's ``C`` (divided
by ``beta``; only a per-column ``C``, or none), a MatMul's sole reader when it is an ``Add`` of a
constant per-column vector. A bias that is shared, not constant or not per channel is left alone
(``matmul-left``, ``W @ X``, has no per-channel bias path). New biases are new initializers.

Which inputs: the float model's (each layer corrected for its own weight error). Correcting from the
partially quantized model's inputs instead (sequential: one onnxruntime run per layer, so the
shift a layer inherits is corrected too) gave EfficientNet-Lite0's int8 weights 26.3 dB against
26.1 dB (uncorrected 19.2 dB; 16 scored rows) for 50 runs instead of one: not worth it.

On by default in quantize-weights, -static and -dynamic (benchmarks/results/bias_correction.md):
int8 weights, all layers quantized, scored SQNR: EfficientNet-Lite0 19.6 -> 25.1 dB (top-1
agreement 88.9 -> 94.4 %), ocr_det 17.9 -> 29.8, ocr_rec 18.9 -> 23.6, ocr_cls 51.3 -> 58.3,
digits_cnn 50.0 -> 51.7, light_squeezenet 18.5 -> 42.4, light_resnet50 1.8 -> 7.2; quantize-static
all-int8 EfficientNet 18.0 -> 22.2 dB (top-1 86.1 -> 94.4 %), and with the search no layer kept in
float (4 without). Where activation rounding dominates (ocr_det/ocr_rec static) it gains little
(+0.1/+0.3 dB), and it lost on none of the 7 models x 2 passes measured all-int8.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.data import Sample, dynamic_batch, sample_rows
from graphopt.edit import NameSet, add_initializer, constant_array, drop_if_unused, is_onnx_op, onnx_opset
from graphopt.layers import LinearLayer
from graphopt.passes._util import conv_geometry, conv_out_size, tap_windows
from graphopt.verify import OrtFailure, run

logger = logging.getLogger(__name__)

BIAS_ROWS, CHUNK_ROWS = 32, 8
"""The means are taken over at most this many calibration rows, run this many rows at a time."""

Key = tuple[str, Hashable]
"""(layer input name, reduction spec): layers reading the same input the same way share their mean."""


def layer_key(layer: LinearLayer) -> Key | None:
    """What the layer's mean input depends on, or None when it has no per-channel bias path to correct."""
    node = layer.node
    x = node.inputs[0]
    if x is None or x.name is None or layer.kind not in ("conv", "matmul", "gemm"):  # matmul-left (W @ X), gather tables
        return None
    if layer.kind == "conv":
        a = node.attributes
        kernel = tuple(int(d) for d in layer.shape[2:])
        n = len(kernel)
        spec = (
            "conv",
            kernel,
            tuple(a.get_ints("strides", [1] * n)),
            tuple(a.get_ints("dilations", [1] * n)),
            tuple(a.get_ints("pads", [0] * 2 * n)),
            a.get_string("auto_pad", "NOTSET"),
        )
        return x.name, spec
    k = layer.shape[1 - layer.output_axis]
    if layer.kind == "gemm" and node.attributes.get_int("transA", 0):
        return x.name, ("cols", k)
    return x.name, ("rows", k)


def lookup(means: dict[Key, np.ndarray], layer: LinearLayer) -> np.ndarray | None:
    key = layer_key(layer)
    return means.get(key) if key is not None else None


def input_means(model: ir.Model, layers: Sequence[LinearLayer], samples: Sequence[Sample]) -> dict[Key, np.ndarray]:
    """Per key, what the shift is contracted with: ``M[C, *kernel]`` for convs, ``E[x][K]`` for MatMul/Gemm.

    Main-graph layers only; the batch mean of each input comes from onnxruntime (``ReduceMean`` added
    to a clone) over at most ``BIAS_ROWS`` calibration rows."""
    wanted: dict[Key, LinearLayer] = {}
    for layer in layers:
        key = layer_key(layer)
        if key is not None and layer.node.graph is model.graph:
            wanted.setdefault(key, layer)
    if not wanted or not samples:
        return {}
    clone = model.clone()
    values = {v.name: v for v in clone.graph.inputs}
    for node in clone.graph:
        values.update({v.name: v for v in node.outputs if v.name})
    opset = onnx_opset(clone)
    fresh = NameSet(clone).fresh
    reduced: dict[tuple[str, str, int], str] = {}  # (input, how, K) -> output name
    outputs: list[ir.Value] = []

    def const(array: np.ndarray, base: str) -> ir.Value:
        node = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(array))], outputs=[ir.Value(name=fresh(f"{base}_const"))])
        clone.graph.append(node)
        return node.outputs[0]

    def reduce_mean(x: ir.Value, axis: int, base: str) -> ir.Value:
        if opset >= 18:
            node = ir.Node("", "ReduceMean", [x, const(np.array([axis], np.int64), base)], attributes=[ir.AttrInt64("keepdims", 0)])
        else:
            node = ir.Node("", "ReduceMean", [x], attributes=[ir.AttrInt64s("axes", [axis]), ir.AttrInt64("keepdims", 0)])
        clone.graph.append(node)
        out = node.outputs[0]
        out.name, out.type = fresh(f"{base}_mean"), ir.TensorType(ir.DataType.FLOAT)
        outputs.append(out)
        return out

    for (name, spec), _ in wanted.items():
        how, k = (spec[0], spec[1]) if spec[0] != "conv" else ("conv", 0)
        if (name, how, k) in reduced or name not in values:
            continue
        x = values[name]
        if how == "rows":
            shape = ir.Node("", "Reshape", [x, const(np.array([-1, k], np.int64), "shape")])
            clone.graph.append(shape)
            x = shape.outputs[0]
        reduced[(name, how, k)] = reduce_mean(x, 1 if how == "cols" else 0, name).name
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(outputs)
    chunks = _chunks(model, samples)
    try:
        results = run(clone, [c for c, _ in chunks], "exact")
    except OrtFailure as e:  # the layers then count as no_statistics
        logger.warning("bias correction: onnxruntime cannot compute the layer input means: %s", e)
        return {}
    out: dict[Key, np.ndarray] = {}
    for key, layer in wanted.items():
        name, spec = key
        how, k = (spec[0], spec[1]) if spec[0] != "conv" else ("conv", 0)
        if (name, how, k) not in reduced:
            continue
        parts = [(rows, r[reduced[(name, how, k)]].astype(np.float64)) for r, (_, rows) in zip(results, chunks)]
        out[key] = _mean_patch(parts, layer) if how == "conv" else _weighted(parts)
    return out


def _chunks(model: ir.Model, samples: Sequence[Sample]) -> list[tuple[Sample, int]]:
    """Samples cut into pieces of at most ``CHUNK_ROWS`` rows (batch axis, when every input's is
    dynamic and the sample's arrays agree on it), ``BIAS_ROWS`` rows in all; with their row counts."""
    dynamic = dynamic_batch(model)
    out: list[tuple[Sample, int]] = []
    total = 0
    for s in samples:
        n = sample_rows(s) if dynamic else None
        if n is None:
            out.append((dict(s), 1))
            total += 1
        else:
            limit = min(n, BIAS_ROWS - total)
            for start in range(0, limit, CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, limit)
                out.append(({k: v[start:stop] for k, v in s.items()}, stop - start))
            total += limit
        if total >= BIAS_ROWS:
            break
    return out


def _weighted(parts: list[tuple[int, np.ndarray]]) -> np.ndarray:
    total = sum(n for n, _ in parts)
    return sum(n * a for n, a in parts) / total


def _mean_patch(parts: list[tuple[int, np.ndarray]], layer: LinearLayer) -> np.ndarray:
    """``M[C, *kernel]``: the mean (over rows and output positions) of the padded input each kernel tap reads."""
    total, acc = 0.0, None
    for rows, xbar in parts:  # xbar: [C, *spatial], the mean over this chunk's rows
        geo = conv_geometry(layer.node, (1, *xbar.shape), layer.shape)
        nd, out = len(geo.kernel), conv_out_size(geo, xbar.shape[1:])
        xp = np.pad(xbar, [(0, 0)] + list(zip(geo.pads[:nd], geo.pads[nd:])))
        m = np.empty((xbar.shape[0], *geo.kernel))
        for tap, window in tap_windows(geo, out):
            m[(slice(None), *tap)] = xp[(slice(None), *window)].reshape(xbar.shape[0], -1).mean(axis=1)
        weight = rows * float(np.prod(out))
        acc = m * weight if acc is None else acc + m * weight
        total += weight
    assert acc is not None
    return acc / total


def output_shift(layer: LinearLayer, dw: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Mean change of the layer's output per output channel caused by adding ``dw`` (stored layout) to its weight."""
    dw = dw.astype(np.float64)
    if layer.kind == "conv":
        group = layer.group
        cout = dw.shape[0]
        w = dw.reshape(group, cout // group, -1)  # [g, Cout/g, Cin/g * K]
        m = mean.reshape(group, -1)  # [g, Cin/g * K]
        return np.einsum("goj,gj->go", w, m).reshape(cout)
    dw_kn = dw if layer.output_axis == 1 else dw.T
    shift = mean @ dw_kn
    if layer.kind == "gemm":
        shift = shift * layer.node.attributes.get_float("alpha", 1.0)
    return shift


def correct_bias(layer: LinearLayer, w: np.ndarray, w_q: np.ndarray, mean: np.ndarray | None, names: NameSet) -> dict[str, Any]:
    """Subtract the mean output shift of ``w -> w_q`` (stored layout) from the layer's bias (a new
    initializer), given the layer's entry of :func:`input_means` (``lookup``).

    Returns the layer record's fields: ``bias_correction`` ("applied" or why not), and when applied
    ``bias_shift_rms`` and ``bias_shift_rel`` (RMS of the shift over the RMS of the mean output)."""
    if layer_key(layer) is None:
        return {"bias_correction": "no_bias_path"}
    if mean is None:
        return {"bias_correction": "no_statistics"}
    shift = output_shift(layer, w_q.astype(np.float64) - w.astype(np.float64), mean)
    site = _bias_site(layer, shift.size)
    if isinstance(site, str):
        return {"bias_correction": site}
    node, index, bias, scale = site
    old = node.inputs[index] if index < len(node.inputs) else None
    b = np.zeros(shift.size) if bias is None else bias.astype(np.float64).reshape(-1)
    b = np.broadcast_to(b, shift.shape)
    new = (b - shift / scale).astype(np.float32)
    shape = bias.shape if bias is not None and bias.size == shift.size else (shift.size,)
    graph = node.graph
    assert graph is not None
    base = (old.name if old is not None and old.name else (layer.node.outputs[0].name or "y") + "_bias") + "_bc"
    value = add_initializer(graph, new.reshape(shape), base, names)
    if old is None:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    if old is not None:
        drop_if_unused(old)
    out_mean = float(np.sqrt(np.mean((output_shift(layer, w.astype(np.float64), mean) + b * scale) ** 2)))
    rms = float(np.sqrt(np.mean(shift**2)))
    return {"bias_correction": "applied", "bias_shift_rms": _round(rms), "bias_shift_rel": _round(rms / out_mean) if out_mean > 0 else None}


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _bias_site(layer: LinearLayer, n: int) -> tuple[ir.Node, int, np.ndarray | None, float] | str:
    """(node, input index, current bias or None, factor the bias is multiplied by) or why there is none."""
    node = layer.node
    if layer.kind in ("conv", "gemm"):
        value = node.inputs[2] if len(node.inputs) > 2 else None
        scale = node.attributes.get_float("beta", 1.0) if layer.kind == "gemm" else 1.0
        if scale == 0.0:
            return "bias_beta_zero"
        if value is None:
            return node, 2, None, scale
        return _check_bias(value, n, layer.kind == "gemm") or (node, 2, constant_array(value), scale)
    y = node.outputs[0]
    uses = list(y.uses())
    if y.is_graph_output() or len(uses) != 1 or not is_onnx_op(uses[0][0], "Add"):
        return "no_bias_add"
    add, k = uses[0]
    value = add.inputs[1 - k]
    if value is None:
        return "no_bias_add"
    why = _check_bias(value, n, False)
    if why:
        return why
    bias = constant_array(value)
    assert bias is not None
    if bias.size != n or bias.shape[-1] != n:  # a size-n bias along another axis, or one that broadcasts
        return "bias_not_per_channel"
    return add, 1 - k, bias, 1.0


def _check_bias(value: ir.Value, n: int, broadcast_ok: bool) -> str | None:
    bias = constant_array(value)
    if bias is None:
        return "bias_not_constant"
    if bias.dtype != np.float32:
        return "bias_dtype"
    if len(value.uses()) != 1 or value.is_graph_output() or value.is_graph_input():
        return "bias_shared"
    if bias.size == n and (bias.ndim == 1 or bias.shape[-1] == n):
        return None
    if broadcast_ok and bias.size == 1 and bias.ndim <= 1:
        return None
    return "bias_not_per_channel"
