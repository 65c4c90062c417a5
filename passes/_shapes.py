"""Shape values known entry by entry: what ``Shape`` chains compute, as far as shapes tell.

Exporters build shapes at run time: ``Shape(x) → Gather → Unsqueeze → Concat → Reshape``. Each
entry of such a 1-D integer value is a known int, a symbolic dimension or unknown. A symbolic entry
is a name: the ``dim_param`` onnx's shape inference gives the dimension (the same name is the same
size, as the inference propagates it), or, for a dimension without one, ``#<n>:<i>``: dimension
``i`` of the ``n``-th tensor seen, equal to nothing else. A ``dim_param`` that two graph inputs
two input dimensions share is not trusted (nothing makes a caller keep them equal): those get ``#`` names too.
Each entry also remembers its origin (tensor, index) while it is one, so a chain that only copies
dimensions of one tensor can become a single ``Shape`` (see :meth:`ShapeValues.shape_of`).

When every entry is an int the value is a constant; two values with the same entries are equal
(:meth:`ShapeValues.key`); a ``Reshape`` target can often be made constant when it is neither
(see :meth:`ShapeValues.reshape_target`). Entries from ``Shape`` are sizes, never negative: that
decides ``Equal(shape, -1)``, which torch emits for ``view``/``expand``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphopt.edit import is_onnx_op

Entry = int | str | None
Origin = tuple[ir.Value, int] | None
INT32 = np.iinfo(np.int32)
I64, I32, BOOL = np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.bool_)


@dataclasses.dataclass
class Tracked:
    entries: list[Entry]
    scalar: bool = False  # a 0-d value (a Gather with a scalar index)
    dtype: np.dtype = I64  # int64, int32 (a Cast of a shape: sizes are assumed under 2**31) or bool
    origins: list[Origin] | None = None  # per entry: (tensor, dim index) it copies, when known

    def __post_init__(self) -> None:
        if self.origins is None:
            self.origins = [None] * len(self.entries)

    def array(self) -> np.ndarray | None:
        if not all(isinstance(e, int) for e in self.entries):
            return None
        a = np.array(self.entries, dtype=self.dtype)
        return a.reshape(()) if self.scalar else a

    def pick(self, indices: list[int], scalar: bool = False) -> Tracked:
        assert self.origins is not None
        return Tracked([self.entries[i] for i in indices], scalar, self.dtype, [self.origins[i] for i in indices])


class ShapeValues:
    def __init__(self, array_of: Callable[[ir.Value], np.ndarray | None], graph: ir.Graph | None = None) -> None:
        self.array_of = array_of
        self.known: dict[ir.Value, Tracked] = {}
        self.ids: dict[ir.Value, int] = {}
        self.untrusted: set[str] = set()
        if graph is not None:  # a dim_param on two input dims: a caller may still feed different sizes
            seen: set[str] = set()
            for v in graph.inputs:
                for d in v.shape or ():
                    if isinstance(d, ir.SymbolicDim) and d.value:
                        (self.untrusted if d.value in seen else seen).add(d.value)

    def get(self, value: ir.Value | None) -> Tracked | None:
        if value is None:
            return None
        if value in self.known:
            return self.known[value]
        a = self.array_of(value)
        if a is not None and a.dtype in (I64, I32, BOOL) and a.ndim <= 1:
            return Tracked([int(x) for x in a.reshape(-1)], scalar=a.ndim == 0, dtype=np.dtype(a.dtype))
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

    def dims(self, x: ir.Value) -> list[Entry] | None:
        """``x``'s dimensions as entries; Slice keeps the dimensions it does not slice (onnx's inference drops them)."""
        if x.shape is None:
            return None
        tag = self.ids.setdefault(x, len(self.ids))
        out: list[Entry] = []
        for i, d in enumerate(x.shape):
            if isinstance(d, int):
                out.append(d)
            elif (sliced := self._sliced_dim(x, i)) is not None:
                out.append(sliced)
            elif d.value and not d.value.startswith("#") and d.value not in self.untrusted:
                out.append(d.value)
            else:
                out.append(f"#{tag}:{i}")
        return out

    def _sliced_dim(self, x: ir.Value, i: int) -> Entry:
        node = x.producer()
        if node is None or not is_onnx_op(node, "Slice") or len(node.inputs) < 4 or node.inputs[0] is None:
            return None
        axes = self.array_of(node.inputs[3]) if node.inputs[3] is not None else None
        data = node.inputs[0]
        if axes is None or data.shape is None or len(data.shape) != len(x.shape or ()):
            return None
        r = len(data.shape)
        if i in {int(a) % r for a in axes.reshape(-1)}:
            return None
        dims = self.dims(data)
        return dims[i] if dims is not None else None

    def key(self, value: ir.Value) -> tuple | None:
        """What identifies ``value``'s contents: equal keys, equal values for every input (None when an entry is unknown)."""
        t = self.known.get(value)
        if t is None or any(e is None for e in t.entries) or t.array() is not None:
            return None
        return (tuple(t.entries), t.scalar, t.dtype)

    def shape_of(self, value: ir.Value, opset: int) -> tuple[ir.Value, int, int] | None:
        """(x, start, end) when ``value`` is ``Shape(x)[start:end]`` entry by entry (int64, 1-D)."""
        t = self.known.get(value)
        if t is None or t.scalar or t.dtype != I64 or not t.entries or t.origins is None or None in t.origins:
            return None
        x, start = t.origins[0]  # type: ignore[misc]
        if any(o != (x, start + k) for k, o in enumerate(t.origins)):
            return None
        end = start + len(t.entries)
        if (start, end) != (0, len(x.shape or ())) and opset < 15:
            return None  # Shape's start/end came in opset 15
        return x, start, end

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
        dims = self.dims(x) or []
        out: list[int | None] = []
        for i, (e, o) in enumerate(zip(target.entries, target.origins or [])):
            if isinstance(e, int):
                out.append(e)
            elif i < len(dims) and (o == (x, i) or (isinstance(e, str) and dims[i] == e)):
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
    dims = s.dims(x) if x is not None else None
    if dims is None:
        return None
    r = len(dims)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", r)
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    return Tracked(dims[start:end], origins=[(x, i) for i in range(start, end)])  # type: ignore[misc]


def _gather(node: ir.Node, s: ShapeValues) -> Tracked | None:
    data = s.known.get(node.inputs[0])
    indices = s.array_of(node.inputs[1]) if node.inputs[1] is not None else None
    if data is None or data.scalar or indices is None or indices.ndim > 1 or node.attributes.get_int("axis", 0) != 0:
        return None
    n = len(data.entries)
    flat = [int(i) + n if int(i) < 0 else int(i) for i in indices.reshape(-1)]
    if any(not 0 <= i < n for i in flat):
        return None
    return data.pick(flat, scalar=indices.ndim == 0)


def _slice(node: ir.Node, s: ShapeValues) -> Tracked | None:
    data = s.known.get(node.inputs[0])
    if data is None or data.scalar or len(node.inputs) < 3 or node.attributes.get("starts") is not None:
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
    return data.pick(list(range(len(data.entries)))[slice(start, end, int(steps[0]))])


def _unsqueeze(node: ir.Node, s: ShapeValues) -> Tracked | None:
    data = s.known.get(node.inputs[0])
    return dataclasses.replace(data, scalar=False) if data is not None and data.scalar else None


def _squeeze(node: ir.Node, s: ShapeValues) -> Tracked | None:
    data = s.known.get(node.inputs[0])
    return dataclasses.replace(data, scalar=True) if data is not None and len(data.entries) == 1 and not data.scalar else None


def _concat(node: ir.Node, s: ShapeValues) -> Tracked | None:
    if node.attributes.get_int("axis", 0) not in (0, -1):
        return None
    parts = [s.get(v) for v in node.inputs]
    if any(p is None or p.scalar or p.dtype != parts[0].dtype for p in parts):  # type: ignore[union-attr]
        return None
    return Tracked([e for p in parts for e in p.entries], dtype=parts[0].dtype, origins=[o for p in parts for o in p.origins])  # type: ignore[union-attr,misc]


def _identity(node: ir.Node, s: ShapeValues) -> Tracked | None:
    data = s.known.get(node.inputs[0])
    if data is None:
        return None
    if not is_onnx_op(node, "Cast"):
        return dataclasses.replace(data)
    to = node.attributes.get_int("to", 0)
    if to == ir.DataType.INT64.value:
        return dataclasses.replace(data, dtype=I64)
    if to == ir.DataType.INT32.value and all(not isinstance(e, int) or INT32.min <= e <= INT32.max for e in data.entries):
        return dataclasses.replace(data, dtype=I32)  # sizes over 2**31 are out of scope
    return None


def _decide(a: Entry, b: Entry) -> Entry:
    """1 or 0 when ``a == b`` is known for every input, else None."""
    if isinstance(a, int) and isinstance(b, int):
        return int(a == b)
    if isinstance(a, str) and isinstance(b, str) and a == b:
        return 1
    if (isinstance(a, str) and isinstance(b, int) and b < 0) or (isinstance(b, str) and isinstance(a, int) and a < 0):
        return 0  # a size is never negative
    return None


def _broadcast(parts: list[Tracked]) -> int | None:
    n = max(len(p.entries) for p in parts)
    return n if all(len(p.entries) in (1, n) for p in parts) else None


def _equal(node: ir.Node, s: ShapeValues) -> Tracked | None:
    a, b = s.get(node.inputs[0]), s.get(node.inputs[1])
    if a is None or b is None or a.dtype == BOOL or b.dtype == BOOL or (n := _broadcast([a, b])) is None:
        return None
    at = lambda t, i: t.entries[i if len(t.entries) > 1 else 0]  # noqa: E731
    return Tracked([_decide(at(a, i), at(b, i)) for i in range(n)], scalar=a.scalar and b.scalar, dtype=BOOL)


def _where(node: ir.Node, s: ShapeValues) -> Tracked | None:
    parts = [s.get(v) for v in node.inputs]
    if len(parts) != 3 or any(p is None for p in parts) or parts[0].dtype != BOOL or parts[1].dtype != parts[2].dtype:  # type: ignore[union-attr]
        return None
    cond, a, b = parts  # type: ignore[misc]
    n = _broadcast([cond, a, b])
    if n is None or None in cond.entries:
        return None
    at = lambda t, i: i if len(t.entries) > 1 else 0  # noqa: E731
    entries = [(a if cond.entries[at(cond, i)] else b).entries[at(a if cond.entries[at(cond, i)] else b, i)] for i in range(n)]
    origins = [(a if cond.entries[at(cond, i)] else b).origins[at(a if cond.entries[at(cond, i)] else b, i)] for i in range(n)]  # type: ignore[index]
    return Tracked(entries, scalar=cond.scalar and a.scalar and b.scalar, dtype=a.dtype, origins=origins)


_RULES: dict[str, Callable[[ir.Node, ShapeValues], Tracked | None]] = {
    "Shape": _shape,
    "Gather": _gather,
    "Slice": _slice,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Identity": _identity,
    "Cast": _identity,
    "Equal": _equal,
    "Where": _where,
}

SHAPE_OPS = frozenset(_RULES)
"""The ops whose output the tracker follows."""
