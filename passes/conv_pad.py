"""Fold a zero constant Pad in front of a Conv into the Conv's own ``pads``.

TensorFlow-style "same" padding comes out of exporters as ``Pad(x) -> Conv(pads=0)``
(EfficientNet-Lite from PyTorch: 17 of them). onnxruntime's Conv kernels pad with zeros
themselves, so the explicit Pad costs a copy of the activation and a node. The sums are the
same: a padded tap contributes ``0 * w``, which adds an exact zero (only the sign of an all-zero
sum can differ; -0 == 0), as long as ``w`` is finite (``0 * inf`` is NaN): the weight must be a
constant without inf/NaN. Lossless, and verified bit-exact by the runner.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from graphopt.edit import drop_if_unused, onnx_opset
from graphopt.passbase import GraphPass, PassResult
from graphopt.passes._util import const_array, ints_input_or_attr, is_std, legacy_constants, rewrite_each
from graphopt.registry import register

logger = logging.getLogger(__name__)


@register
@dataclasses.dataclass
class FoldPadIntoConv(GraphPass):
    """Fold a zero-valued constant Pad of the spatial axes into the following Conv's pads."""

    name = "fold-pad-into-conv"

    def call(self, model: ir.Model) -> PassResult:
        legacy, opset = legacy_constants(model), onnx_opset(model)
        return rewrite_each(model, {"Pad": lambda n: _fold(n, legacy, opset)}, done=("folded",))


def _fold(pad: ir.Node, legacy: bool, opset: int) -> str:
    out = pad.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return "pad_output_shared"
    conv, index = uses[0].node, uses[0].idx
    if not is_std(conv, "Conv") or index != 0 or conv.graph is not pad.graph:
        return "not_before_conv"
    if (mode := pad.attributes.get_string("mode", "constant")) != "constant":
        return f"mode_{mode}"
    weight = const_array(conv.inputs[1], legacy)
    if weight is None or weight.dtype.kind != "f" or not np.all(np.isfinite(weight)):
        return "weight_not_constant_finite"
    if not _zero_fill(pad, legacy, opset):
        return "fill_not_zero"
    if conv.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return "conv_auto_pad"
    amounts = _spatial_pads(pad, legacy, opset, weight.ndim)
    if amounts is None:
        return "pads_not_spatial_constant"
    spatial = weight.ndim - 2
    old = [int(v) for v in conv.attributes["pads"].as_ints()] if "pads" in conv.attributes else [0] * (2 * spatial)
    conv.attributes["pads"] = ir.AttrInt64s("pads", [o + a for o, a in zip(old, amounts)])
    source = pad.inputs[0]
    conv.replace_input_with(0, source)
    extra = [v for v in pad.inputs[1:] if v is not None]
    pad.graph.remove(pad, safe=True)
    for value in extra:
        drop_if_unused(value)
    return "folded"


def _zero_fill(pad: ir.Node, legacy: bool, opset: int) -> bool:
    if opset < 11:
        return pad.attributes.get_float("value", 0.0) == 0.0
    if len(pad.inputs) < 3 or pad.inputs[2] is None:
        return True
    value = const_array(pad.inputs[2], legacy)
    return value is not None and value.size == 1 and float(value.reshape(())) == 0.0


def _spatial_pads(pad: ir.Node, legacy: bool, opset: int, rank: int) -> list[int] | None:
    """Conv-style pads ``[x1_begin, x2_begin, ..., x1_end, ...]`` for the spatial axes, or None when
    the Pad also pads N or C, crops (negative pads) or isn't constant."""
    pads = pad.attributes["pads"].as_ints() if opset < 11 and "pads" in pad.attributes else ints_input_or_attr(pad, 1, "pads", legacy)
    if pads is None:
        return None
    pads = [int(p) for p in pads]
    axes = list(range(rank))
    if opset >= 18 and len(pad.inputs) > 3 and pad.inputs[3] is not None:
        given = const_array(pad.inputs[3], legacy)
        if given is None:
            return None
        axes = [int(a) % rank for a in given.reshape(-1)]
    if len(pads) != 2 * len(axes) or len(set(axes)) != len(axes):
        return None
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[len(axes) + i]
    if min(begin + end) < 0 or begin[0] or begin[1] or end[0] or end[1]:
        return None
    return begin[2:] + end[2:]
