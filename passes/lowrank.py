"""Low-rank factorization: ``svd-split`` replaces a constant weight by two thinner products, W ≈ A·B.

The math (factorizations, error curves, rank rules, the global allocation) is in ``_rank.py``;
this module finds the layers, gathers calibration activations, and rewrites the graph.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from collections import Counter
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.activations import capture, rows
from graphopt.edit import NameSet, add_initializer, drop_if_unused, onnx_opset
from graphopt.layers import LinearLayer, linear_layers
from graphopt.metrics import Tolerance
from graphopt.passbase import TAG, GraphPass, PassResult, option
from graphopt.registry import register
from graphopt.verify import OrtFailure

from . import _rank

logger = logging.getLogger(__name__)

DEFAULT_MIN_SQNR = 30.0
"""Per-layer rule when none is given: layer noise powers roughly add up through a network, so
L layers at 30 dB each leave about 30 − 10·log10(L) dB at the output: the 20 dB default budget
holds for up to ~10 rewritten layers."""


@dataclasses.dataclass
class _Unit:
    """One weight and the nodes multiplying by it (several when the weight is shared)."""

    weight: ir.Value
    uses: list[LinearLayer]
    matrix: np.ndarray  # W[K, N] with Y = X·W (alpha not included)
    data: _rank.Activations | None = None
    factors: _rank.Factors | None = None

    @property
    def name(self) -> str:
        return ",".join(layer.name for layer in self.uses)

    @property
    def dense(self) -> int:
        return int(self.matrix.size)


@register
@dataclasses.dataclass
class SvdSplit(GraphPass):
    """Split MatMul/Gemm/pointwise-Conv weights into two thinner products W ≈ A·B (truncated SVD, plain or data-aware) where that saves parameters.

    Rank rule: one of ``rank``, ``ratio``, ``energy``, ``min-sqnr``, ``max-error`` (per layer) or
    ``global-ratio`` (one budget for all layers); with none given, ``min-sqnr=30``. Error figures are
    on the layer's output over the calibration samples, or on the weight when there are none.
    A shared weight is factored once for all its users. Created nodes carry ``TAG``.
    """

    name = "svd-split"
    lossless = False
    tolerance = Tolerance(min_sqnr_db=20.0)  # 10 % RMS error on the outputs: see DEFAULT_MIN_SQNR
    uses_data = True

    rank: int | None = option(None, "keep this many singular values in every layer")
    ratio: float | None = option(None, "keep this fraction of each layer's parameters")
    energy: float | None = option(None, "keep this fraction of the squared singular values (of the whitened weight when data-aware)")
    min_sqnr: float | None = option(None, "smallest rank whose layer-output SQNR reaches this many dB (default rule: 30)")
    max_error: float | None = option(None, "smallest rank whose max abs error on the layer output stays within this")
    global_ratio: float | None = option(None, "keep this fraction of all eligible layers' parameters, ranks spread by output error per parameter")
    data_aware: bool = option(False, "minimize the layer-output error on calibration activations (whitened SVD) instead of the weight error")
    damp: float = option(0.01, "data-aware: ridge added to XᵀX, as a fraction of its mean diagonal")
    min_params: int = option(16384, "leave weights with fewer elements alone")
    min_saving: float = option(0.1, "rewrite a layer only if its factors keep at most (1 - this) of its parameters")
    include: list[str] = option([], "fnmatch patterns on node or weight names to consider (all when empty)")
    exclude: list[str] = option([], "fnmatch patterns on node or weight names to leave alone")
    ops: list[str] = option(["MatMul", "Gemm", "Conv"], "op types to consider (Conv: 1x1, group=1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        rules = [k for k in ("rank", "ratio", "energy", "min_sqnr", "max_error", "global_ratio") if getattr(self, k) is not None]
        if len(rules) > 1:
            raise ValueError(f"give one rank rule, not {' and '.join(r.replace('_', '-') for r in rules)}")
        for key in ("ratio", "energy", "global_ratio"):
            value = getattr(self, key)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{key.replace('_', '-')} must be in (0, 1], got {value}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.max_error is not None and self.max_error < 0:
            raise ValueError(f"max-error must be non-negative, got {self.max_error}")
        if not 0 <= self.min_saving < 1:
            raise ValueError(f"min-saving must be in [0, 1), got {self.min_saving}")
        if self.damp < 0:
            raise ValueError(f"damp must be non-negative, got {self.damp}")
        unknown_ops = sorted(set(self.ops) - {"MatMul", "Gemm", "Conv"})
        if unknown_ops:
            raise ValueError(f"ops can hold MatMul, Gemm, Conv; not {unknown_ops[0]}")

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        units = self._units(model, stats)
        if not units:
            return PassResult(model, modified=False, stats={k: v for k, v in stats.items() if v})
        self._gather(model, units, stats)
        for unit in units:
            unit.factors = _rank.factorize(unit.matrix, unit.data, data_aware=self.data_aware, damp=self.damp)
            if self.data_aware and not unit.factors.whitened:
                stats["plain_no_data"] += 1
        ranks = self._choose(model, units)
        names = NameSet(model)
        layers = []
        for unit, (r, why) in zip(units, ranks):
            layers.append(_record(unit, r, why))
            if r is None:
                stats["left_dense"] += 1
                continue
            _rewrite(unit, r, names, self.name)
            stats["split"] += 1
            stats["nodes_split"] += len(unit.uses)
            stats["params_saved"] += unit.dense - r * sum(unit.matrix.shape)
        stats = Counter({k: v for k, v in stats.items() if v})
        logger.debug("%s: %s", self.name, dict(stats))
        return PassResult(model, modified=stats["split"] > 0, stats=dict(stats), layers=layers)

    # -- which weights -----------------------------------------------------------------------

    def _units(self, model: ir.Model, stats: Counter[str]) -> list[_Unit]:
        opset = onnx_opset(model)
        by_weight: dict[ir.Value, list[LinearLayer]] = {}
        for layer in linear_layers(model, tuple(self.ops)):
            if TAG in layer.node.metadata_props:
                stats["already_split"] += 1
            elif why := _unsupported(layer, opset):
                stats[why] += 1
            else:
                by_weight.setdefault(layer.weight, []).append(layer)
        units = []
        for weight, uses in by_weight.items():
            nodes = {id(layer.node) for layer in uses}
            if weight.is_graph_output() or any(id(u.node) not in nodes for u in weight.uses()):
                stats["shared_other_use"] += 1
            elif len({(layer.kind, layer.output_axis) for layer in uses}) > 1:
                stats["shared_mixed_layout"] += 1
            elif not all(self._wanted(layer) for layer in uses):
                stats["excluded"] += 1
            elif uses[0].tensor.size < self.min_params:
                stats["too_small"] += 1
            else:
                matrix = uses[0].matrix()
                if _rank.saving_limit(*matrix.shape, self.min_saving) < 1:
                    stats["cannot_save"] += 1
                else:
                    units.append(_Unit(weight, uses, matrix))
        return units

    def _wanted(self, layer: LinearLayer) -> bool:
        names = [n for n in (layer.node.name, layer.weight.name) if n]
        if self.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.exclude)

    # -- calibration activations -------------------------------------------------------------

    def _gather(self, model: ir.Model, units: list[_Unit], stats: Counter[str]) -> None:
        """Gram matrix, output energy and sample rows per unit, from one onnxruntime run."""
        samples = self.calibration.samples if self.calibration is not None else ()
        wanted = [u for u in units if all(_in_main_graph(layer, model) for layer in u.uses)]
        stats["data_free"] += len(units) - len(wanted) if samples else len(units)
        if not samples or not wanted:
            return
        names = sorted({v.name for u in wanted for layer in u.uses for v in (_x(layer), layer.node.outputs[0])})  # type: ignore[misc]
        try:
            acts = capture(model, list(samples), names)
        except (OrtFailure, KeyError) as e:
            logger.warning("svd-split: cannot capture activations (%s); using weight errors", e)
            stats["data_free"] += len(wanted)
            return
        for unit in wanted:
            parts = [(_x_rows(layer, acts[_x(layer).name]), np.concatenate([np.ravel(a) for a in acts[layer.node.outputs[0].name]]), _alpha(layer)) for layer in unit.uses]
            unit.data = _rank.Activations.of([(x, y.astype(np.float64), alpha) for x, y, alpha in parts])

    # -- ranks -------------------------------------------------------------------------------

    def _choose(self, model: ir.Model, units: list[_Unit]) -> list[tuple[int | None, str]]:
        if self.global_ratio is not None:
            return self._allocate(model, units)
        return [self._rank_of(u) for u in units]

    def _rank_of(self, unit: _Unit) -> tuple[int | None, str]:
        f = unit.factors
        assert f is not None
        k, n = unit.matrix.shape
        limit = _rank.saving_limit(k, n, self.min_saving)
        if self.rank is not None:
            r, rule = min(self.rank, f.max_rank), f"rank={self.rank}"
        elif self.ratio is not None:
            r, rule = _rank.rank_for_ratio(k, n, self.ratio), f"ratio={self.ratio:g}"
        elif self.energy is not None:
            r, rule = _rank.rank_for_energy(f, self.energy), f"energy={self.energy:g}"
        elif self.max_error is not None:
            found = _rank.rank_for_max_error(f, unit.data.rows if unit.data else None, self.max_error, limit)
            if found is None:
                return None, f"max-error={self.max_error:g} needs more than rank {limit}, which would save less than min-saving"
            r, rule = found, f"max-error={self.max_error:g}"
        else:
            db = DEFAULT_MIN_SQNR if self.min_sqnr is None else self.min_sqnr
            r, rule = _rank.rank_for_sqnr(f, db), f"min-sqnr={db:g}"
        if r > limit:
            return None, f"{rule} needs rank {r} > {limit}, the largest that saves min-saving={self.min_saving:g}"
        return r, rule

    def _allocate(self, model: ir.Model, units: list[_Unit]) -> list[tuple[int | None, str]]:
        """``global-ratio``: counts the layers a previous run split, so a second run changes nothing."""
        fixed_cost, fixed_dense = _previous_splits(model, self.name)
        alloc = []
        for unit in units:
            f = unit.factors
            assert f is not None
            errors = f.errors()
            k, n = unit.matrix.shape
            alloc.append(_rank.Unit(errors / f.signal if f.signal > 0 else errors, k, n, _rank.saving_limit(k, n, self.min_saving)))
        target = self.global_ratio * (sum(u.dense for u in alloc) + fixed_dense) - fixed_cost  # type: ignore[operator]
        ranks = _rank.allocate(alloc, target)
        rule = f"global-ratio={self.global_ratio:g}"
        return [(r, rule) if r is not None else (None, f"{rule}: kept dense by the allocation") for r in ranks]


# -- graph details ---------------------------------------------------------------------------


def _unsupported(layer: LinearLayer, opset: int) -> str:
    """Why this layer can't be rewritten here (a stats key), or ""."""
    node = layer.node
    if layer.kind == "conv":
        if any(d != 1 for d in layer.shape[2:]):
            return "not_pointwise"
        if layer.group != 1:
            return "grouped_conv"
    if layer.kind == "gemm":
        if opset < 7:
            return "skipped_opset"  # Gemm-6 and older: broadcast attribute, C required
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None
        alpha = node.attributes.get_float("alpha", 1.0)
        if opset < 11 and (node.attributes.get_int("transA", 0) or (alpha != 1.0 and not has_c)):
            return "skipped_opset"  # would need a Gemm without C
    return ""


def _in_main_graph(layer: LinearLayer, model: ir.Model) -> bool:
    x = _x(layer)
    return layer.node.graph is model.graph and x is not None and bool(x.name) and bool(layer.node.outputs[0].name)


def _x(layer: LinearLayer) -> ir.Value:
    value = layer.node.inputs[1 if layer.kind == "matmul-left" else 0]
    assert value is not None
    return value


def _alpha(layer: LinearLayer) -> float:
    return layer.node.attributes.get_float("alpha", 1.0) if layer.kind == "gemm" else 1.0


def _x_rows(layer: LinearLayer, arrays: list[np.ndarray]) -> np.ndarray:
    """Activations as ``[rows, K]``: one row per output position the weight is applied at."""
    k = layer.matrix().shape[0]
    if layer.kind == "matmul-left":
        return rows(arrays, k, -2 if arrays[0].ndim >= 2 else -1)
    if layer.kind == "gemm":
        return rows(arrays, k, 0 if layer.node.attributes.get_int("transA", 0) else 1)
    if layer.kind == "conv":
        return rows([_strided(layer.node, a) for a in arrays], k, 1)
    return rows(arrays, k, -1)


def _strided(node: ir.Node, x: np.ndarray) -> np.ndarray:
    """The input pixels a strided 1x1 Conv reads (all of them at stride 1)."""
    spatial = x.ndim - 2
    strides = list(node.attributes.get_ints("strides", [1] * spatial))
    pads = list(node.attributes.get_ints("pads", [0] * 2 * spatial))
    if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        pads = [0] * 2 * spatial  # SAME_* with a 1x1 kernel never pads; VALID doesn't
    for i in range(spatial):
        size = x.shape[2 + i]
        out = (size + pads[i] + pads[i + spatial] - 1) // strides[i] + 1
        pos = np.arange(out) * strides[i] - pads[i]
        x = np.take(x, pos[(pos >= 0) & (pos < size)], axis=2 + i)
    return x


def _previous_splits(model: ir.Model, tag: str) -> tuple[int, int]:
    """(parameters now, parameters before) of the A·B pairs an earlier run created."""
    made = {id(layer.node): layer for layer in linear_layers(model) if layer.node.metadata_props.get(TAG) == tag}
    cost = dense = 0
    seen: set[tuple[int, int]] = set()
    for second in made.values():
        first = made.get(id(_x(second).producer()))
        if first is None or (key := (id(first.weight), id(second.weight))) in seen:
            continue
        seen.add(key)
        cost += first.tensor.size + second.tensor.size
        dense += first.matrix().shape[0] * second.matrix().shape[1]
    return cost, dense


def _rewrite(unit: _Unit, r: int, names: NameSet, tag: str) -> None:
    f = unit.factors
    assert f is not None
    a, b = f.split(r)
    weight = unit.weight
    dtype = unit.uses[0].tensor.dtype.numpy()
    kind = unit.uses[0].kind
    if kind == "conv":
        ones = (1,) * (len(unit.uses[0].shape) - 2)
        a, b = a.T.reshape(r, -1, *ones), b.T.reshape(-1, r, *ones)
    elif kind == "matmul-left":
        a, b = a.T, b.T
    producer = weight.producer()
    graph = weight.graph if weight.is_initializer() or producer is None else producer.graph
    assert graph is not None
    a_value = add_initializer(graph, a.astype(dtype), f"{weight.name or 'w'}_svd_a", names)
    b_value = add_initializer(graph, b.astype(dtype), f"{weight.name or 'w'}_svd_b", names)
    for layer in unit.uses:
        _rewrite_node(layer, a_value, b_value, names, tag)
    drop_if_unused(weight)


def _rewrite_node(layer: LinearLayer, a: ir.Value, b: ir.Value, names: NameSet, tag: str) -> None:
    node = layer.node
    graph = node.graph
    assert graph is not None
    x, out = _x(layer), node.outputs[0]
    base = node.name or out.name or "svd"
    mid = ir.Value(name=names.fresh(f"{out.name or base}_svd"), type=out.type)
    attrs = {name: attr for name, attr in node.attributes.items()}
    if layer.kind == "matmul":
        first, second = _node(node, "MatMul", [x, a], mid), _node(node, "MatMul", [mid, b])
    elif layer.kind == "matmul-left":
        first, second = _node(node, "MatMul", [a, x], mid), _node(node, "MatMul", [b, mid])
    elif layer.kind == "gemm":
        if node.attributes.get_int("transA", 0):
            first = _node(node, "Gemm", [x, a], mid, [ir.AttrInt64("transA", 1)])
        else:
            first = _node(node, "MatMul", [x, a], mid)
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is None and node.attributes.get_float("alpha", 1.0) == 1.0:
            second = _node(node, "MatMul", [mid, b])
        else:
            keep = [_copy(v) for k, v in attrs.items() if k not in ("transA", "transB")]
            second = _node(node, "Gemm", [mid, b] + ([c] if c is not None else []), attrs=keep)
    else:  # pointwise conv: the first takes strides/pads, the second is a plain 1x1 with the bias
        first = _node(node, "Conv", [x, a], mid, [_copy(v) for v in attrs.values()])
        bias = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None else []
        second = _node(node, "Conv", [mid, b, *bias], attrs=[_copy(v) for k, v in attrs.items() if k == "kernel_shape"])
    for new, suffix in ((first, "svd_a"), (second, "svd_b")):
        new.name = f"{base}/{suffix}"
        new.metadata_props[TAG] = tag
    ir.convenience.replace_nodes_and_values(graph, node, [node], [first, second], [out], [second.outputs[0]])


def _node(like: ir.Node, op: str, inputs: list[ir.Value], output: ir.Value | None = None, attrs: list[ir.Attr] | None = None) -> ir.Node:
    outputs = [output] if output is not None else None
    return ir.Node(like.domain, op, inputs, attrs or [], outputs=outputs, num_outputs=None if outputs else 1)


def _copy(attr: ir.Attr) -> ir.Attr:
    return ir.Attr(attr.name, attr.type, attr.value)


def _record(unit: _Unit, r: int | None, why: str) -> dict[str, Any]:
    f = unit.factors
    assert f is not None
    k, n = unit.matrix.shape
    first = unit.uses[0]
    record: dict[str, Any] = {
        "layer": unit.name,
        "op": first.node.op_type,
        "weight": unit.weight.name,
        "shape": [k, n],
        "rewritten": r is not None,
        "rank": r,
        "max_rank": f.max_rank,
        "rule": why,
        "mode": "data-aware" if f.whitened else "plain",
        "params_before": unit.dense,
        "params_after": unit.dense if r is None else r * (k + n),
    }
    if r is not None:
        sqnr = f.sqnr_db(r)
        record["energy_kept"] = round(f.energy(r), 6)
        record["sqnr_db"] = None if math.isinf(sqnr) else round(sqnr, 3)
        record["sqnr_basis"] = "calibration" if unit.data is not None else "weights"
    return record
