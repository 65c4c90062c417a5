"""Fold a per-channel constant Add after Conv/ConvTranspose into the convolution's bias.

Paddle and TF exports often write ``Conv(x, W)`` followed by ``Add(·, b[1, C, 1, 1])``. The bias
is added after the convolution's sums in onnxruntime's kernels too, so the outputs stay bit-exact
(measured) when the Conv had no bias; with one, ``b + a`` is rounded once before it is added,
which moves outputs by an ulp. Hence the stated tolerance (fold-batchnorm's).
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
from graphopt.registry import register

logger = logging.getLogger(__name__)


@register
@dataclasses.dataclass
class FoldConvBias(GraphPass):
    """Fold Add of a per-output-channel constant after Conv/ConvTranspose into the convolution's bias."""

    name = "fold-conv-bias"
    lossless = False
    stepwise = True
    tolerance = FoldBatchnorm.tolerance

    def call(self, model: ir.Model) -> PassResult:
        legacy, names = legacy_constants(model), NameSet(model)
        return rewrite_each(model, {"Add": lambda n: _fold(n, legacy, names)}, done=("folded",), quiet=("not_after_conv",))


def _fold(add: ir.Node, legacy: bool, names: NameSet) -> str:
    found = operand_from(add, ("Conv", "ConvTranspose")) if len(add.inputs) == 2 else None
    if found is None:
        return "not_after_conv"
    conv, conv_out, other = found
    if not sole_use(conv_out):
        return "conv_output_shared"
    addend = const_array(other, legacy)
    weight = const_array(conv.inputs[1], legacy)
    if addend is None or weight is None:
        return "not_constant"
    if addend.dtype != weight.dtype or weight.dtype not in (np.float32, np.float64):
        return "skipped_dtype"
    channels = weight.shape[1] * conv.attributes.get_int("group", 1) if conv.op_type == "ConvTranspose" else weight.shape[0]
    per_channel = _per_channel(addend, out_rank=weight.ndim, channels=channels)
    if per_channel is None:
        return "not_per_channel"
    old_bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias = const_array(old_bias, legacy) if old_bias is not None else np.zeros(channels, weight.dtype)
    if bias is None:
        return "bias_not_constant"
    replace_input(conv, 2, (bias.reshape(-1) + per_channel).astype(weight.dtype), names, as_node=legacy)
    if not absorb(add, conv_out, other):
        return "output_name_kept"  # pragma: no cover - conv_out is a plain intermediate here
    return "folded"


def _per_channel(addend: np.ndarray, *, out_rank: int, channels: int) -> np.ndarray | None:
    """The addend as a ``[channels]`` vector when it broadcasts along the channel axis only, else None."""
    if addend.ndim > out_rank:
        return None
    dims = (1,) * (out_rank - addend.ndim) + addend.shape
    if dims[0] != 1 or any(d != 1 for d in dims[2:]) or dims[1] not in (1, channels):
        return None
    return np.broadcast_to(addend.reshape(-1), (channels,)).copy()
