"""Shape values known entry by entry: what ``Shape`` chains compute, as far as shapes tell.

Exporters build shapes at run time: ``Shape(x) → Gather → Unsqueeze → Concat → Reshape``. Each
entry of such a 1-D int64 value is a known int, a symbolic dimension (its ``dim_param`` name: the
same name is the same size, as onnx's shape inference propagates it) or unknown. When every entry is
an int the value is a constant; a ``Reshape`` target can often be made constant even when it is not
(see :meth:`ShapeValues.reshape_target`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphopt.edit import is_onnx_op

Entry = int | str | None


@dataclasses.dataclass
class Tracked:
    entries: list[Entry]
    scalar: bool = False  # a 0-d value (a Gather with a scalar index)

    def array(self) -> np.ndarray | None:
        if not all(isinstance(e, int) for e in self.entries):
            return None
        a = np.array(self.entries, dtype=np.int64)
        return a.reshape(()) if self.scalar else a


class ShapeValues:
    def __init__(self, array_of: Callable[[ir.Value], np.ndarray | None]) -> None:
        self.array_of = array_of
        self.known: dict[ir.Value, Tracked] = {}

    def get(self, value: ir.Value | None) -> Tracked | None:
        if value is None:
            return None
        if value in self.known:
            return self.known[value]
        a = self.array_of(value)
        if a is not None and a.dtype == np.int64 and a.ndim <= 1:
            return Tracked([int(x) for x in a.reshape(-1)], scalar=a.ndim == 0)
        if value.shape is not None and value.shape.is_static() and len(value.shape) <= 1 and value.dtype == ir.DataType.INT64:
            n = int(np.prod([int(d) for d in value.shape]))
            return Tracked([None] * n, scalar=len(value.shape) == 0) if n <= 16 else None
        return None

    def track(self, node: ir.Node) -> Tracked | None:
        """Record what ``node``'s output holds, when a shape chain explains it."""
        if node.domain not in ("", "ai.onnx") or not node.outputs:
            return None
        got = _RULES.get(node.op_type, lambda n, s: None)(node, self)
        if got is not None:
            self.known[node.outputs[0]] = got
        return got

    def reshape_target(self, node: ir.Node) -> np.ndarray | None:
        """A constant shape equal to ``node``'s (a Reshape) target for every input it accepts.

        Entries: ints stay; a symbolic entry naming the input's own dimension at that index becomes
        0 (copy, when allowzero=0); one remaining unknown becomes -1 when every other entry is a
        positive int (so an empty tensor can't make -1 ambiguous).
        """
        x, target = node.inputs[0], self.get(node.inputs[1] if len(node.inputs) > 1 else None)
        if x is None or x.shape is None or target is None or target.scalar or target.array() is not None:
            return None
        if node.attributes.get_int("allowzero", 0):
            return None
        out: list[int | None] = []
        for i, e in enumerate(target.entries):
            d = x.shape[i] if i < len(x.shape) else None
            if isinstance(e, int):
                out.append(e)
            elif isinstance(e, str) and isinstance(d, ir.SymbolicDim) and d.value == e:
                out.append(0)  # copies the input's dimension at the same index
            else:
                out.append(None)
        unknown = [i for i, e in enumerate(out) if e is None]
        if len(unknown) > 1:
            return None
        if unknown:
            if not all(isinstance(e, int) and e > 0 for i, e in enumerate(out) if i != unknown[0]):
                return None
            out[unknown[0]] = -1
        return np.array(out, dtype=np.int64)


def _shape(node: ir.Node, s: ShapeValues) -> Tracked | None:
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    dims: list[Entry] = [d if isinstance(d, int) else (d.value or None) for d in x.shape]
    r = len(dims)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", r)
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    return Tracked(dims[start:end])


def _gather(node: ir.Node, s: ShapeValues) -> Tracked | None:
    data = s.known.get(node.inputs[0])
    indices = s.array_of(node.inputs[1]) if node.inputs[1] is not None else None
    if data is None or indices is None or indices.ndim > 1 or node.attributes.get_int("axis", 0) != 0:
        return None
    n = len(data.entries)
    flat = [int(i) + n if int(i) < 0 else int(i) for i in indices.reshape(-1)]
    if any(not 0 <= i < n for i in flat):
        return None
    return Tracked([data.entries[i] for i in flat], scalar=indices.ndim == 0)


def _slice(node: ir.Node, s: ShapeValues) -> Tracked | None:
    data = s.known.get(node.inputs[0])
    if data is None or len(node.inputs) < 3 or node.attributes.get("starts") is not None:
        return None
    arrays = [s.array_of(v) if v is not None else None for v in node.inputs[1:]]
    if arrays[0] is None or arrays[1] is None or any(a is None for v, a in zip(node.inputs[3:], arrays[2:]) if v is not None):
        return None
    starts, ends = arrays[0].reshape(-1), arrays[1].reshape(-1)
    axes = arrays[2].reshape(-1) if len(arrays) > 2 and arrays[2] is not None else np.zeros(1, np.int64)
    steps = arrays[3].reshape(-1) if len(arrays) > 3 and arrays[3] is not None else np.ones(1, np.int64)
    if starts.size != 1 or ends.size != 1 or axes.size != 1 or int(axes[0]) not in (0, -1) or steps.size != 1 or int(steps[0]) == 0:
        return None
    big = np.iinfo(np.int64)
    start, end = (max(min(int(v[0]), big.max), big.min) for v in (starts, ends))
    return Tracked(data.entries[slice(start, end, int(steps[0]))])


def _unsqueeze(node: ir.Node, s: ShapeValues) -> Tracked | None:
    data = s.known.get(node.inputs[0])
    return Tracked(list(data.entries)) if data is not None and data.scalar else None


def _squeeze(node: ir.Node, s: ShapeValues) -> Tracked | None:
    data = s.known.get(node.inputs[0])
    return Tracked(list(data.entries), scalar=True) if data is not None and len(data.entries) == 1 and not data.scalar else None


def _concat(node: ir.Node, s: ShapeValues) -> Tracked | None:
    if node.attributes.get_int("axis", 0) not in (0, -1):
        return None
    parts = [s.get(v) for v in node.inputs]
    if any(p is None or p.scalar for p in parts):
        return None
    return Tracked([e for p in parts for e in p.entries])  # type: ignore[union-attr]


def _identity(node: ir.Node, s: ShapeValues) -> Tracked | None:
    data = s.known.get(node.inputs[0])
    if data is None or (is_onnx_op(node, "Cast") and node.attributes.get_int("to", 0) != ir.DataType.INT64.value):
        return None
    return Tracked(list(data.entries), data.scalar)


_RULES: dict[str, Callable[[ir.Node, ShapeValues], Tracked | None]] = {
    "Shape": _shape,
    "Gather": _gather,
    "Slice": _slice,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Identity": _identity,
    "Cast": _identity,
}
