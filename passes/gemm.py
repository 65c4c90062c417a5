"""Fuse MatMul(A, B) + bias into one Gemm(A, B, bias) (rank-2 A, constant float B [K, N], constant bias of [N]).

PP-OCR's classifier ends with ``MatMul`` and ``Add``; onnxslim writes a Gemm. onnxruntime's own
default level does the same (its MatMulAddFusion), so at the deploy level the fused graph runs the
very kernel the unfused one does: identical outputs in every case measured (K from 3 to 1000, batch
1 to 257). At ``ORT_DISABLE_ALL`` the two differ in the last bits: MLAS's Gemm adds the bias into
the output before or among its K blocks, MatMul+Add after the whole sum (K=512: |d| up to 3e-5 on
outputs ~±60; K=16 or 200: often bit-exact, not always, e.g. 2.4e-7). No condition we can check
makes it bit-exact, hence fold-batchnorm's stated tolerance rather than ``lossless``.

Left alone: A of another or unknown rank (Gemm is 2-D only), a MatMul output used elsewhere, a
bias that would broadcast the product to a bigger shape, non-float types.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from graphopt.edit import bypass, drop_if_unused
from graphopt.passbase import GraphPass, PassResult
from graphopt.passes._util import const_array, inferred_shapes, legacy_constants, operand_from, rank, rewrite_each, sole_use
from graphopt.passes.batchnorm import FoldBatchnorm
from graphopt.registry import register

logger = logging.getLogger(__name__)

FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE)


@register
@dataclasses.dataclass
class FuseGemm(GraphPass):
    """Fuse MatMul + Add of a constant bias into Gemm where A is 2-D and B a constant [K, N]."""

    name = "fuse-gemm"
    lossless = False
    stepwise = True
    tolerance = FoldBatchnorm.tolerance

    def call(self, model: ir.Model) -> PassResult:
        legacy = legacy_constants(model)
        with inferred_shapes(model):
            return rewrite_each(model, {"Add": lambda n: _fuse(n, legacy) if len(n.inputs) == 2 else "not_after_matmul"},
                                done=("fused",), quiet=("not_after_matmul",))  # fmt: skip


def _fuse(add: ir.Node, legacy: bool) -> str:
    found = operand_from(add, "MatMul")
    if found is None:
        return "not_after_matmul"
    matmul, product, bias = found
    assert bias is not None
    a, b = matmul.inputs[0], matmul.inputs[1]
    if not sole_use(product):
        return "matmul_output_shared"
    if a is None or b is None or rank(a) != 2:
        return "a_not_2d"
    weight, c = const_array(b, legacy), const_array(bias, legacy)
    if weight is None or c is None or weight.ndim != 2:
        return "not_constant"
    if a.dtype not in FLOATS or b.dtype not in FLOATS or bias.dtype != a.dtype:
        return "not_float"
    if c.shape not in ((weight.shape[1],), (1, weight.shape[1])):
        return "bias_not_per_column"
    gemm = ir.node("Gemm", [a, b, bias])
    add.graph.insert_before(add, gemm)  # type: ignore[union-attr]
    if not bypass(add, 0, gemm.outputs[0]):
        add.graph.remove(gemm, safe=True)  # type: ignore[union-attr]
        return "kept_io"
    graph = add.graph
    assert graph is not None
    graph.remove(add, safe=True)
    graph.remove(matmul, safe=True)
    for v in (a, b, bias):
        drop_if_unused(v)
    return "fused"
