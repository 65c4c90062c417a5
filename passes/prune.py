"""Unstructured pruning: zero the least important weights of MatMul/Gemm/Conv layers.

``prune-magnitude`` zeros weights by ``|w|`` (or Wanda's ``|w|·‖x‖``, ``score=wanda``) down to a
``sparsity`` or below a ``threshold``; ``prune-nm`` keeps ``n`` of every ``m`` consecutive weights
along the reduction axis (2:4 is the layout sparse tensor cores run). Only the weight input of
layers with a constant float weight is touched; biases, normalization parameters and embedding
tables are left alone (tables only with ``embeddings=true``). A weight read by several layers is
pruned once for all of them; one also read by anything else is left alone.

Both passes are idempotent at a fixed target: weights already zero count toward it and score below
every non-zero weight, so a second run at the same target finds nothing to do. Schedules such as
``prune-magnitude{sparsity=0.3},prune-magnitude{sparsity=0.6}`` prune further at each step and the
runner verifies each step against the original model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.activations import capture, rows
from graphopt.edit import NameSet, add_initializer, constant_tensor, drop_if_unused, is_onnx_op
from graphopt.layers import FLOAT_TYPES, LinearLayer, linear_layers
from graphopt.metrics import Tolerance
from graphopt.passbase import Calibration, GraphPass, PassResult, option
from graphopt.registry import register
from graphopt.passes._util import conv_geometry, conv_out_size, tap_windows

logger = logging.getLogger(__name__)

PRUNE_TOLERANCE = Tolerance(min_sqnr_db=12.0, min_cosine=0.97)
"""Default budget of the unstructured pruning passes. Pruning without retraining changes outputs by
design, so a bit-level budget would reject every useful run; this one rejects runs that change what
the model computes: at 12 dB the output error's RMS is a quarter of the output's RMS (cosine ≥ 0.97).
Measured (benchmarks/results/prune.md): 50% magnitude stays inside on digits_skl_mlp (15.1 dB) and
digits_mlp_wide (12.6 dB), and on digits_cnn with the default min-size (15.8 dB; also pruning its
144-weight first conv gives 4.3 dB and -17.5 points); seq_transformer at 50% (11.5 dB, -4.2 points
per-token accuracy), 2:4 on three of the four models (7.0-7.4 dB) and every 70%/90% run are rejected.
Loosen or tighten per run with ``budget-min-sqnr=`` / ``budget-min-cosine=``."""


@dataclasses.dataclass
class Target:
    """One weight tensor to prune and every layer that reads it (none for an embedding table)."""

    value: ir.Value
    layers: list[LinearLayer]

    @property
    def name(self) -> str:
        return self.layers[0].name if len(self.layers) == 1 else (self.value.name or "?")

    @property
    def array(self) -> np.ndarray:
        tensor = constant_tensor(self.value)
        assert tensor is not None
        return tensor.numpy()


def select_targets(
    model: ir.Model, include: Sequence[str], exclude: Sequence[str], min_size: int, embeddings: bool, stats: Counter[str]
) -> list[Target]:
    """The weights a pruning pass may change, each once; reasons for the others go into ``stats``."""
    by_value: dict[int, Target] = {}
    for layer in linear_layers(model):
        target = by_value.setdefault(id(layer.weight), Target(layer.weight, []))
        target.layers.append(layer)
    if embeddings:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            table = node.inputs[0] if is_onnx_op(node, "Gather") and node.inputs else None
            tensor = constant_tensor(table)
            if table is not None and tensor is not None and tensor.dtype in FLOAT_TYPES and id(table) not in by_value:
                by_value[id(table)] = Target(table, [])
    out = []
    for target in by_value.values():
        names = [target.value.name or ""] + [layer.node.name or "" for layer in target.layers]
        uses = target.value.uses()
        layer_uses = {(id(layer.node), layer.weight_index) for layer in target.layers}
        other = [node for node, index in uses if (id(node), index) not in layer_uses]
        if include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in include):
            stats["skipped_not_included"] += 1
        elif any(fnmatch.fnmatchcase(n, p) for n in names for p in exclude):
            stats["skipped_excluded"] += 1
        elif target.value.is_graph_output():
            stats["skipped_graph_output"] += 1
        elif any(is_onnx_op(node, "Gather") for node in other) and not embeddings:
            stats["skipped_embedding"] += 1  # a table shared with an embedding lookup (tied weights)
        elif any(not (is_onnx_op(node, "Gather") and embeddings) for node in other):
            stats["skipped_shared_weight"] += 1
        elif target.array.size < min_size:
            stats["skipped_small"] += 1
        else:
            out.append(target)
    return out


def replace_everywhere(value: ir.Value, array: np.ndarray, names: NameSet) -> ir.Value:
    """Give every user of ``value`` a new initializer holding ``array`` (the old tensor is never written)."""
    producer = value.producer()
    graph = value.graph if value.is_initializer() else producer.graph if producer is not None else None
    assert graph is not None
    new = add_initializer(graph, array, value.name or "w", names)
    for node, index in list(value.uses()):
        node.replace_input_with(index, new)
    drop_if_unused(value)
    return new


# --- Wanda: ‖x‖₂ of the input feature each weight multiplies, from calibration activations ----------


def wanda_scales(targets: Sequence[Target], calibration: Calibration | None, model: ir.Model, stats: Counter[str]) -> dict[int, np.ndarray]:
    """Per target, ``‖x‖₂`` broadcast to the stored weight's shape (targets without data are left out)."""
    if calibration is None or not calibration.samples:
        stats["no_calibration"] += 1
        return {}
    wanted = {layer.node.inputs[_data_index(layer)].name for t in targets for layer in t.layers if layer.node.graph is model.graph}
    try:
        acts = capture(model, list(calibration.samples), sorted(n for n in wanted if n))
    except Exception as e:  # ORT cannot run the model: prune by magnitude and say so
        logger.warning("wanda: activation capture failed (%s); falling back to magnitude", e)
        stats["wanda_capture_failed"] += 1
        return {}
    out = {}
    for target in targets:
        total = None
        for layer in target.layers:
            x = layer.node.inputs[_data_index(layer)]
            if layer.node.graph is not model.graph or x is None or x.name not in acts:
                total = None
                break
            sq = _feature_sq_sums(layer, acts[x.name])
            total = sq if total is None else total + sq
        if total is None:
            stats["wanda_fallback_magnitude"] += 1
        else:
            out[id(target.value)] = np.sqrt(total)
    return out


def _data_index(layer: LinearLayer) -> int:
    return 1 if layer.kind == "matmul-left" else 0


def _feature_sq_sums(layer: LinearLayer, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Σx² of the input feature each stored weight element multiplies, shaped to broadcast on the weight."""
    shape = layer.shape
    if layer.kind == "conv":
        return _conv_patch_sq_sums(layer, arrays)
    k = shape[1 - layer.output_axis]
    axis = -2 if layer.kind == "matmul-left" else (0 if layer.node.attributes.get_int("transA", 0) else -1)
    sq = np.sum(np.square(rows(arrays, k, axis)), axis=0)
    return sq.reshape((k, 1) if layer.output_axis == 1 else (1, k))


def _conv_patch_sq_sums(layer: LinearLayer, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Σx² over every patch position for each (input channel, kernel offset), per output group."""
    w_shape = layer.shape
    cout, cpg, kernel = w_shape[0], w_shape[1], w_shape[2:]
    total = np.zeros((cpg * layer.group, *kernel))
    for x in arrays:
        x2 = np.square(np.asarray(x, dtype=np.float64))
        geo = conv_geometry(layer.node, x2.shape, w_shape)
        nd, outs = len(kernel), conv_out_size(geo, x2.shape[2:])
        xp = np.pad(x2, [(0, 0), (0, 0)] + [(geo.pads[i], geo.pads[i + nd]) for i in range(nd)])
        for offset, window in tap_windows(geo, outs):
            total[(slice(None), *offset)] += xp[(slice(None), slice(None), *window)].sum(axis=tuple([0] + list(range(2, 2 + nd))))
    per_group = cout // layer.group
    groups = np.repeat(np.arange(layer.group), per_group)  # output channel -> its group
    return np.stack([total[g * cpg : (g + 1) * cpg] for g in groups])


# --- the passes ----------------------------------------------------------------------------------


def _scores(target: Target, scales: dict[int, np.ndarray]) -> np.ndarray:
    """Importance per element (float64); weights already zero get -1, below every other score."""
    w = target.array
    score = np.abs(w.astype(np.float64))
    if id(target.value) in scales:
        score = score * scales[id(target.value)]
    return np.where(w == 0, -1.0, score)


def _lowest(score: np.ndarray, k: int, axis: int | None) -> np.ndarray:
    """Mask of the ``k`` lowest scores (over the whole array, or along ``axis`` in every slice)."""
    mask = np.zeros(score.shape, dtype=bool)
    if k <= 0:
        return mask
    if axis is None:
        flat = mask.reshape(-1)
        flat[np.argpartition(score.reshape(-1), k - 1)[:k]] = True
        return mask
    moved = np.moveaxis(score, axis, 0).reshape(score.shape[axis], -1)
    idx = np.argpartition(moved, k - 1, axis=1)[:, :k]
    m = np.zeros(moved.shape, dtype=bool)
    np.put_along_axis(m, idx, True, axis=1)
    return np.moveaxis(m.reshape(np.moveaxis(score, axis, 0).shape), 0, axis)


def _record(target: Target, before: np.ndarray, after: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "layer": target.name,
        "weight": target.value.name,
        "ops": sorted({layer.node.op_type for layer in target.layers}) or ["Gather"],
        "shape": list(before.shape),
        "sparsity_before": round(float(np.mean(before == 0)), 4),
        "sparsity": round(float(np.mean(after == 0)), 4),
        **extra,
    }


@register
@dataclasses.dataclass
class PruneMagnitude(GraphPass):
    """Zero the least important weights of MatMul/Gemm/Conv layers, by |w| or Wanda's |w|·‖x‖, to a sparsity or below a threshold."""

    name = "prune-magnitude"
    lossless = False
    tolerance = PRUNE_TOLERANCE
    uses_data = True

    sparsity: float | None = option(None, "fraction of each group's weights to zero (0.5 when threshold is not set either)")
    threshold: float | None = option(None, "zero every weight with |w| below this (score=magnitude only)")
    score: Literal["magnitude", "wanda"] = option("magnitude", "importance: |w|, or |w|·‖x‖ from calibration activations (Wanda)")
    scope: Literal["layer", "output", "global"] = option("layer", "where the sparsity is counted: per layer, per output channel, or over all layers")
    include: list[str] = option([], "only layers whose node or weight name matches one of these globs")
    exclude: list[str] = option([], "leave layers whose node or weight name matches one of these globs")
    min_size: int = option(1024, "leave weights with fewer elements alone")
    embeddings: bool = option(False, "also prune embedding tables (constant data of Gather)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity is not None and self.threshold is not None:
            raise ValueError("give sparsity or threshold, not both")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.threshold is not None and (self.threshold < 0 or self.score != "magnitude"):
            raise ValueError("threshold must be >= 0 and goes with score=magnitude")

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        targets = select_targets(model, self.include, self.exclude, self.min_size, self.embeddings, stats)
        scales = wanda_scales(targets, self.calibration, model, stats) if self.score == "wanda" and targets else {}
        masks = self._masks(targets, scales)
        names = NameSet(model)
        layers = []
        for target, mask in zip(targets, masks):
            before = target.array
            zeroed = int(np.count_nonzero(mask & (before != 0)))
            if zeroed:
                after = np.where(mask, np.zeros((), before.dtype), before)
                replace_everywhere(target.value, after, names)
                stats["pruned_layers"] += 1
                stats["zeroed"] += zeroed
                layers.append(_record(target, before, after, score="wanda" if id(target.value) in scales else "magnitude"))
            else:
                stats["at_target"] += 1
        logger.debug("%s: %s", self.name, dict(stats))
        return PassResult(model, modified=stats["zeroed"] > 0, stats=dict(stats), layers=layers)

    def _masks(self, targets: Sequence[Target], scales: dict[int, np.ndarray]) -> list[np.ndarray]:
        scores = [_scores(t, scales) for t in targets]
        if self.threshold is not None:
            return [(s >= 0) & (s < self.threshold) for s in scores]
        sparsity = 0.5 if self.sparsity is None else self.sparsity
        if self.scope == "global" and scores:
            flat = np.concatenate([s.reshape(-1) for s in scores])
            k = int(round(sparsity * flat.size))
            if int(np.sum(flat < 0)) >= k:  # already at target
                return [np.zeros(s.shape, bool) for s in scores]
            mask = _lowest(flat, k, None)
            bounds = np.cumsum([0] + [s.size for s in scores])
            return [mask[a:b].reshape(s.shape) for a, b, s in zip(bounds[:-1], bounds[1:], scores)]
        out = []
        for target, s in zip(targets, scores):
            axis = None
            n = s.size
            if self.scope == "output" and target.layers:
                axis = target.layers[0].output_axis
                n = s.size // s.shape[axis]
            k = int(round(sparsity * n))
            zeros = np.sum(s < 0) if axis is None else np.min(np.sum(np.moveaxis(s, axis, 0).reshape(s.shape[axis], -1) < 0, axis=1))
            out.append(np.zeros(s.shape, bool) if zeros >= k else _lowest(s, k, axis))
        return out


@register
@dataclasses.dataclass
class PruneNm(GraphPass):
    """N:M sparsity: keep the n most important of every m consecutive weights along the reduction axis (2:4 by default)."""

    name = "prune-nm"
    lossless = False
    tolerance = PRUNE_TOLERANCE
    uses_data = True

    n: int = option(2, "weights kept in each group")
    m: int = option(4, "group size along the reduction axis (input channels for Conv)")
    score: Literal["magnitude", "wanda"] = option("magnitude", "importance: |w|, or |w|·‖x‖ from calibration activations (Wanda)")
    include: list[str] = option([], "only layers whose node or weight name matches one of these globs")
    exclude: list[str] = option([], "leave layers whose node or weight name matches one of these globs")
    min_size: int = option(1024, "leave weights with fewer elements alone")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.n < self.m:
            raise ValueError(f"need 0 < n < m, got {self.n}:{self.m}")

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        targets = []
        for target in select_targets(model, self.include, self.exclude, self.min_size, False, stats):
            axes = {layer.reduction_axes[0] for layer in target.layers}
            if len(axes) != 1:
                stats["skipped_shared_layouts"] += 1  # users disagree on which axis is the reduction axis
            elif target.array.shape[axes.pop()] % self.m:
                stats["skipped_not_divisible"] += 1
            else:
                targets.append(target)
        scales = wanda_scales(targets, self.calibration, model, stats) if self.score == "wanda" and targets else {}
        names = NameSet(model)
        layers = []
        for target in targets:
            before = target.array
            axis = target.layers[0].reduction_axes[0]
            groups = np.moveaxis(_scores(target, scales), axis, -1)
            shape = groups.shape
            groups = groups.reshape(*shape[:-1], shape[-1] // self.m, self.m)
            conform_before = float(np.mean(np.sum(groups >= 0, axis=-1) <= self.n))
            if conform_before == 1.0:
                stats["at_target"] += 1
                layers.append(_record(target, before, before, pattern=f"{self.n}:{self.m}", axis=axis, conforming_before=1.0, conforming=1.0))
                continue
            drop = np.argsort(groups, axis=-1, kind="stable")[..., : self.m - self.n]
            mask = np.zeros(groups.shape, dtype=bool)
            np.put_along_axis(mask, drop, True, axis=-1)
            mask = np.moveaxis(mask.reshape(shape), -1, axis)
            after = np.where(mask, np.zeros((), before.dtype), before)
            replace_everywhere(target.value, after, names)
            stats["pruned_layers"] += 1
            stats["zeroed"] += int(np.count_nonzero(mask & (before != 0)))
            conform = float(np.mean(np.sum(np.moveaxis(after != 0, axis, -1).reshape(groups.shape), axis=-1) <= self.n))
            layers.append(_record(target, before, after, pattern=f"{self.n}:{self.m}", axis=axis, conforming_before=round(conform_before, 4), conforming=round(conform, 4)))
        logger.debug("%s: %s", self.name, dict(stats))
        return PassResult(model, modified=stats["zeroed"] > 0, stats=dict(stats), layers=layers)
