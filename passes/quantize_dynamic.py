"""quantize-dynamic: int8 weights with activations quantized at run time, in the layout onnxruntime
fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat (see ``_qdynamic`` for the rewrites).

Where it differs from onnxruntime.quantization.quantize_dynamic: weight scales per output column
(ORT's tool defaults to one per tensor); embedding tables stay weight-only with one scale per row,
gathered before converting; Transpose'd constant weights (legacy exports) are unfolded first; and a
sensitivity search on calibration data keeps in float the MatMuls whose run-time activation
quantization costs the most (one range per whole activation tensor: a transformer's outlier
channels make some of them lossy) until the outputs meet the pass's budget with a margin.
Convolutions are left alone: ORT's ConvInteger has no fused float-output kernel and runs slower
than float Conv on x86 (use quantize-static or quantize-weights for CNNs).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from typing import Any

import onnx_ir as ir

from graphopt.edit import NameSet, onnx_opset
from graphopt.metrics import Tolerance, compare_outputs
from graphopt.passbase import GraphPass, PassResult, option
from graphopt.progress import track
from graphopt.registry import register
from graphopt.verify import run
from graphopt.passes._qdynamic import MIN_OPSET, Candidate, apply, find_candidates, ort_runs_dynamic
from graphopt.passes._qgraph import fold_transposed_weights, is_quantized, upgrade_opset

logger = logging.getLogger(__name__)


@register
@dataclasses.dataclass
class QuantizeDynamic(GraphPass):
    """Quantize MatMul/Gemm to int8 with activations quantized at run time (DynamicQuantizeLinear -> MatMulInteger), keeping the most sensitive ones in float.

    Default budget: SQNR >= 20 dB and cosine >= 0.99 at ORT's default level (where the chains run
    as DynamicQuantizeMatMul / MatMulIntegerToFloat). A model that already holds Q/DQ or quantized
    ops is left alone.
    """

    name = "quantize-dynamic"
    lossless = False
    uses_data = True
    tolerance = Tolerance(min_sqnr_db=20.0, min_cosine=0.99)

    per_channel: bool = option(True, "one weight scale per output column instead of one per tensor")
    ops: list[str] = option(["MatMul", "Gemm", "Gather"], "op types rewritten (Gather: embedding tables, int8 weight-only)")
    exclude: list[str] = option([], "fnmatch patterns (node name, op type, output or weight name) kept in float")
    min_elements: int = option(4096, "leave weights with fewer elements in float (run-time quantization costs more than it saves there)")
    search: bool = option(True, "keep the most harmful MatMuls in float until the calibration outputs meet the budget plus the margin")
    margin_db: float = option(1.0, "search margin over the budget's SQNR floor (dB); the cosine margin is half the allowed 1 - cosine")
    target_sqnr: float | None = option(None, "search target SQNR in dB (default: the budget's floor plus the margin)")

    def call(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        if is_quantized(model):
            return PassResult(model, modified=False, stats={"already_quantized": 1})
        stats["skipped_subgraph"] = sum(1 for g in model.graphs() if g is not model.graph for n in g if n.op_type in ("MatMul", "Gemm"))
        samples = list(self.calibration.samples) if self.calibration else None
        names = NameSet(model)
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
        records = {c.index: self._record(c) for c in candidates}
        keep: set[int] = set()
        if self.search:
            keep = self._search(model, candidates, samples, records, stats)
        chosen = [c for c in candidates if c.index not in keep]
        stats.update(apply(model, chosen, self.name))
        stats["kept_float"] = len(keep)
        return self._result(model, stats, [records[c.index] for c in candidates])

    def _targets(self) -> tuple[float | None, float | None]:
        """(SQNR, cosine) the search aims at: the budget's floors with a margin (the class default
        when the budget is a task-accuracy drop only: a proxy for what the runner will check)."""
        tol = self.budget()
        if tol.min_sqnr_db is None and tol.min_cosine is None:
            tol = self.tolerance
        sqnr = self.target_sqnr if self.target_sqnr is not None else (tol.min_sqnr_db + self.margin_db if tol.min_sqnr_db is not None else None)
        cosine = 1.0 - (1.0 - tol.min_cosine) / 2 if tol.min_cosine is not None else None
        return sqnr, cosine

    def _search(self, model: ir.Model, candidates: list[Candidate], samples: list, records: dict[int, dict[str, Any]], stats: Counter[str]) -> set[int]:
        """Indices of the candidates to keep in float: quantize each alone, rank by the output SQNR
        that costs, then the shortest most-harmful-first prefix kept in float that meets the target
        (bisection: the error grows with what is quantized)."""
        sqnr_target, cos_target = self._targets()
        reference = run(model, samples, "exact")

        def score(quantized: list[Candidate]) -> tuple[float, float]:
            m = model.clone()
            apply(m, quantized, self.name)
            errors = compare_outputs(reference, run(m, samples, "deploy"))
            return min((e.sqnr_db for e in errors), default=math.inf), min((e.cosine for e in errors), default=1.0)

        def ok(s: tuple[float, float]) -> bool:
            return (sqnr_target is None or s[0] >= sqnr_target) and (cos_target is None or s[1] >= cos_target)

        full = score(candidates)
        stats["search_runs"] += 1
        self._note(stats, "all_int8", full)
        if ok(full):
            return set()
        alone = {}
        for c in track(candidates, f"{self.name}: sensitivity"):
            alone[c.index] = score([c])
            records[c.index]["alone_sqnr_db"] = round(alone[c.index][0], 2)
        stats["search_runs"] += len(candidates)
        order = sorted(candidates, key=lambda c: alone[c.index])
        lo, hi = 0, len(order)  # keeping order[:hi] in float meets the target (nothing quantized does)
        best = (math.inf, 1.0)
        while lo < hi:
            mid = (lo + hi) // 2
            s = score(order[mid:])
            stats["search_runs"] += 1
            if ok(s):
                hi, best = mid, s
            else:
                lo = mid + 1
        keep = {c.index for c in order[:hi]}
        self._note(stats, "reached", best)
        for i in keep:
            records[i].update(choice="float", reason="sensitivity")
        return keep

    @staticmethod
    def _note(stats: Counter[str], key: str, s: tuple[float, float]) -> None:
        if math.isfinite(s[0]):
            stats[f"{key}_sqnr_centi_db"] = int(round(s[0] * 100))
        stats[f"{key}_cosine_ppm"] = int(round(s[1] * 1e6))

    def _record(self, c: Candidate) -> dict[str, Any]:
        choice = "int8 weight-only" if c.kind == "gather" else "int8 dynamic"
        scales = "per-row" if c.kind == "gather" else ("per-channel" if c.qw.scale.ndim else "per-tensor")
        return {"name": c.name, "op": {"gather": "Gather", "gemm": "Gemm"}.get(c.kind, "MatMul"), "shape": list(c.shape), "scales": scales,
                "weight_sqnr_db": c.weight_sqnr_db, "choice": choice}  # fmt: skip

    def _result(self, model: ir.Model, stats: Counter[str], layers: list[dict[str, Any]]) -> PassResult:
        clean = {k: int(v) for k, v in stats.items() if v}
        modified = any(clean.get(k) for k in ("dynamic_matmuls", "gather_weight_only", "folded_transpose", "opset_upgraded_to"))
        logger.debug("%s: %s", self.name, clean)
        return PassResult(model, modified=modified, stats=clean, layers=layers)
