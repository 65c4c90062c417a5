"""ONNX ``sparse_initializer`` (COO) in and out of the IR.

``onnx_ir`` 1.1 drops ``sparse_initializer`` on read and cannot write it. graphopt keeps such a
tensor dense in memory, marked with ``value.metadata_props[STORAGE_KEY] = "sparse"``, and writes
it as COO (values + int64 linear indices, ascending) when the model is serialized through
:func:`to_proto`, if that is smaller than the dense tensor; :func:`densify` turns every
``sparse_initializer`` of a proto back into a dense initializer (main-graph ones get the mark, so
a load/save round trip keeps the form). onnxruntime reads ``sparse_initializer`` as a dense
constant. Caveat: onnx's own shape inference types them as ``sparse_tensor``, so
``onnx.checker.check_model(full_check=True)`` rejects a standard op that reads one; the default
check passes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

logger = logging.getLogger(__name__)

STORAGE_KEY = "graphopt.storage"
SPARSE = "sparse"


def is_marked(value: ir.Value) -> bool:
    return value.metadata_props.get(STORAGE_KEY) == SPARSE


def has_marked(model: ir.Model) -> bool:
    return any(is_marked(v) for v in model.graph.initializers.values())


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """``ir.to_proto`` plus COO for the marked main-graph initializers (where COO is smaller)."""
    with initializer_types_hidden(model):
        proto = ir.to_proto(model)
    marked = {v.name for v in model.graph.initializers.values() if is_marked(v)}
    if marked:
        sparsify(proto.graph, marked)
    return proto


@contextlib.contextmanager
def initializer_types_hidden(model: ir.Model) -> Iterator[None]:
    """While serializing, leave out the ``value_info`` that ``ir.to_proto`` writes for every
    initializer (about 30 bytes each): the tensor already carries its element type and dims. Only
    values whose type and shape are exactly the tensor's (and that carry no doc string or metadata)
    are affected; everything is restored on exit."""
    hidden: list[tuple[ir.Value, ir.TypeProtocol | None, ir.Shape | None]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                t = value.const_value
                if t is None or value.is_graph_input() or value.doc_string or value.metadata_props:
                    continue
                if value.type == ir.TensorType(t.dtype) and value.shape is not None and tuple(value.shape) == tuple(t.shape):
                    hidden.append((value, value.type, value.shape))
                    value.type, value.shape = None, None
        yield
    finally:
        for value, type_, shape in hidden:
            value.type, value.shape = type_, shape


def coo(tensor: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    """The COO form of a dense tensor; None when it is external or would not be smaller."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    array = numpy_helper.to_array(tensor)
    flat = array.reshape(-1)
    bits = flat.view(f"u{flat.dtype.itemsize}") if flat.dtype.kind == "f" else flat
    index = np.flatnonzero(bits != 0)  # by bit pattern: -0.0 is kept as a value, not dropped
    sparse = onnx.SparseTensorProto()
    sparse.values.CopyFrom(numpy_helper.from_array(flat[index], tensor.name))
    sparse.indices.CopyFrom(numpy_helper.from_array(index.astype(np.int64), ""))
    sparse.dims.extend(tensor.dims)
    return sparse if sparse.ByteSize() < tensor.ByteSize() else None


def sparsify(graph: onnx.GraphProto, names: set[str]) -> int:
    """Move the named initializers of ``graph`` to ``sparse_initializer``; returns how many moved."""
    keep, moved = [], 0
    for tensor in graph.initializer:
        sparse = coo(tensor) if tensor.name in names else None
        if sparse is None:
            keep.append(tensor)
        else:
            graph.sparse_initializer.append(sparse)
            moved += 1
    if moved:
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return moved


def dense(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    values = numpy_helper.to_array(sparse.values).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    out = np.zeros(int(np.prod(dims, dtype=np.int64)), dtype=values.dtype)
    if indices.size:
        flat = indices.reshape(-1) if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), dims)
        out[flat] = values
    return numpy_helper.from_array(out.reshape(dims), sparse.values.name)


def densify(proto: onnx.ModelProto) -> set[str]:
    """Turn every ``sparse_initializer`` (all graphs) into a dense initializer, in place.

    Returns the names of the main graph's ones (for :func:`mark`).
    """
    main: set[str] = set()
    for graph, is_main in _graphs(proto.graph, True):
        for sparse in graph.sparse_initializer:
            graph.initializer.append(dense(sparse))
            if is_main:
                main.add(sparse.values.name)
        del graph.sparse_initializer[:]
    return main


def mark(model: ir.Model, names: set[str]) -> None:
    for name in names:
        if (value := model.graph.initializers.get(name)) is not None:
            value.metadata_props[STORAGE_KEY] = SPARSE


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    """``ir.from_proto`` that keeps ``sparse_initializer`` (dense and marked); ``proto`` is not changed."""
    if not any(g.sparse_initializer for g, _ in _graphs(proto.graph, True)):
        return ir.from_proto(proto)
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    names = densify(copy)
    model = ir.from_proto(copy)
    mark(model, names)
    return model


def _graphs(graph: onnx.GraphProto, is_main: bool):  # type: ignore[no-untyped-def]
    yield graph, is_main
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g, False)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g, False)


def save(model: ir.Model, path: str) -> None:
    """``ir.save`` for a model without external data, writing marked initializers as COO (and
    without ``ir.to_proto``'s value_info copies of initializer types)."""
    if has_marked(model):
        onnx.save_model(to_proto(model), path)
    else:
        with initializer_types_hidden(model):
            ir.save(model, path)
