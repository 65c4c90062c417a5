"""Which values carry which output channels: the graph analysis behind prune-structured.

Every candidate producer (Conv with group 1, Gemm, MatMul ``X @ W``, constant float weight read by no
one else) opens a *space*: its output channels. Walking the main graph in topological order, each
value gets a :class:`Layout`, where along which axis the channels of which spaces sit. Ops that keep
channels apart pass layouts on (unary elementwise, Dropout, pools, BatchNormalization, Transpose,
Squeeze/Unsqueeze, Flatten/Reshape that merge the trailing dims into the channel axis, depthwise
Conv), Concat along the channel axis joins them, elementwise binary ops and Concat along another axis
*merge* the spaces of their operands (all branches must drop the same channels), and the weights of
the next Conv/Gemm/MatMul end them (*terminals*: their input rows go). Anything else, a graph output,
a use inside a subgraph, an unknown shape, *blocks* the spaces it sees, with a reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.edit import constant_array, constant_tensor, is_onnx_op
from graphopt.layers import LinearLayer, as_linear_layer

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Softplus", "Softsign",
    "Gelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Identity",
    "Cast", "Clip", "Mish", "ThresholdedRelu", "Sin", "Cos", "Dropout",
}  # fmt: skip
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"}
NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


@dataclasses.dataclass(frozen=True)
class Segment:
    space: int | None  # None: channels that stay whatever happens
    channels: int
    inner: int = 1  # consecutive positions per channel (after Flatten/Reshape merged trailing dims)


@dataclasses.dataclass(frozen=True)
class Layout:
    axis: int  # negative
    rank: int | None
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(s.channels * s.inner for s in self.segments)

    @property
    def positive_axis(self) -> int | None:
        return None if self.rank is None else self.rank + self.axis

    def moved(self, axis: int, rank: int | None, inner: int = 1) -> Layout:
        return Layout(axis, rank, tuple(Segment(s.space, s.channels, s.inner * inner) for s in self.segments))

    def positions(self, kept: dict[int, np.ndarray]) -> np.ndarray:
        """Indices along the axis that stay, given the kept channels of each pruned space."""
        out, offset = [], 0
        for s in self.segments:
            channels = kept.get(s.space, None) if s.space is not None else None
            channels = np.arange(s.channels) if channels is None else channels
            out.append(offset + (channels[:, None] * s.inner + np.arange(s.inner)[None, :]).reshape(-1))
            offset += s.channels * s.inner
        return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclasses.dataclass
class Edit:
    """A constant that follows a layout: ``node.inputs[index]`` loses positions along ``axis``."""

    node: ir.Node
    index: int
    axis: int
    layout: Layout


@dataclasses.dataclass
class Analysis:
    producers: dict[int, LinearLayer]  # space id -> the layer whose output channels it is
    parent: dict[int, int]  # union-find over space ids
    blocked: dict[int, str]  # root space -> first reason
    edits: list[Edit]  # producer weights/biases, norms, elementwise constants, terminal rows, depthwise
    terminals: list[tuple[LinearLayer, Layout]]
    reshapes: list[tuple[ir.Node, Layout]]  # Reshape whose shape constant holds the channel axis' size
    depthwise: list[tuple[ir.Node, Layout]]
    values: list[tuple[ir.Value, Layout]]  # values whose shape changes

    def root(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space


def static_shapes(model: ir.Model) -> dict[str, tuple[int | None, ...]]:
    """Shapes from onnx shape inference (with data propagation), by value name; unknown dims are None."""
    try:
        proto = onnx.shape_inference.infer_shapes(ir.to_proto(model), data_prop=True)
    except Exception:
        return {}
    out = {}
    for vi in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return out


class _Walker:
    def __init__(self, model: ir.Model, producers: Sequence[LinearLayer]) -> None:
        self.graph = model.graph
        self.shapes = static_shapes(model)
        self.layouts: dict[int, Layout] = {}
        self.a = Analysis({}, {}, {}, [], [], [], [], [])
        self.start = {id(p.node): p for p in producers}

    def block(self, layouts: Sequence[Layout | None], reason: str) -> None:
        for layout in layouts:
            for s in layout.segments if layout else ():
                if s.space is not None:
                    self.a.blocked.setdefault(self.a.root(s.space), reason)

    def set(self, value: ir.Value, layout: Layout) -> None:
        self.layouts[id(value)] = layout
        self.a.values.append((value, layout))
        if value.is_graph_output():
            self.block([layout], "graph_output")
        if any(node.graph is not self.graph for node, _ in value.uses()):
            self.block([layout], "used_in_subgraph")

    def shape(self, value: ir.Value | None) -> tuple[int | None, ...] | None:
        return None if value is None else self.shapes.get(value.name or "")

    def run(self) -> Analysis:
        for node in self.graph:
            ins = [self.layouts.get(id(v)) if v is not None else None for v in node.inputs]
            if any(ins):
                self.visit(node, ins)
            if id(node) in self.start:
                self.open(self.start[id(node)])
        return self.a

    def open(self, layer: LinearLayer) -> None:
        space = len(self.a.parent)
        self.a.parent[space] = space
        self.a.producers[space] = layer
        channels = layer.shape[layer.output_axis]
        out = layer.node.outputs[0]
        if layer.kind == "conv":
            rank: int | None = len(layer.shape)
            axis = -(len(layer.shape) - 1)
        else:
            rank = 2 if layer.kind == "gemm" else (len(s) if (s := self.shape(layer.node.inputs[0])) else None)
            axis = -1
        layout = Layout(axis, rank, (Segment(space, channels),))
        self.a.edits.append(Edit(layer.node, layer.weight_index, layer.output_axis, layout))
        bias = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
        if bias is not None and layer.kind == "conv":
            self.a.edits.append(Edit(layer.node, 2, 0, layout))
        elif bias is not None and not self._constant_operand(layer.node, 2, layout):
            self.block([layout], "bias_shape")
        self.set(out, layout)

    def visit(self, node: ir.Node, ins: list[Layout | None]) -> None:
        op = node.op_type if is_onnx_op(node, node.op_type) else f"{node.domain}:{node.op_type}"  # custom domains block
        layer = as_linear_layer(node)
        if layer is not None and op in ("MatMul", "Gemm", "Conv"):
            return self._linear(layer, ins)
        main = ins[0]
        only_first = main is not None and not any(ins[1:])
        if op in UNARY and only_first:
            if any(o.uses() for o in node.outputs[1:]):
                return self.block(ins, f"consumer_{op}")  # Dropout's mask
            if op == "Clip" and any(constant_tensor(v) is None for v in node.inputs[1:] if v is not None):
                return self.block(ins, "clip_bounds_not_constant")
            return self.set(node.outputs[0], main)
        if op in POOLS and only_first:
            if main.positive_axis != 1 or any(o.uses() for o in node.outputs[1:]):
                return self.block(ins, f"consumer_{op}")
            return self.set(node.outputs[0], main)
        if op in NORMS and only_first:
            if main.positive_axis != 1 or node.attributes.get_int("training_mode", 0) or any(o.uses() for o in node.outputs[1:]):
                return self.block(ins, f"consumer_{op}")
            for i in NORMS[op]:
                if constant_tensor(node.inputs[i]) is None:
                    return self.block(ins, "norm_params_not_constant")
                self.a.edits.append(Edit(node, i, 0, main))
            return self.set(node.outputs[0], main)
        if op in BINARY:
            return self._binary(node, ins)
        if op == "Concat":
            return self._concat(node, ins)
        if op in ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze") and only_first:
            return self._shape_op(node, op, main)
        return self.block(ins, f"consumer_{op}")

    def _linear(self, layer: LinearLayer, ins: list[Layout | None]) -> None:
        data = 1 if layer.kind == "matmul-left" else 0
        layout = ins[data]
        if layout is None or any(x for i, x in enumerate(ins) if i != data):
            return self.block(ins, "channels_reach_weight_or_bias")
        if layer.is_shared():
            return self.block(ins, "shared_weight")
        if layer.kind == "conv":
            group, w = layer.group, layer.shape
            if layout.positive_axis != 1:
                return self.block(ins, "conv_input_axis")
            if group == 1:
                self.a.terminals.append((layer, layout))
                return self.a.edits.append(Edit(layer.node, 1, 1, layout))
            if group == w[0] == layout.size and w[1] == 1:  # depthwise: channel c in, channel c out
                bias = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
                if bias is not None and constant_tensor(bias) is None:
                    return self.block(ins, "bias_not_constant")
                self.a.depthwise.append((layer.node, layout))
                self.a.edits.append(Edit(layer.node, 1, 0, layout))
                if len(layer.node.inputs) > 2 and layer.node.inputs[2] is not None:
                    self.a.edits.append(Edit(layer.node, 2, 0, layout))
                return self.set(layer.node.outputs[0], layout)
            return self.block(ins, "grouped_conv")
        want = -2 if layer.kind == "matmul-left" or (layer.kind == "gemm" and layer.node.attributes.get_int("transA", 0)) else -1
        if layout.axis != want:
            return self.block(ins, f"{layer.kind}_batch_axis")
        self.a.terminals.append((layer, layout))
        self.a.edits.append(Edit(layer.node, layer.weight_index, layer.reduction_axes[0], layout))

    def _constant_operand(self, node: ir.Node, index: int, layout: Layout) -> bool:
        """A constant operand broadcast against ``layout``: shrink it if it has the channel axis. False: can't."""
        array = constant_array(node.inputs[index])
        if array is None:
            return False
        if array.ndim == 0 and node.op_type == "Gemm":
            return True
        dim = array.ndim + layout.axis if node.op_type != "Gemm" else array.ndim - 1
        if dim < 0 or array.shape[dim] == 1:
            return True
        if array.shape[dim] != layout.size:
            return False
        self.a.edits.append(Edit(node, index, dim, layout))
        return True

    def _binary(self, node: ir.Node, ins: list[Layout | None]) -> None:
        present = [x for x in ins if x is not None]
        first = present[0]
        for i, (value, layout) in enumerate(zip(node.inputs, ins)):
            if layout is not None or value is None:
                continue
            if constant_tensor(value) is not None:
                if not self._constant_operand(node, i, first):
                    return self.block(ins, "broadcast_mismatch")
                continue
            shape = self.shape(value)  # a branch without pruned channels: fine only if it broadcasts
            dim = None if shape is None else len(shape) + first.axis
            if shape is None or dim is None or (dim >= 0 and shape[dim] != 1):
                return self.block(ins, "branch_not_prunable")
        if not self._merge(present):
            return self.block(ins, "branches_disagree")
        ranks = [x.rank for x in present]
        self.set(node.outputs[0], Layout(first.axis, None if None in ranks else max(ranks), first.segments))

    def _merge(self, layouts: Sequence[Layout]) -> bool:
        """All layouts must line up segment by segment; their spaces become one (prune alike)."""
        first = layouts[0]
        for other in layouts[1:]:
            if other.axis != first.axis or len(other.segments) != len(first.segments):
                return False
            for a, b in zip(first.segments, other.segments):
                if (a.channels, a.inner) != (b.channels, b.inner):
                    return False
                if (a.space is None) != (b.space is None):
                    self.block([Layout(first.axis, None, (a, b))], "branch_not_prunable")
                elif a.space is not None and b.space is not None:
                    ra, rb = self.a.root(a.space), self.a.root(b.space)
                    if ra != rb:
                        self.a.parent[rb] = ra
                        if rb in self.a.blocked:
                            self.a.blocked.setdefault(ra, self.a.blocked[rb])
        return True

    def _concat(self, node: ir.Node, ins: list[Layout | None]) -> None:
        shapes = [self.shape(v) for v in node.inputs]
        rank = next((len(s) for s in shapes if s is not None), None) or next((x.rank for x in ins if x and x.rank), None)
        if rank is None:
            return self.block(ins, "unknown_rank")
        axis = node.attributes.get_int("axis", 0)
        axis = axis - rank if axis >= 0 else axis
        present = [x for x in ins if x is not None]
        if any(x.axis != present[0].axis for x in present):
            return self.block(ins, "branches_disagree")
        if axis != present[0].axis:  # concatenated along another axis: like an elementwise op
            if len(present) != len(ins) or not self._merge(present):
                return self.block(ins, "branches_disagree")
            return self.set(node.outputs[0], Layout(present[0].axis, rank, present[0].segments))
        segments: list[Segment] = []
        for layout, shape in zip(ins, shapes):
            if layout is not None:
                segments += layout.segments
            elif shape is not None and shape[rank + axis] is not None:
                segments.append(Segment(None, int(shape[rank + axis])))  # type: ignore[arg-type]
            else:
                return self.block(ins, "unknown_shape")
        self.set(node.outputs[0], Layout(axis, rank, tuple(segments)))

    def _shape_op(self, node: ir.Node, op: str, layout: Layout) -> None:
        p = layout.positive_axis
        in_shape, out_shape = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if p is None or in_shape is None or len(in_shape) != layout.rank:
            return self.block([layout], "unknown_rank")
        if op == "Transpose":
            perm = list(node.attributes.get_ints("perm", list(reversed(range(len(in_shape))))))
            return self.set(node.outputs[0], layout.moved(perm.index(p) - len(perm), len(perm)))
        if op in ("Squeeze", "Unsqueeze"):
            axes = node.attributes.get_ints("axes", None)
            if axes is None and len(node.inputs) > 1:
                axes = constant_array(node.inputs[1])
            out_rank = len(out_shape) if out_shape is not None else None
            if axes is None or out_rank is None:
                return self.block([layout], "unknown_axes")
            axes = sorted(int(a) % (len(in_shape) if op == "Squeeze" else out_rank) for a in np.ravel(axes))
            if op == "Squeeze":
                if p in axes:
                    return self.block([layout], "squeezes_channels")
                q = p - sum(a < p for a in axes)
            else:
                q = p
                for a in axes:
                    q += a <= q
            return self.set(node.outputs[0], layout.moved(q - out_rank, out_rank))
        trailing = in_shape[p + 1 :]
        if op == "Flatten":
            if node.attributes.get_int("axis", 1) % len(in_shape) != p or None in trailing:
                return self.block([layout], "flatten_axis")
            return self.set(node.outputs[0], layout.moved(-1, 2, math.prod(trailing)))  # type: ignore[arg-type]
        target = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if target is None or out_shape is None or None in trailing or len(out_shape) < p + 1:
            return self.block([layout], "reshape_not_static")
        if tuple(out_shape[:p]) != tuple(in_shape[:p]) and None not in in_shape[:p]:
            return self.block([layout], "reshape_moves_channels")
        if len(out_shape) == p + 1 and out_shape[p] in (None, layout.size * math.prod(trailing)):  # type: ignore[arg-type]
            self.a.reshapes.append((node, layout))
            return self.set(node.outputs[0], layout.moved(-1, p + 1, math.prod(trailing)))  # type: ignore[arg-type]
        if out_shape[p] == in_shape[p] and len(out_shape) > p:  # channel axis kept as it is
            self.a.reshapes.append((node, layout))
            return self.set(node.outputs[0], layout.moved(p - len(out_shape), len(out_shape)))
        return self.block([layout], "reshape_splits_channels")


def analyze(model: ir.Model, producers: Sequence[LinearLayer]) -> Analysis:
    """Layouts, edits and blocked spaces for pruning the output channels of ``producers`` (main graph)."""
    return _Walker(model, producers).run()
