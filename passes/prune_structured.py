"""prune-structured: remove whole output channels and shrink everything that reads them.

A Conv (group 1) loses output filters, a Gemm/MatMul output columns; with them go the layer's bias,
the matching entries of a following BatchNormalization / per-channel constants, and the input rows of
every Conv/Gemm/MatMul that reads those channels, through elementwise ops, pools, depthwise Conv,
Flatten/Reshape into a Gemm, Transpose, Squeeze, Concat. Layers tied by an elementwise op (a residual
Add) form one group that drops the same channels. Where the analysis (``passes/_channels.py``) cannot
prove a rewrite safe, that group stays whole and the reason is counted (``skipped_<reason>``).

Channels are ranked by the L2 or L1 norm of their weights, or (``score=data``) by how much they feed
the next layers: ``‖W_next rows‖ · RMS(activation)`` from calibration data. With calibration data,
``compensate`` adds each removed channel's mean contribution to the next layer's bias (exact for a
channel that is constant, much better than nothing for the others). ``ratio`` counts from the
channels a layer had before the first run (kept in the node's metadata), so a second run at the same
ratio changes nothing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections import Counter, defaultdict
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt.activations import capture
from graphopt.edit import NameSet, add_initializer, constant_array, constant_tensor, replace_weight
from graphopt.layers import LinearLayer, linear_layers
from graphopt.metrics import Tolerance
from graphopt.passbase import GraphPass, PassResult, option
from graphopt.registry import register

from ._channels import Analysis, Layout, analyze

logger = logging.getLogger(__name__)

CHANNELS_KEY = "graphopt.prune_structured.channels"
"""Node metadata on a pruned layer: its output channels before the first prune-structured run."""

STRUCTURED_TOLERANCE = Tolerance(min_sqnr_db=10.0, min_cosine=0.95)
"""Default budget. Removing channels without retraining moves outputs more than zeroing single
weights does; 10 dB (error RMS under a third of the output's RMS, cosine ≥ 0.95) keeps what the
model computes recognisable. Measured (benchmarks/results/prune.md): 25% of channels with the
defaults stays inside on all four trained models (12.3-23.9 dB, accuracy -0.8 to +0.4 points); 50% is
rejected on the digits models (2.7-7.9 dB, -6 to -15 points) and kept on seq_transformer (15.3 dB,
-0.6 points). Tighten with ``budget-min-sqnr=``."""


@register
@dataclasses.dataclass
class PruneStructured(GraphPass):
    """Remove whole output channels of Conv/Gemm/MatMul layers and shrink every tensor that reads them: a smaller, faster model."""

    name = "prune-structured"
    lossless = False
    tolerance = STRUCTURED_TOLERANCE
    uses_data = True

    ratio: float = option(0.25, "fraction of each layer's output channels to remove (counted from before the first run)")
    score: Literal["l2", "l1", "data"] = option("data", "channel ranking: weight norm, or contribution to the next layers from calibration data")
    compensate: bool = option(True, "with calibration data, add removed channels' mean contribution to the next layer's bias")
    sequential: bool = option(False, "with calibration data, prune one group at a time, measured on the model pruned so far")
    include: list[str] = option([], "only layers whose node or weight name matches one of these globs")
    exclude: list[str] = option([], "leave layers whose node or weight name matches one of these globs")
    min_channels: int = option(8, "leave layers with fewer output channels alone")
    channel_multiple: int = option(8, "round kept channel counts to a multiple of this (ORT's blocked NCHWc conv kernels want 8 on AVX2, 16 on AVX-512); 1: off")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.channel_multiple < 1:
            raise ValueError(f"channel-multiple must be >= 1, got {self.channel_multiple}")

    def keep_count(self, before: int) -> int:
        """Channels a layer that had ``before`` keeps: the ratio, rounded to the nearest multiple (half up)."""
        keep = max(1, before - int(self.ratio * before))
        if self.channel_multiple > 1 and before >= self.channel_multiple:
            keep = max(self.channel_multiple, int(keep / self.channel_multiple + 0.5) * self.channel_multiple)
        return min(keep, before)

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        records: list[dict[str, object]] = []
        data = self.calibration is not None and bool(self.calibration.samples) and (self.score == "data" or self.compensate)
        done: set[int] = set()
        while True:
            first = not done
            analysis = analyze(model, self._producers(model, stats if first else Counter()))
            groups: dict[int, list[int]] = defaultdict(list)
            for space in analysis.producers:
                groups[analysis.root(space)].append(space)
            wanted = [(r, s) for r, s in groups.items() if not {id(analysis.producers[x].node) for x in s} & done]
            wanted = [(r, s) for r, s in wanted if self._wanted(analysis, r, s, stats if first else Counter())]
            if not wanted:
                break
            if first and self.score == "data" and not data:
                stats["no_calibration"] += 1  # ranked by l2 instead
            if data and self.sequential:
                wanted = wanted[:1]  # one group at a time, measured on the model pruned so far
            acts = self._activations(model, analysis, stats) if data else {}
            kept: dict[int, np.ndarray] = {}
            for root, spaces in wanted:
                layers = [analysis.producers[s] for s in spaces]
                channels = layers[0].shape[layers[0].output_axis]
                before = max(int(layer.node.metadata_props.get(CHANNELS_KEY, channels)) for layer in layers)
                keep_n = self.keep_count(before)
                score, how = self._score(analysis, root, layers, acts)
                keep = np.sort(np.argsort(-score, kind="stable")[:keep_n])
                for s in spaces:
                    kept[s] = keep
                for layer in layers:
                    layer.node.metadata_props[CHANNELS_KEY] = str(before)
                    done.add(id(layer.node))
                stats["groups_pruned"] += 1
                stats["channels_removed"] += (channels - keep_n) * len(layers)
                records.append({"layer": ",".join(layer.name for layer in layers), "channels_before": channels, "channels": keep_n, "score": how})
            stats["params_removed"] += _apply(model, analysis, kept, acts if self.compensate else {}, stats)
            if not (data and self.sequential):
                break
        logger.debug("%s: %s", self.name, dict(stats))
        return PassResult(model, modified=bool(records), stats=dict(stats), layers=records)

    def _producers(self, model: ir.Model, stats: Counter[str]) -> list[LinearLayer]:
        out = []
        for layer in linear_layers(model):
            names = [layer.node.name or "", layer.weight.name or ""]
            bias = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
            if self.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.include):
                continue
            if any(fnmatch.fnmatchcase(n, p) for n in names for p in self.exclude):
                stats["skipped_excluded"] += 1
            elif layer.node.graph is not model.graph:
                stats["skipped_subgraph"] += 1
            elif layer.kind == "matmul-left" or (layer.kind == "conv" and layer.group != 1):
                stats["skipped_grouped_conv" if layer.kind == "conv" else "skipped_matmul_left"] += 1
            elif layer.is_shared():
                stats["skipped_shared_weight"] += 1
            elif bias is not None and constant_tensor(bias) is None:
                stats["skipped_bias_not_constant"] += 1
            elif layer.shape[layer.output_axis] < self.min_channels:
                stats["skipped_small"] += 1
            else:
                out.append(layer)
        return out

    def _wanted(self, analysis: Analysis, root: int, spaces: list[int], stats: Counter[str]) -> bool:
        if root in analysis.blocked:
            stats[f"skipped_{analysis.blocked[root]}"] += 1
            return False
        layers = [analysis.producers[s] for s in spaces]
        channels = layers[0].shape[layers[0].output_axis]
        before = max(int(layer.node.metadata_props.get(CHANNELS_KEY, channels)) for layer in layers)
        if channels <= self.keep_count(before):
            stats["at_target"] += 1
            return False
        return True

    def _activations(self, model: ir.Model, analysis: Analysis, stats: Counter[str]) -> dict[str, np.ndarray]:
        """Terminal inputs over the calibration data, concatenated along the batch axis."""
        assert self.calibration is not None
        names = sorted({layer.node.inputs[1 if layer.kind == "matmul-left" else 0].name for layer, _ in analysis.terminals} - {None})  # type: ignore[arg-type]
        try:
            got = capture(model, list(self.calibration.samples), names)
        except Exception as e:
            logger.warning("prune-structured: activation capture failed (%s)", e)
            stats["capture_failed"] += 1
            return {}
        return {n: np.concatenate([np.asarray(a, np.float64) for a in arrays], axis=0) for n, arrays in got.items()}

    def _score(self, analysis: Analysis, root: int, layers: list[LinearLayer], acts: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
        if self.score == "data" and acts:
            total = None
            for layer, layout in analysis.terminals:
                x = acts.get(layer.node.inputs[1 if layer.kind == "matmul-left" else 0].name or "")
                if x is None or not any(s.space is not None and analysis.root(s.space) == root for s in layout.segments):
                    continue
                w = np.moveaxis(np.asarray(layer.tensor.numpy(), np.float64), _edit_axis(analysis, layer), 0)
                rows = np.moveaxis(x, layout.axis, 0).reshape(layout.size, -1)
                # what removing a channel costs the next layer: E[x²]·‖W_row‖², or Var[x]·‖W_row‖² when its mean is compensated
                second = np.var(rows, axis=1) if self.compensate and _exact_compensation(layer) else np.mean(np.square(rows), axis=1)
                contrib = second * np.sum(np.square(w.reshape(w.shape[0], -1)), axis=1)
                offset = 0
                for s in layout.segments:
                    if s.space is not None and analysis.root(s.space) == root:
                        part = contrib[offset : offset + s.channels * s.inner].reshape(s.channels, s.inner).sum(axis=1)
                        total = part if total is None else total + part
                    offset += s.channels * s.inner
            if total is not None:
                return np.sqrt(total), "data"
        total = 0.0
        for layer in layers:
            w = np.moveaxis(np.asarray(layer.tensor.numpy(), np.float64), layer.output_axis, 0).reshape(layer.shape[layer.output_axis], -1)
            norm = np.abs(w).sum(axis=1) if self.score == "l1" else np.sqrt(np.square(w).sum(axis=1))
            total = total + norm / max(float(norm.mean()), 1e-30)
        return np.asarray(total), "l1" if self.score == "l1" else "l2"


def _exact_compensation(layer: LinearLayer) -> bool:
    """Whether a constant input channel adds a constant to every output: not for a padded Conv (borders differ)."""
    if layer.kind != "conv":
        return True
    pads = layer.node.attributes.get_ints("pads", [])
    return layer.node.attributes.get_string("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(pads)


def _edit_axis(analysis: Analysis, layer: LinearLayer) -> int:
    """The weight axis a terminal loses rows along (its reduction axis over the incoming channels)."""
    return 1 if layer.kind == "conv" else layer.reduction_axes[0]


def _apply(model: ir.Model, analysis: Analysis, kept: dict[int, np.ndarray], acts: dict[str, np.ndarray], stats: Counter[str]) -> int:
    """Shrink every constant, attribute and shape that follows a pruned space; returns parameters removed."""
    names = NameSet(model)
    arrays: dict[tuple[int, int], tuple[ir.Node, np.ndarray]] = {}
    for edit in analysis.edits:
        positions = edit.layout.positions(kept)
        if len(positions) == edit.layout.size:
            continue
        key = (id(edit.node), edit.index)
        node, array = arrays.get(key, (edit.node, constant_array(edit.node.inputs[edit.index])))
        assert array is not None
        arrays[key] = (node, np.take(array, positions, axis=edit.axis))
    deltas = _compensation(analysis, kept, acts, stats) if acts else {}
    removed = 0
    for (_, index), (node, array) in arrays.items():
        removed += int(constant_tensor(node.inputs[index]).size) - array.size  # type: ignore[union-attr]
    for node, delta in deltas.values():
        _add_bias(node, delta, arrays, names)
    for (_, index), (node, array) in arrays.items():
        replace_weight(node, index, np.ascontiguousarray(array), names)
    for node, layout in analysis.depthwise:
        node.attributes["group"] = ir.AttrInt64("group", len(layout.positions(kept)))
    for node, layout in analysis.reshapes:
        _fix_reshape(node, layout, kept, names)
    for value, layout in analysis.values:
        new = len(layout.positions(kept))
        if new != layout.size and value.shape is not None and layout.rank == len(value.shape):
            dims = list(value.shape.dims)
            dims[layout.axis] = new
            value.shape = ir.Shape(dims)
    return removed


def _compensation(analysis: Analysis, kept: dict[int, np.ndarray], acts: dict[str, np.ndarray], stats: Counter[str]) -> dict[int, tuple[ir.Node, np.ndarray]]:
    """Per terminal: Σ over removed inputs of mean(x)·W_row, in the terminal's (already pruned) output space."""
    out: dict[int, tuple[ir.Node, np.ndarray]] = {}
    producer_of = {id(layer.node): space for space, layer in analysis.producers.items()}
    for layer, layout in analysis.terminals:
        positions = layout.positions(kept)
        x = acts.get(layer.node.inputs[0].name or "") if layer.kind != "matmul-left" else None
        if len(positions) == layout.size or x is None:
            continue
        removed = np.setdiff1d(np.arange(layout.size), positions)
        mean = np.mean(np.moveaxis(x, layout.axis, 0).reshape(layout.size, -1), axis=1)[removed]
        w = np.asarray(layer.tensor.numpy(), np.float64)
        if layer.kind == "conv":
            delta = np.einsum("c,oc->o", mean, w[:, removed].reshape(w.shape[0], len(removed), -1).sum(axis=2))
        else:
            delta = mean @ layer.matrix().astype(np.float64)[removed]
            delta = delta * layer.node.attributes.get_float("alpha", 1.0) if layer.kind == "gemm" else delta
        if id(layer.node) in producer_of and (own := kept.get(producer_of[id(layer.node)])) is not None:
            delta = delta[own]
        out[id(layer.node)] = (layer.node, delta)
        stats["compensated"] += 1
    return out


def _add_bias(node: ir.Node, delta: np.ndarray, arrays: dict[tuple[int, int], tuple[ir.Node, np.ndarray]], names: NameSet) -> None:
    """Add ``delta`` (one value per output channel) to the bias of a Conv/Gemm, or of the Add after a MatMul."""
    if node.op_type == "MatMul":
        users = node.outputs[0].uses()
        if len(users) != 1 or users[0][0].op_type != "Add":
            return
        node, index = users[0][0], 1 - users[0][1]
        if constant_array(node.inputs[index]) is None:
            return
    else:
        index = 2
        if node.op_type == "Gemm":
            beta = node.attributes.get_float("beta", 1.0)
            if beta == 0.0:
                return
            delta = delta / beta
    key = (id(node), index)
    current = arrays[key][1] if key in arrays else (constant_array(node.inputs[index]) if len(node.inputs) > index and node.inputs[index] is not None else None)
    if current is None:
        node.resize_inputs(index + 1)
        node.replace_input_with(index, add_initializer(node.graph, np.zeros(len(delta), np.float32), f"{node.name or node.op_type}.bias", names))  # type: ignore[arg-type]
        current = np.zeros(len(delta), np.float32)
    if current.ndim == 0 or current.shape[-1] == 1:
        current = np.broadcast_to(current, (*current.shape[:-1], len(delta)) if current.ndim else (len(delta),))
    arrays[key] = (node, (current + delta.astype(current.dtype)).astype(current.dtype))


def _fix_reshape(node: ir.Node, layout: Layout, kept: dict[int, np.ndarray], names: NameSet) -> None:
    """The target shape's entry at the channel axis, when written out, follows the new channel count."""
    target = constant_array(node.inputs[1])
    p = layout.positive_axis
    if target is None or p is None or target[p] in (-1, 0):
        return
    new = target.copy()
    new[p] = int(target[p]) // layout.size * len(layout.positions(kept))
    replace_weight(node, 1, new, names)

