"""Remove what does nothing at inference: Dropout in every opset form, Identity, and ops that copy their input.

Both passes rewire the users of a removed node to its data input (``graphopt.edit.bypass``), so a
graph output keeps its name; where that is impossible (the input is a graph input, an initializer
or an outer-scope value) the node becomes an ``Identity`` that writes the same output name.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphopt.edit import NameSet, bypass, onnx_opset
from graphopt.passbase import GraphPass, PassResult, option
from graphopt.passes._util import (
    const_array,
    inferred_shapes,
    ints_input_or_attr,
    is_std,
    legacy_constants,
    new_constant,
    rank,
    scalar_flag,
    static_shape,
    to_identity,
)
from graphopt.registry import OpTable, register

logger = logging.getLogger(__name__)

PRESETS = {
    "cleanup": "repeat{n=4}(remove-dropout,remove-identity,fold-constants,cse,merge-reshapes,fold-pad-into-conv,fold-conv-bias,fold-conv-scale,fold-batchnorm,fuse-gemm,dce)",
}
"""``cleanup``: everything lossless (plus bias/scale/BatchNorm folding and MatMul+Add -> Gemm, within their stated tolerance) to a fixed point.
fold-constants also lifts every Constant node into an initializer (lift-constants only lifts big ones)."""

# ---------------------------------------------------------------------------------------------
# remove-dropout

_Mode = Callable[[ir.Node, bool, bool], "str | None"]  # (node, legacy, assume_inference) -> why it trains, or None
DROPOUT = OpTable[_Mode]()


@DROPOUT.register("Dropout", since=1, until=6)
def _dropout_v1(node: ir.Node, legacy: bool, assume_inference: bool) -> str | None:
    """``is_test`` attribute: 0 (the default) means training, where the spec drops at random."""
    is_test = node.attributes.get_int("is_test", 0)
    return None if is_test or assume_inference else "is_test_unset"


@DROPOUT.register("Dropout", since=7, until=11)
def _dropout_v7(node: ir.Node, legacy: bool, assume_inference: bool) -> str | None:
    """``ratio`` attribute only: the runtime decides the mode, and inference is a copy."""
    return None


@DROPOUT.register("Dropout", since=12)
def _dropout_v12(node: ir.Node, legacy: bool, assume_inference: bool) -> str | None:
    """``ratio`` and ``training_mode`` are inputs; absent ``training_mode`` means inference."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    flag = scalar_flag(node.inputs[2], legacy)
    if flag is None:
        return "training_mode_not_constant"
    return "training_mode_true" if flag else None


@register
@dataclasses.dataclass
class RemoveDropout(GraphPass):
    """Remove Dropout in inference mode (opsets 1-22); a consumed mask becomes a constant all-true tensor.

    A consumed mask before opset 12 keeps its Dropout: onnxruntime returns all-false there and the
    ONNX reference all-true, so no constant is right for both.
    """

    name = "remove-dropout"
    max_mask_elements: int = option(1 << 20, "a consumed mask bigger than this (or of unknown shape) keeps its Dropout")
    assume_inference: bool = option(False, "treat opset<7 Dropout without is_test=1 as inference (the spec says it trains)")

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        opset = onnx_opset(model)
        legacy = legacy_constants(model)
        names = NameSet(model)
        dropouts = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if is_std(n, "Dropout")]
        mode = DROPOUT.lookup("", "Dropout", opset)
        if dropouts and mode is None:
            stats["skipped_opset"] += len(dropouts)
        elif dropouts:
            with inferred_shapes(model):  # a consumed mask needs the static shape
                for node in dropouts:
                    if (why := mode(node, legacy, self.assume_inference)) is not None:
                        stats[why] += 1
                        continue
                    stats[self._remove(node, opset, names, legacy)] += 1
        stats = Counter({k: v for k, v in stats.items() if v})
        logger.debug("%s: %s", self.name, dict(stats))
        return PassResult(model, modified=bool(stats["removed"] + stats["to_identity"]), stats=dict(stats))

    def _remove(self, node: ir.Node, opset: int, names: NameSet, legacy: bool) -> str:
        data = node.inputs[0]
        if data is None:
            return "no_input"
        mask = node.outputs[1] if len(node.outputs) > 1 else None
        if mask is not None and (mask.uses() or mask.is_graph_output()):
            if mask.is_graph_output():
                return "mask_is_graph_output"
            if opset < 12:  # onnxruntime returns an all-false mask there, the ONNX reference all-true
                return "mask_undefined_before_12"
            shape = static_shape(mask) or static_shape(data) or static_shape(node.outputs[0])
            if shape is None:
                return "mask_shape_unknown"
            if int(np.prod(shape)) > self.max_mask_elements:
                return "mask_too_large"
            dtype = mask.dtype or ir.DataType.BOOL
            assert node.graph is not None
            ones = np.ones(shape, dtype=dtype.numpy())
            mask.replace_all_uses_with(new_constant(node.graph, ones, f"{mask.name or 'mask'}_ones", names, as_node=legacy, before=node))
        graph = node.graph
        assert graph is not None
        if bypass(node, 0, data):
            graph.remove(node, safe=True)
            return "removed"
        to_identity(node, data)  # graph input/initializer straight to a graph output: keep the name
        return "to_identity"


# ---------------------------------------------------------------------------------------------
# remove-identity

_NoOp = Callable[[ir.Node, "_Ctx"], "ir.Value | None"]  # the value the node's output equals, or None
NOOPS: dict[str, _NoOp] = {}


@dataclasses.dataclass
class _Ctx:
    legacy: bool
    opset: int
    keep_signed_zero: bool


def _noop(*ops: str) -> Callable[[_NoOp], _NoOp]:
    def add(fn: _NoOp) -> _NoOp:
        for op in ops:
            NOOPS[op] = fn
        return fn

    return add


@_noop("Identity")
def _identity(node: ir.Node, ctx: _Ctx) -> ir.Value | None:
    return node.inputs[0] if len(node.inputs) == 1 else None


@_noop("Cast", "CastLike")
def _cast(node: ir.Node, ctx: _Ctx) -> ir.Value | None:
    x = node.inputs[0]
    if x is None or x.dtype is None:
        return None
    if node.op_type == "Cast":
        to = node.attributes.get_int("to", -1)
        return x if to == x.dtype.value else None
    target = node.inputs[1]
    return x if target is not None and target.dtype == x.dtype else None


@_noop("Transpose")
def _transpose(node: ir.Node, ctx: _Ctx) -> ir.Value | None:
    x = node.inputs[0]
    perm = node.attributes.get_ints("perm")
    if perm is None:
        return x if rank(x) is not None and rank(x) <= 1 else None
    return x if list(perm) == list(range(len(perm))) else None


@_noop("Reshape")
def _reshape(node: ir.Node, ctx: _Ctx) -> ir.Value | None:
    x = node.inputs[0]
    target = const_array(node.inputs[1], ctx.legacy) if len(node.inputs) > 1 else None
    if x is None or x.shape is None or target is None:
        return None
    dims = list(x.shape)
    target_l = [int(t) for t in target.reshape(-1)]
    if len(target_l) != len(dims):
        return None
    allowzero = node.attributes.get_int("allowzero", 0)
    unknown = 0
    for t, d in zip(target_l, dims):
        if t == 0 and not allowzero:
            continue  # copies the input dimension
        if t == -1:
            unknown += 1
        elif not isinstance(d, int) or d != t:
            return None
    return x if unknown <= 1 else None  # the one inferred dim equals the input's: every other dim matches


@_noop("Squeeze", "Unsqueeze")
def _squeeze_pair(node: ir.Node, ctx: _Ctx) -> ir.Value | None:
    """Unsqueeze(Squeeze(x, a), a) and Squeeze(Unsqueeze(x, a), a) are x."""
    inner = node.inputs[0].producer() if node.inputs[0] is not None else None
    other = "Unsqueeze" if node.op_type == "Squeeze" else "Squeeze"
    if inner is None or not is_std(inner, other) or inner.graph is not node.graph:
        return None
    a = ints_input_or_attr(node, 1, "axes", ctx.legacy)
    b = ints_input_or_attr(inner, 1, "axes", ctx.legacy)
    if not a or not b:
        return None
    x = inner.inputs[0]
    r = rank(x) if node.op_type == "Unsqueeze" else (rank(x) + len(b) if rank(x) is not None else None)
    # Squeeze(Unsqueeze): axes index the unsqueezed rank; Unsqueeze(Squeeze): they index x's rank
    if any(v < 0 for v in a + b):
        if r is None:
            return None
        a, b = [v % r for v in a], [v % r for v in b]
    return x if sorted(a) == sorted(b) else None


@_noop("Pad")
def _pad(node: ir.Node, ctx: _Ctx) -> ir.Value | None:
    pads = ints_input_or_attr(node, 1, "pads", ctx.legacy)
    return node.inputs[0] if pads is not None and not any(pads) else None


@_noop("Concat")
def _concat(node: ir.Node, ctx: _Ctx) -> ir.Value | None:
    return node.inputs[0] if len(node.inputs) == 1 else None


@_noop("Mul", "Div", "Add", "Sub")
def _neutral(node: ir.Node, ctx: _Ctx) -> ir.Value | None:
    """x*1, x/1, x+0, x-0 where the constant broadcasts to x's own shape (signed zeros: see the option)."""
    positions = (0, 1) if node.op_type in ("Mul", "Add") else (1,)
    for c in positions:
        if len(node.inputs) != 2 or node.inputs[c] is None or node.inputs[1 - c] is None:
            return None
        x, k = node.inputs[1 - c], const_array(node.inputs[c], ctx.legacy)
        if k is None or x.shape is None or x.dtype is None or k.ndim > len(x.shape):
            continue
        if any(kd != 1 and kd != xd for kd, xd in zip(k.shape[::-1], list(x.shape)[::-1])):
            continue  # would broadcast x to a bigger shape
        if k.size == 0 or not np.all(k == k.reshape(-1)[0]):
            continue
        v = k.reshape(-1)[0]
        floating = x.dtype.is_floating_point()
        if node.op_type in ("Mul", "Div") and v == 1:
            return x
        if node.op_type in ("Add", "Sub") and v == 0:
            if not floating or not ctx.keep_signed_zero:
                return x
            # x + (-0.0) and x - (+0.0) are exact; x + 0.0 maps -0.0 to +0.0
            negative_zero = bool(np.signbit(v))
            if (node.op_type == "Add") == negative_zero:
                return x
    return None


@register
@dataclasses.dataclass
class RemoveIdentity(GraphPass):
    """Remove Identity and ops that provably copy their input (same-type Cast, x*1, x+0, identity Transpose, ...).

    Also same-shape Reshape, zero Pad, one-input Concat, cancelling Squeeze/Unsqueeze pairs, x/1 and
    x-0, in If/Loop/Scan bodies too. onnx_ir's IdentityEliminationPass renames the Identity's input
    into a graph output even when that input is another graph output or an outer-scope value; this
    pass keeps such an Identity instead (``kept_io``).
    """

    name = "remove-identity"
    keep_signed_zero: bool = option(True, "keep float x+0.0 and x-(-0.0): they turn -0.0 into +0.0")
    only_identity: bool = option(False, "remove Identity nodes only (onnx_ir's IdentityEliminationPass rules, made safe)")

    def call(self, model: ir.Model) -> PassResult:
        ctx = _Ctx(legacy_constants(model), onnx_opset(model), self.keep_signed_zero)
        stats: Counter[str] = Counter()
        with inferred_shapes(model):
            self._run(model, ctx, stats)
        stats = Counter({k: v for k, v in stats.items() if v})
        modified = sum(v for k, v in stats.items() if k != "kept_io") > 0
        logger.debug("%s: %s", self.name, dict(stats))
        return PassResult(model, modified=modified, stats=dict(stats))

    def _run(self, model: ir.Model, ctx: _Ctx, stats: Counter[str]) -> None:
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.graph is None or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
                continue
            if self.only_identity and node.op_type != "Identity":
                continue
            check = NOOPS.get(node.op_type)
            same = check(node, ctx) if check is not None else None
            if same is None:
                continue
            out = node.outputs[0]
            if same.dtype is not None and out.dtype is not None and same.dtype != out.dtype:
                continue
            graph = node.graph
            if bypass(node, 0, same):
                inner = node.inputs[0].producer() if node.inputs[0] is not None else None
                graph.remove(node, safe=True)
                stats[node.op_type.lower()] += 1
                if inner is not None and inner.graph is graph and is_std(inner, ("Squeeze", "Unsqueeze")) and not _used(inner):
                    graph.remove(inner, safe=True)  # the other half of a cancelling pair
            elif node.op_type != "Identity":
                to_identity(node, same)
                stats["to_identity"] += 1
            else:
                stats["kept_io"] += 1  # input is a graph input/initializer/outer value and output a graph output


def _used(node: ir.Node) -> bool:
    return any(o.uses() or o.is_graph_output() for o in node.outputs)
