"""Fold a per-channel constant Mul after Conv into the convolution's weights and bias.

Paddle exports write ``Conv(x, W, b)`` followed by ``Mul(·, s[1, C, 1, 1])`` (a scale the exporter did
not fold). ``Conv(x, W·s, b·s)`` computes the same up to rounding: each product ``w·x`` is scaled
before the sum instead of after it, so the outputs move by a few ulps. Hence fold-batchnorm's
stated tolerance. ConvTranspose (whose output channels are split across groups in the weight's
second axis) is left alone, as are scales that are not per output channel.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from graphopt.edit import NameSet
from graphopt.passbase import GraphPass, PassResult
from graphopt.passes._util import absorb, const_array, legacy_constants, operand_from, replace_input, rewrite_each, sole_use
from graphopt.passes.batchnorm import FoldBatchnorm
from graphopt.passes.conv_bias import _per_channel
from graphopt.registry import register

logger = logging.getLogger(__name__)


@register
@dataclasses.dataclass
class FoldConvScale(GraphPass):
    """Fold Mul by a per-output-channel constant after Conv into the convolution's weights and bias."""

    name = "fold-conv-scale"
    lossless = False
    stepwise = True
    tolerance = FoldBatchnorm.tolerance

    def call(self, model: ir.Model) -> PassResult:
        legacy, names = legacy_constants(model), NameSet(model)
        return rewrite_each(model, {"Mul": lambda n: _fold(n, legacy, names) if len(n.inputs) == 2 else "not_after_conv"},
                            done=("folded",), quiet=("not_after_conv",))  # fmt: skip


def _fold(mul: ir.Node, legacy: bool, names: NameSet) -> str:
    found = operand_from(mul, "Conv")
    if found is None:
        return "not_after_conv"
    conv, conv_out, other = found
    if not sole_use(conv_out):
        return "conv_output_shared"
    scale, weight = const_array(other, legacy), const_array(conv.inputs[1], legacy)
    if scale is None or weight is None:
        return "not_constant"
    if scale.dtype != weight.dtype or weight.dtype not in (np.float32, np.float64):
        return "skipped_dtype"
    per_channel = _per_channel(scale, out_rank=weight.ndim, channels=weight.shape[0])
    if per_channel is None:
        return "not_per_channel"
    old_bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = const_array(old_bias, legacy) if old_bias is not None else None
    if old_bias is not None and bias is None:
        return "bias_not_constant"
    shaped = per_channel.reshape((-1,) + (1,) * (weight.ndim - 1))
    replace_input(conv, 1, (weight * shaped).astype(weight.dtype), names, as_node=legacy)
    if bias is not None:
        replace_input(conv, 2, (bias.reshape(-1) * per_channel).astype(weight.dtype), names, as_node=legacy)
    if not absorb(mul, conv_out, other):
        return "output_name_kept"  # pragma: no cover - conv_out is a plain intermediate here
    return "folded"
