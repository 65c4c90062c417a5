"""quantize-dynamic: int8 weights with activations quantized at run time, in the layout onnxruntime
fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat, and LSTMs as DynamicQuantizeLSTM (see
``_qdynamic`` for the rewrites).

Where it differs from onnxruntime.quantization.quantize_dynamic: weight scales per output column
(ORT's tool defaults to one per tensor); embedding tables stay weight-only with one scale per row,
gathered before converting; Transpose'd constant weights (legacy exports) are unfolded and constant
subgraphs computing a weight folded first (torch's LSTM export slices its weights per gate); and a
sensitivity search on calibration data keeps in float the MatMuls whose run-time activation
quantization costs the most (one range per whole activation tensor: a transformer's outlier
channels make some of them lossy) until the outputs meet the pass's budget with a margin.
Convolutions are left alone: ORT's ConvInteger has no fused float-output kernel and runs slower
than float Conv on x86 (use quantize-static or quantize-weights for CNNs). So are GRU and RNN,
which have no int8 kernel at all (quantize-weights and quantize-static store their weights int8,
weight-only).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

import onnx_ir as ir

from graphopt.edit import NameSet, onnx_opset
from graphopt.layers import as_linear_layer
from graphopt.passes._biascorr import input_means, lookup
from graphopt.metrics import Tolerance
from graphopt.passbase import GraphPass, PassResult, option
from graphopt.registry import register
from graphopt.passes._qdynamic import MIN_OPSET, Candidate, apply, find_candidates, ort_runs_dynamic
from graphopt.passes._qgraph import fold_transposed_weights, fold_weight_chains, is_quantized, upgrade_opset
from graphopt.passes._qsearch import RANK_ROWS, SEARCH_ROWS, keep_float_search, search_goal, search_rows, note_search

logger = logging.getLogger(__name__)


@register
@dataclasses.dataclass
class QuantizeDynamic(GraphPass):
    """Quantize MatMul/Gemm (and LSTM) to int8 with activations quantized at run time (DynamicQuantizeLinear -> MatMulInteger; DynamicQuantizeLSTM), keeping the most sensitive ones in float.

    Default budget: SQNR >= 20 dB and cosine >= 0.99 at ORT's default level (where the chains run
    as DynamicQuantizeMatMul / MatMulIntegerToFloat). A model that already holds Q/DQ or quantized
    ops is left alone.
    """

    name = "quantize-dynamic"
    lossless = False
    uses_data = True
    tolerance = Tolerance(min_sqnr_db=20.0, min_cosine=0.99)

    per_channel: bool = option(True, "one weight scale per output column instead of one per tensor")
    ops: list[str] = option(["MatMul", "Gemm", "Gather", "LSTM"], "op types rewritten (Gather: embedding tables, int8 weight-only; LSTM: com.microsoft DynamicQuantizeLSTM)")
    exclude: list[str] = option([], "fnmatch patterns (node name, op type, output or weight name) kept in float")
    min_elements: int = option(4096, "leave weights with fewer elements in float (run-time quantization costs more than it saves there)")
    search: bool = option(True, "keep the most harmful MatMuls in float until the calibration outputs meet the budget plus the margin")
    margin_db: float = option(1.0, "search head room over the budget (dB; on 1 - cosine as a power ratio), for samples other than the calibration ones")
    target_sqnr: float | None = option(None, "search target SQNR in dB (default: the budget's floor plus the margin)")
    bias_correction: bool = option(True, "subtract each int8 MatMul/Gemm's mean output shift from weight rounding (calibration data) from its bias (_biascorr)")

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        if is_quantized(model):
            return PassResult(model, modified=False, stats={"already_quantized": 1})
        stats["skipped_subgraph"] = sum(1 for g in model.graphs() if g is not model.graph for n in g if n.op_type in ("MatMul", "Gemm"))
        samples = list(self.calibration.samples) if self.calibration else None
        names = NameSet(model)
        stats["folded_weight_chain_nodes"] = fold_weight_chains(model, self.ops)
        stats["folded_transpose"] = fold_transposed_weights(model, names, [op for op in self.ops if op in ("MatMul", "Gemm")])
        candidates, skipped = find_candidates(model, self.ops, self.exclude, self.min_elements, self.per_channel)
        stats.update(skipped)
        if not candidates:
            return self._result(model, stats, [])
        opset = onnx_opset(model)
        if opset < MIN_OPSET:
            why = upgrade_opset(model, MIN_OPSET, samples)
            if why:
                logger.warning("%s: %s; nothing quantized", self.name, why)
                stats["skipped_opset"] += len(candidates)
                return self._result(model, stats, [])
            stats["opset_upgraded_to"] = MIN_OPSET
            candidates, _ = find_candidates(model, self.ops, self.exclude, self.min_elements, self.per_channel)
        elif not ort_runs_dynamic(opset):
            logger.warning("%s: onnxruntime has no DynamicQuantizeLinear/MatMulInteger/Cast kernels at opset %d; nothing quantized", self.name, opset)
            stats["skipped_ort_opset"] += len(candidates)
            return self._result(model, stats, [])
        if samples is None:
            from graphopt.data import generate

            samples = generate(model, samples=4, seed=1)
            stats["generated_calibration"] = len(samples)
        records = {c.index: self.record(c) for c in candidates}
        means = self._bias_means(model, candidates, samples, stats) if self.bias_correction else None
        keep: set[int] = set()
        if self.search:
            keep = self._search(model, candidates, samples, records, stats, means)
        chosen = [c for c in candidates if c.index not in keep]
        notes: dict[int, dict] = {}
        stats.update(apply(model, chosen, self.name, means, notes))
        for i, note in notes.items():
            records[i].update(note)
            stats["bias_corrected" if note["bias_correction"] == "applied" else "bias_uncorrected_" + note["bias_correction"]] += 1
        stats["kept_float"] = len(keep)
        return self._result(model, stats, [records[c.index] for c in candidates])

    def _bias_means(self, model: ir.Model, candidates: list[Candidate], samples: list, stats: Counter[str]) -> dict[int, Any] | None:
        """Per MatMul/Gemm candidate (index), its ``_biascorr.input_means`` entry (none on generated data)."""
        if stats["generated_calibration"]:
            stats["bias_correction_no_calibration"] = 1
            return None
        nodes = list(model.graph)
        layers = {c.index: layer for c in candidates if c.kind != "gather" and (layer := as_linear_layer(nodes[c.index])) is not None}
        means = input_means(model, list(layers.values()), samples)
        return {i: m for i, layer in layers.items() if (m := lookup(means, layer)) is not None}

    def _search(self, model: ir.Model, candidates: list[Candidate], samples: list, records: dict[int, dict[str, Any]], stats: Counter[str],
                means: dict[int, Any] | None = None) -> set[int]:  # fmt: skip
        """Indices of the candidates to keep in float: the fewest, most harmful ones for the model to
        meet the budget plus ``margin-db`` on a few calibration rows (``_qsearch.keep_float_search``,
        shared with quantize-static and quantize-weights)."""
        target, task = search_goal(self.budget(self.default_budget), self.calibration, self.margin_db, self.target_sqnr, self.default_tolerance(), stats)

        def build(keep: set[int] | None) -> tuple[ir.Model, None]:
            if keep is None:
                return model, None
            m = model.clone()
            apply(m, [c for c in candidates if c.index not in keep], self.name, means)
            return m, None

        check = search_rows(samples, SEARCH_ROWS, model)
        found = keep_float_search(build, [c.index for c in candidates], search_rows(samples, RANK_ROWS, model), check, target, label=self.name, task=task)
        note_search(found, stats)
        for i, sqnr in found.alone.items():
            records[i]["alone_sqnr_db"] = round(sqnr, 2)
        for i in found.keep:
            records[i].update(choice="float", reason="sensitivity")
        return found.keep

    @staticmethod
    def record(c: Candidate) -> dict[str, Any]:
        """The layer record of a candidate, as quantized (the search may change its choice)."""
        choice = "int8 weight-only" if c.kind == "gather" else "int8 dynamic"
        if c.kind == "lstm":
            scales = "per-gate-row" if c.qw.scale.size > c.shape[0] else "per-direction"
        else:
            scales = "per-row" if c.kind == "gather" else ("per-channel" if c.qw.scale.ndim else "per-tensor")
        return {"name": c.name, "op": {"gather": "Gather", "gemm": "Gemm", "lstm": "LSTM"}.get(c.kind, "MatMul"), "shape": list(c.shape), "scales": scales,
                "weight_sqnr_db": c.weight_sqnr_db, "choice": choice}  # fmt: skip

    def _result(self, model: ir.Model, stats: Counter[str], layers: list[dict[str, Any]]) -> PassResult:
        clean = {k: int(v) for k, v in stats.items() if v}
        modified = any(clean.get(k) for k in ("dynamic_matmuls", "dynamic_lstms", "gather_weight_only", "folded_weight_chain_nodes", "folded_transpose", "opset_upgraded_to"))
        logger.debug("%s: %s", self.name, clean)
        return PassResult(model, modified=modified, stats=clean, layers=layers)
