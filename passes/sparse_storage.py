"""sparse-storage: make zeros pay on disk, loss-free, in a form stock onnxruntime runs.

Per initializer the smallest of three forms wins:

- dense, as it is;
- **bitmask**: a packed bitmask (1 bit per element, MSB first) plus the non-zero values, decoded in
  the graph by standard ops: ``BitShift`` and ``BitwiseAnd`` (``Mod`` before opset 18) unpack the
  bits, ``CumSum`` of the mask numbers the non-zeros, and ``Gather`` picks from ``[background,
  non-zeros...]`` (position 0, the background, where the mask is 0), then ``Reshape``.
  ``|mask| + |values| = N/8 + nnz·itemsize``: 0.53× of dense for float32 at 50% sparsity;
- **coo**: an ONNX ``sparse_initializer`` (values + int64 indices, ``graphopt.sparse``): 12 bytes per
  non-zero float32 against 4 dense, so it only pays above 67% sparsity, and beats the bitmask only
  above ~98% (or on tensors too small to carry a decoder).

Both are bit-exact (elements are compared by bit pattern, so ``-0.0`` stays). onnxruntime's constant
folding runs the decoder once at session load, so the deployed graph holds the dense weight again
and latency does not change. Integer tensors are encoded only as the data of ``DequantizeLinear``
(int8 weights after quantize-weights), where the background is the scalar zero point when that is
the commonest value; other integer tensors (shapes, indices) are left alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np
import onnx_ir as ir

from graphopt.edit import NameSet, add_initializer, all_graphs, constant_tensor, is_onnx_op, onnx_opset
from graphopt.passbase import TAG, GraphPass, PassResult, option
from graphopt.registry import register
from graphopt.sparse import SPARSE, STORAGE_KEY, is_marked

logger = logging.getLogger(__name__)

FORMATS = ("bitmask", "coo")
DECODER_BYTES = 700
"""Serialized cost of one decoder beyond its mask and values (8-9 nodes, short names, value_info),
plus :data:`NAME_BYTES` per character of the weight's name; measured: 640 + 6·len, and ~260 once
per graph for the shared constants."""
NAME_BYTES = 6
COO_BYTES = 24
"""Fixed cost of one sparse_initializer entry beyond its values and indices."""
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
DQ_DATA_TYPES = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32)


@register
@dataclasses.dataclass
class SparseStorage(GraphPass):
    """Store mostly-zero initializers compactly and loss-free: packed bitmask + non-zeros decoded in-graph, or sparse_initializer (COO)."""

    name = "sparse-storage"
    min_sparsity: float = option(0.5, "leave tensors with a smaller fraction of zeros (background values) alone")
    min_size: int = option(256, "leave tensors with fewer elements alone (the size estimate also counts the decoder)")
    formats: list[str] = option(list(FORMATS), "forms to choose from (bitmask, coo); per tensor the smallest wins, dense when none is smaller")

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise ValueError(f"unknown format '{bad[0]}'; choose from {', '.join(FORMATS)}")

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        layers = []
        names = NameSet(model)
        opset = onnx_opset(model)
        can_bitmask = "bitmask" in self.formats and opset >= 11
        can_coo = "coo" in self.formats and (model.ir_version or 0) >= 6
        if "bitmask" in self.formats and opset < 11:
            stats["no_bitmask_below_opset11"] += 1
        for graph in all_graphs(model):
            shared: dict[str, ir.Value] = {}
            for value in list(graph.initializers.values()):
                plan = self._plan(value, graph is model.graph and can_coo, can_bitmask, stats)
                if plan is None:
                    continue
                form, array, background, sizes = plan
                record = {"tensor": value.name, "shape": list(array.shape), "dtype": str(array.dtype), "form": form, **sizes}
                if form == "coo":
                    value.metadata_props[STORAGE_KEY] = SPARSE
                else:
                    _decode_in_graph(graph, value, array, background, opset, names, shared, self.name)
                stats[form] += 1
                stats["bytes_saved"] += sizes["dense_bytes"] - sizes[f"{form}_bytes"]
                layers.append(record)
        logger.debug("%s: %s", self.name, dict(stats))
        return PassResult(model, modified=bool(layers), stats=dict(stats), layers=layers)

    def _plan(self, value: ir.Value, can_coo: bool, can_bitmask: bool, stats: Counter[str]) -> tuple[str, np.ndarray, int | float, dict[str, int]] | None:
        """Which form ``value`` gets, or None (with the reason counted) to leave it dense."""
        tensor = constant_tensor(value)
        if tensor is None or is_marked(value) or value.is_graph_output() or not value.uses():
            return None
        if all(node.metadata_props.get(TAG) == self.name for node, _ in value.uses()):
            return None  # our own decoder's mask and values (other passes' nodes, e.g. DequantizeLinear, are fine)
        dq = _dq_zero_point(value)
        if tensor.dtype not in FLOAT_TYPES and not (tensor.dtype in DQ_DATA_TYPES and dq is not None):
            return None
        if tensor.size < self.min_size:
            stats["skipped_small"] += 1
            return None
        array = tensor.numpy()
        flat = array.reshape(-1)
        bits = _bits(flat)
        background: int | float = 0
        zeros = int(np.count_nonzero(bits == 0))
        if dq is not None and dq != 0 and int(np.count_nonzero(flat == dq)) > zeros:
            background, zeros = dq, int(np.count_nonzero(flat == dq))
        if zeros < self.min_sparsity * flat.size:
            stats["skipped_dense"] += 1
            return None
        nnz, item = flat.size - zeros, flat.dtype.itemsize
        sizes = {"dense_bytes": flat.size * item, "sparsity": round(zeros / flat.size, 4)}
        if can_bitmask:
            sizes["bitmask_bytes"] = -(-flat.size // 8) + (nnz + 1) * item + DECODER_BYTES + NAME_BYTES * len(value.name or "")
        if can_coo and background == 0:
            sizes["coo_bytes"] = nnz * (item + 8) + COO_BYTES
        options = [(sizes[f"{f}_bytes"], f) for f in FORMATS if f"{f}_bytes" in sizes]
        if not options or min(options)[0] >= sizes["dense_bytes"]:
            stats["skipped_not_smaller"] += 1
            return None
        return min(options)[1], array, background, sizes


def _bits(flat: np.ndarray) -> np.ndarray:
    """Elements as unsigned integers of the same width (floats by bit pattern, so -0.0 is not zero)."""
    return flat.view(f"u{flat.dtype.itemsize}") if flat.dtype.kind == "f" else flat


def _dq_zero_point(value: ir.Value) -> int | None:
    """The scalar zero point when every user is DequantizeLinear reading ``value`` as its data (0 if absent)."""
    points = set()
    for node, index in value.uses():
        if not is_onnx_op(node, "DequantizeLinear") or index != 0:
            return None
        zp = node.inputs[2] if len(node.inputs) > 2 else None
        if zp is None:
            points.add(0)
            continue
        tensor = constant_tensor(zp)
        if tensor is None:
            return None
        z = tensor.numpy().reshape(-1)
        if z.size == 0:
            points.add(0)
        elif np.all(z == z[0]):
            points.add(int(z[0]))
        else:
            return None  # per-channel zero points that differ: background 0 only
    return points.pop() if len(points) == 1 else None


def _decode_in_graph(
    graph: ir.Graph, value: ir.Value, array: np.ndarray, background: int | float, opset: int, names: NameSet, shared: dict[str, ir.Value], tag: str
) -> None:
    """Replace initializer ``value`` by mask + values and the nodes that rebuild it (same name, same uses)."""
    flat = array.reshape(-1)
    mask = _bits(flat) != _bits(np.asarray([background], dtype=flat.dtype))[0]
    packed = np.packbits(mask).reshape(-1, 1)
    values = np.concatenate([np.asarray([background], dtype=flat.dtype), flat[mask]])
    base = value.name or "w"
    packed_v = add_initializer(graph, packed, f"{base}.mask", names)
    values_v = add_initializer(graph, values, f"{base}.nonzero", names)

    def const(key: str, data: np.ndarray) -> ir.Value:
        if key not in shared:
            shared[key] = add_initializer(graph, data, f"sparse_storage.{key}", names)
        return shared[key]

    nodes: list[ir.Node] = []

    def node(op: str, inputs: list[ir.Value], **attrs: object) -> ir.Value:
        short = names.fresh("ss")  # names are bytes in the file: short ones for the decoder's intermediates
        n = ir.node(op, inputs, attributes=attrs, name=short)
        n.outputs[0].name = short
        if packed_v in inputs or values_v in inputs:
            n.metadata_props[TAG] = tag  # the readers of mask and non-zeros: a second run leaves those alone
        nodes.append(n)
        return n.outputs[0]

    bits = node("BitShift", [packed_v, const("shifts", np.arange(7, -1, -1, dtype=np.uint8))], direction="RIGHT")
    if opset >= 18:
        bit = node("BitwiseAnd", [bits, const("one_u8", np.array(1, np.uint8))])
    else:
        bit = node("Mod", [bits, const("two_u8", np.array(2, np.uint8))])
    flat_bits = node("Reshape", [bit, const("minus_one", np.array([-1], np.int64))])
    if packed.size * 8 != flat.size:
        flat_bits = node("Slice", [flat_bits, const("zero_i64", np.array([0], np.int64)), const(f"n{flat.size}", np.array([flat.size], np.int64))])
    m = node("Cast", [flat_bits], to=ir.DataType.INT32)
    position = node("Mul", [node("CumSum", [m, const("axis0", np.array(0, np.int32))]), m])
    dense = node("Gather", [values_v, position], axis=0)
    if array.ndim != 1:
        dense = node("Reshape", [dense, const("shape_" + "x".join(map(str, array.shape)), np.array(array.shape, np.int64))])
    graph.insert_before(graph[0], nodes)
    value.replace_all_uses_with(dense)
    graph.initializers.pop(value.name)
    dense.name = value.name  # the decoded tensor keeps the weight's name
    dense.shape = ir.Shape(array.shape)
    dense.dtype = value.dtype
