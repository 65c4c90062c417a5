"""Layers with a constant weight (MatMul, Gemm, Conv), seen through one canonical view.

The compression passes (svd-split, pruning, quantization) all start from "a node that multiplies
activations by a constant weight". :func:`linear_layers` finds those, in every graph, whether the
weight is an initializer or a ``Constant`` node, and describes the weight's axes so each pass can
work on the 2-D matrix ``W[K, N]`` with ``Y = X @ W`` (K = reduction, N = outputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt.edit import constant_tensor, is_onnx_op

Kind = Literal["matmul", "matmul-left", "gemm", "conv", "gather", "recurrent", "convtranspose"]
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


@dataclasses.dataclass
class LinearLayer:
    """One node multiplying by a constant weight.

    ``kind``: ``matmul`` is ``X @ W`` (W 2-D, input 1); ``matmul-left`` is ``W @ X`` (W 2-D, input 0);
    ``gemm`` is Gemm with constant B (``transB`` respected); ``conv`` is Conv with weight
    ``[Cout, Cin/group, *kernel]``. quantize-weights alone also makes ``gather`` (an embedding
    table), ``recurrent`` (LSTM/GRU/RNN W or R) and ``convtranspose`` layers; :func:`as_linear_layer`
    never returns those, so the other passes do not meet them.
    """

    node: ir.Node
    kind: Kind
    weight_index: int

    @property
    def weight(self) -> ir.Value:
        value = self.node.inputs[self.weight_index]
        assert value is not None
        return value

    @property
    def tensor(self) -> ir.TensorProtocol:
        tensor = constant_tensor(self.weight)
        assert tensor is not None
        return tensor

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or self.node.op_type

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.shape)

    @property
    def output_axis(self) -> int:
        """Axis of the stored weight that indexes output channels / neurons."""
        if self.kind in ("matmul", "recurrent", "convtranspose"):  # recurrent: LSTM/GRU/RNN W or R, [directions, gates x hidden, K]; convtranspose: [Cin, Cout/group, *kernel]
            return 1
        if self.kind == "gemm":
            return 0 if self.node.attributes.get_int("transB", 0) else 1
        return 0  # matmul-left (rows of W are outputs) and conv

    @property
    def reduction_axes(self) -> tuple[int, ...]:
        """Axes of the stored weight summed over in the product (N:M and per-channel work along these)."""
        if self.kind == "conv":
            return tuple(range(1, len(self.shape)))
        if self.kind == "recurrent":
            return (2,)
        if self.kind == "convtranspose":
            return (0, *range(2, len(self.shape)))
        return (1 - self.output_axis,)

    @property
    def group(self) -> int:
        return self.node.attributes.get_int("group", 1) if self.kind == "conv" else 1

    def matrix(self) -> np.ndarray:
        """The weight as ``W[K, N]`` with ``Y = X @ W`` (a copy for transposed layouts; conv flattened)."""
        w = self.tensor.numpy()
        if self.kind == "conv":
            return w.reshape(w.shape[0], -1).T
        return w if self.output_axis == 1 else w.T

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`matrix`: a ``[K, N]`` array back in the stored layout."""
        if self.kind == "conv":
            return np.ascontiguousarray(m.T.reshape(self.shape))
        return np.ascontiguousarray(m if self.output_axis == 1 else m.T)

    def is_shared(self) -> bool:
        """True when another node (or a graph output) also reads this weight."""
        return len(self.weight.uses()) > 1 or self.weight.is_graph_output()


def linear_layers(model: ir.Model, ops: Sequence[str] = ("MatMul", "Gemm", "Conv"), *, float_only: bool = True) -> Iterator[LinearLayer]:
    """Every node of the given op types (all graphs) whose weight input is a constant."""
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        layer = as_linear_layer(node)
        if layer is None or node.op_type not in ops:
            continue
        if float_only and layer.tensor.dtype not in FLOAT_TYPES:
            continue
        yield layer


def as_linear_layer(node: ir.Node) -> LinearLayer | None:
    if is_onnx_op(node, "MatMul") and len(node.inputs) == 2:
        for index, kind in ((1, "matmul"), (0, "matmul-left")):
            tensor = constant_tensor(node.inputs[index])
            other = constant_tensor(node.inputs[1 - index])
            if tensor is not None and other is None and len(tensor.shape) == 2:
                return LinearLayer(node, kind, index)  # type: ignore[arg-type]
        return None
    if is_onnx_op(node, "Gemm") and len(node.inputs) >= 2:
        tensor = constant_tensor(node.inputs[1])
        if tensor is not None and constant_tensor(node.inputs[0]) is None and len(tensor.shape) == 2:
            return LinearLayer(node, "gemm", 1)
        return None
    if is_onnx_op(node, "Conv") and len(node.inputs) >= 2:
        tensor = constant_tensor(node.inputs[1])
        if tensor is not None and len(tensor.shape) >= 3:
            return LinearLayer(node, "conv", 1)
    return None
