"""quantize-static: int8 activations and weights as QuantizeLinear/DequantizeLinear pairs, calibrated
on data, in the layout onnxruntime fuses into QLinearConv / QLinearMatMul / QGemm / QLinearAdd /
MatMulIntegerToFloat (see ``_qstatic`` for the rules).

Where it differs from onnxruntime.quantization.quantize_static: Conv+BatchNormalization are folded,
Transpose'd constant weights (legacy exports) unfolded and constant subgraphs that compute a weight
folded first (``_qgraph.fold_weight_chains``), so every weight is quantized;
graph outputs stay float (the last layer runs as QGemm/MatMulIntegerToFloat with float output);
activations default to uint8 (on x86 ORT converts int8 Q/DQ pairs to uint8 only when a Q has a
single reader, so int8 activations that fan out stay unfused); the opset is raised to 13 for
per-channel weights with onnx's converter, verified; ``latency-aware`` keeps in float the layers
that run slower in int8 on this machine.

Each int8 Conv/Gemm (and MatMul + bias Add) gets its float bias corrected for the mean output shift
its weight's rounding causes on the calibration data before the bias is quantized to int32
(``bias-correction``, ``_biascorr``); the layers the search keeps in float keep their bias.

What stays float, and why (each layer's record says which):
- ``mask_range``: a node that would quantize a tensor whose calibrated range is set by far outliers,
  such as the ``finfo.min`` of an attention mask added to the scores (``_calibrate.mask_like``): an
  8-bit grid over that range leaves the scores one or two levels, and the output garbage;
- ``sensitivity``: when the all-int8 model misses the pass's budget (``budget-min-sqnr`` /
  ``budget-min-cosine`` when given, else 20 dB / 0.99) plus ``margin`` at ORT's default level on the
  calibration data, each node is quantized alone and ranked by what that costs the output, and the
  fewest most harmful ones are kept in float by bisection (``_qsearch.keep_float_search``). So the
  default delivers the most-quantized model that meets the budget rather than a rollback.

ConvTranspose, GRU and RNN have no integer kernel in onnxruntime's CPU provider (a QDQ
ConvTranspose stays DQ -> float ConvTranspose -> Q after its optimizer): their activations are left
alone and their constant weights get int8 weight-only (``weight-only``, what quantize-weights does
with them at 8 bits), so the file shrinks where the speed can't change. LSTM's one int8 kernel
quantizes its input and hidden state at run time: LSTMs become com.microsoft DynamicQuantizeLSTM
(``dynamic-lstm``, as quantize-dynamic makes them; models/digits_lstm: 0.58x float's latency,
where weight-only LSTMs run 1.15x, the weights dequantized on every run). Embedding tables
(``gather``) are int8 with a scale per row, rows gathered before they are converted, as
quantize-dynamic stores them (a DequantizeLinear before the Gather would convert the whole table
on every run). These are rewritten before calibration, so the ranges, the search and bias
correction see them as they will be.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.activations import capture
from graphopt.edit import NameSet, is_onnx_op, onnx_opset
from graphopt.layers import as_linear_layer
from graphopt.metrics import Tolerance
from graphopt.passbase import GraphPass, PassResult, option
from graphopt.passes._biascorr import input_means, lookup
from graphopt.passes._calibrate import Method
from graphopt.passes._qgraph import fold_transposed_weights, fold_weight_chains, is_quantized, ort_qdq_gap, upgrade_opset
from graphopt.passes._qmath import QTYPES
from graphopt.passes._qsearch import RANK_ROWS, SEARCH_ROWS, keep_float_search, output_sqnr, search_goal, search_rows, time_layers, whole_model_ms, note_search
from graphopt.passes._qstatic import COMPUTE, TRANSPARENT, Plan, apply_plan, collect_ranges, float_tensors, fold_batchnorm, fuse_matmul_add, group_params, make_plan, touching
from graphopt.registry import register
from graphopt.passes._qconv import static_gptq_weights
from graphopt.passes._qdynamic import apply as apply_dynamic
from graphopt.passes._qdynamic import find_candidates
from graphopt.passes.quantize_dynamic import QuantizeDynamic
from graphopt.passes.quantize_weights import OTHER_KINDS, quantize_weight_only
from graphopt.verify import OrtFailure

logger = logging.getLogger(__name__)


@register
@dataclasses.dataclass
class QuantizeStatic(GraphPass):
    """Quantize activations and weights to 8 bits with Q/DQ pairs calibrated on data, in the layout onnxruntime fuses into integer kernels.

    Default budget: SQNR >= 20 dB and cosine >= 0.99 at ORT's default level; layers that would break
    it stay in float (``search``). A model that already holds Q/DQ or quantized ops is left alone.
    """

    name = "quantize-static"
    lossless = False
    uses_data = True
    tolerance = Tolerance(min_sqnr_db=20.0, min_cosine=0.99)

    calibrate: Method = option("minmax", "how activation ranges are chosen: minmax, percentile, entropy (KL) or mse")
    percentile: float = option(99.999, "percentile calibration: the kept share of values, in percent")
    per_channel: bool = option(True, "one weight scale per output channel (opset 13) instead of one per tensor")
    activation_type: Literal["uint8", "int8"] = option("uint8", "activation type (uint8 fuses best on x86)")
    ops: list[str] = option(list(COMPUTE), "op types quantized (Reshape/MaxPool/... follow their neighbours)")
    exclude: list[str] = option([], "fnmatch patterns (node name, op type or output name) kept in float")
    fold_batchnorm: bool = option(True, "fold Conv+BatchNormalization first (what ORT's pre-processing does)")
    search: bool = option(True, "when the all-int8 model misses the budget, keep the most harmful layers in float until it meets it (with margin)")
    target_sqnr: float | None = option(None, "SQNR (dB, calibration data, deploy level) the search aims at instead of the budget's plus margin")
    search_seconds: float = option(300.0, "time limit of the search's per-node ranking; nodes it has not reached rank as harmless")
    margin: float = option(1.0, "head room (dB) over the budget the search keeps, for samples other than the calibration ones")
    cheap_float_share: float = option(0.001, "within budget too, keep in float the layers whose weights are at most this share of all and that alone gain >= 1 dB output SQNR (0: off)")
    rounding: Literal["nearest", "gptq"] = option("nearest", "int8 weights: round to nearest, or GPTQ (error feedback on the calibration data; Conv per group on im2col rows, MatMul, Gemm)")
    latency_aware: bool = option(False, "time each layer in float and int8 with onnxruntime here; keep in float where int8 is not faster")
    bias_correction: bool = option(True, "subtract each int8 Conv/Gemm/MatMul's mean output shift from weight rounding (calibration data) from its bias (_biascorr)")
    weight_only: list[str] = option(list(OTHER_KINDS), "ops without an int8 kernel whose constant weights get int8 weight-only scales (per output channel / gate row)")
    dynamic_lstm: bool = option(True, "LSTMs become DynamicQuantizeLSTM (int8 weights, input and hidden state quantized at run time); false: weight-only")
    gather: bool = option(True, "constant Gather tables (embeddings) int8 with one scale per row, gathered before converting (as quantize-dynamic does)")

    def call(self, model: ir.Model) -> PassResult:
        if is_quantized(model):
            return PassResult(model, modified=False, stats={"already_quantized": 1})
        stats: Counter[str] = Counter()
        samples = list(self.calibration.samples) if self.calibration else None
        if samples is None:
            from graphopt.data import generate

            samples = generate(model, samples=8, seed=1)
            stats["generated_calibration"] = len(samples)
        names = NameSet(model)
        stats["folded_weight_chain_nodes"] = fold_weight_chains(model, [*self.ops, *self.weight_only, *self._dynamic_kinds()])
        stats["folded_transpose"] = fold_transposed_weights(model, names)
        if self.fold_batchnorm:
            stats["folded_batchnorm"] = fold_batchnorm(model, names)
        floats = float_tensors(model)
        if "Gemm" in self.ops:
            stats["fused_matmul_add"] = fuse_matmul_add(model, floats, names)
            floats = float_tensors(model)
        plan = make_plan(model, self.ops, self.exclude, set(), floats)
        stats.update(plan.skipped)
        stats["skipped_subgraph"] = sum(1 for g in model.graphs() if g is not model.graph for n in g if n.op_type in COMPUTE)
        outside = {*self.weight_only, *self._dynamic_kinds()}
        if not plan.compute and not any(n.op_type in outside for n in model.graph):
            return self._result(model, stats, [])
        need = 13 if self.per_channel else 10
        per_channel = self.per_channel
        if onnx_opset(model) < need:
            why = upgrade_opset(model, need, samples)
            if why and onnx_opset(model) >= 10:
                per_channel = False
                stats["per_tensor_fallback"] += 1
                logger.warning("%s: %s; per-tensor weight scales", self.name, why)
            elif why:
                logger.warning("%s: %s; nothing quantized", self.name, why)
                stats["skipped_opset"] += len(plan.compute)
                return self._result(model, stats, [])
            else:
                stats["opset_upgraded_to"] = need
                floats = float_tensors(model)
                plan = make_plan(model, self.ops, self.exclude, set(), floats)
        qt = QTYPES[self.activation_type]
        why, best = ort_qdq_gap(onnx_opset(model), qt.dtype, activations=True)
        if not why:
            why, best = ort_qdq_gap(onnx_opset(model), ir.DataType.INT8, layout="axis" if per_channel else "tensor")
        if why:  # checked before anything is calibrated: nodes onnxruntime can't load would only be rolled back
            logger.warning("%s: %s; nothing quantized", self.name, why)
            stats["skipped_ort_opset"] += len(plan.compute)
            stats["ort_qdq_max_opset"] = best
            return self._result(model, stats, [])
        others = self._outside_plan(model, per_channel, stats)  # first: calibration, the search and bias correction see them as they will be
        if others:
            floats = float_tensors(model)
            plan = make_plan(model, self.ops, self.exclude, set(), floats)  # node positions moved
        if not plan.compute:
            return self._result(model, stats, others)
        ranges, masks = collect_ranges(model, list(plan.groups), samples, self.calibrate, qt, self.percentile)
        labels = {i: n.name or n.outputs[0].name or n.op_type for i, n in enumerate(model.graph)}
        nodes = list(model.graph)
        cache: dict = {}
        means = self._bias_means(model, plan, samples) if self.bias_correction else None
        notes: dict[int, dict] = {}

        def build(keep: set[int] | None, target: ir.Model | None = None) -> tuple[ir.Model, Plan]:
            if keep is None:
                return model, plan
            m = target if target is not None else model.clone()
            p = make_plan(model, self.ops, self.exclude, keep, floats)
            apply_plan(m, p, group_params(p, ranges, qt), qt, per_channel, self.name, cache, means, notes if target is not None else None)
            return m, p

        if self.rounding == "gptq":  # apply_plan takes the weights from its cache
            cache.update(static_gptq_weights(model, [layer for i in plan.compute if (layer := as_linear_layer(nodes[i])) is not None], samples, per_channel))
        layers: dict[int, dict[str, Any]] = {i: {"name": labels[i], "op": nodes[i].op_type, "choice": "int8"} for i in plan.compute}
        keep = _mask_nodes(model, plan, masks, lambda k: make_plan(model, self.ops, self.exclude, k, floats))
        for i in keep:
            layers[i].update(choice="float", reason="mask_range")
        stats["kept_float_mask_range"] = len(keep)
        if self.latency_aware:
            keep |= self._latency(model, plan, ranges, qt, per_channel, samples, keep, layers, build, stats)
        budget = self.budget(self.default_budget)  # what the runner holds this pass to (its --tolerance, then budget-* options)
        if self.search and (budget.is_set() or self.target_sqnr is not None):
            fixed = set(keep)
            keep |= self._search(lambda k: build(None if k is None else k | fixed), [i for i in plan.compute if i not in keep], samples, budget, layers, stats)
        stats["kept_float_latency"] = sum(1 for r in layers.values() if r.get("reason") == "latency")
        _, final = build(keep, target=model)
        for i, note in notes.items():
            layers[i].update(note)
            stats["bias_corrected" if note["bias_correction"] == "applied" else "bias_uncorrected_" + note["bias_correction"]] += 1
        stats["quantized_nodes"] = len(final.compute)
        stats["qdq_pairs"] = len(final.tensors)
        stats["relu_absorbed"] = len(final.absorbed)
        return self._result(model, stats, [layers[i] for i in sorted(layers)] + others)

    def _dynamic_kinds(self) -> list[str]:
        return ["LSTM"] * self.dynamic_lstm + ["Gather"] * self.gather

    def _outside_plan(self, model: ir.Model, per_channel: bool, stats: Counter[str]) -> list[dict[str, Any]]:
        """Rewrite the ops no QDQ pair makes faster (module doc): LSTMs and embedding tables as
        quantize-dynamic does, the ``weight-only`` ops' weights as quantize-weights does; their records."""
        kinds = self._dynamic_kinds()
        tables_lstms = find_candidates(model, kinds, self.exclude, QuantizeDynamic.min_elements, per_channel)[0] if kinds else []
        done = apply_dynamic(model, tables_lstms, self.name)
        stats["dynamic_lstms"], stats["gather_weight_only"] = done["dynamic_lstms"], done["gather_weight_only"]
        weight_only = quantize_weight_only(model, [op for op in self.weight_only if op in OTHER_KINDS], self.exclude, per_channel, self.name, Counter())
        stats["weight_only"] = len(weight_only)
        return [r | {"choice": "int8 weight-only"} for r in weight_only] + [QuantizeDynamic.record(c) for c in tables_lstms]

    def _bias_means(self, model: ir.Model, plan: Plan, samples: list) -> dict[int, np.ndarray]:
        """Per weighted compute node (index), its ``_biascorr.input_means`` entry on the float model."""
        nodes = list(model.graph)
        layers = {i: layer for i in plan.compute if (layer := as_linear_layer(nodes[i])) is not None}
        means = input_means(model, list(layers.values()), samples)
        return {i: m for i, layer in layers.items() if (m := lookup(means, layer)) is not None}

    def _latency(self, model, plan, ranges, qt, per_channel, samples, keep, layers, build, stats) -> set[int]:  # noqa: ANN001
        """Layers to keep in float because int8 is not faster here (timed per layer, then end to end)."""
        nodes = list(model.graph)
        base, keep = set(keep), set(keep)
        shapes = {n: a[0].shape for n, a in capture(model, samples[:1], sorted({nodes[i].inputs[0].name for i in plan.compute})).items()}
        for i, (t_float, t_int8) in time_layers(model, plan, group_params(plan, ranges, qt), qt, per_channel, shapes, self.name).items():
            layers[i].update(float_ms=round(t_float, 4), int8_ms=round(t_int8, 4))
            if t_int8 >= t_float and i not in keep:
                keep.add(i)
                layers[i].update(choice="float", reason="latency")
        # per-layer choices ignore the conversions between layers: check end to end
        candidates = {"int8": base, "mixed": set(keep), "float": set(plan.compute)}
        if keep == base:
            candidates.pop("mixed")
        models = [model] + [build(k)[0] for c, k in candidates.items() if c != "float"]
        times = dict(zip(["float", *(c for c in candidates if c != "float")], whole_model_ms(models, samples[0])))
        for c, t in times.items():
            stats[f"latency_us_{c}"] = int(round(t * 1000))
        best = min(times, key=lambda c: (times[c], c != "float"))
        if best != "mixed":
            keep = candidates[best]
            why = "float model faster end to end" if best == "float" else "all-int8 model faster end to end"
            for i in plan.compute:
                if layers[i]["choice"] != ("float" if i in keep else "int8"):
                    layers[i].update(choice="float" if i in keep else "int8", reason=why)
        stats["latency_choice_" + best] = 1
        return keep

    def _search(self, build, compute, samples, budget, layers, stats) -> set[int]:  # noqa: ANN001
        """Nodes kept in float so the model meets the budget (plus margin) on the calibration data."""
        target, task = search_goal(budget, self.calibration, self.margin, self.target_sqnr, self.default_tolerance(), stats)
        model = build(None)[0]
        check = search_rows(samples, SEARCH_ROWS, model)
        rank = search_rows(samples, RANK_ROWS, model)
        nodes = list(model.graph)
        weights = {i: (layer.tensor.size if (layer := as_linear_layer(nodes[i])) is not None else 0) for i in compute}
        try:
            found = keep_float_search(build, compute, rank, check, target, self.search_seconds, weights, self.name, task,
                                      cheap_share=self.cheap_float_share, pairs=_adjacent(nodes, compute))  # fmt: skip
        except OrtFailure as e:  # e.g. no QuantizeLinear kernel at this opset: nothing to measure with here
            logger.warning("%s: no search, onnxruntime cannot run the candidates: %s", self.name, e)
            stats["search_skipped_ort_failure"] = 1
            return set()
        for i, sqnr in found.alone.items():
            layers[i]["alone_sqnr_db"] = round(sqnr, 2)
        for i in found.keep:
            why = f"alone the output's SQNR is {found.alone[i]:.1f} dB" if i in found.alone else "not ranked in time"
            if i in found.cheap:
                why = f"cheap: float gains {found.cheap[i]:.1f} dB"
            layers[i].update(choice="float", reason=f"sensitivity: {why}")
        if found.order == "weightless first":
            stats["search_weightless_first"] = 1
        stats["kept_float_sensitivity"] = len(found.keep) - len(found.cheap)
        stats["kept_float_cheap"] = len(found.cheap)
        note_search(found, stats)
        if found.keep:
            logger.info("%s: kept %d of %d nodes in float to meet %s%s", self.name, len(found.keep), len(compute), target, "" if task is None else f" and an accuracy drop <= {task.max_drop:g} points")
        return found.keep

    def _result(self, model: ir.Model, stats: Counter[str], layers: list[dict[str, Any]]) -> PassResult:
        clean = {k: int(v) for k, v in stats.items() if v}
        modified = any(clean.get(k) for k in ("quantized_nodes", "weight_only", "dynamic_lstms", "gather_weight_only", "folded_weight_chain_nodes", "folded_transpose", "folded_batchnorm", "fused_matmul_add", "opset_upgraded_to"))
        logger.debug("%s: %s", self.name, clean)
        return PassResult(model, modified=modified, stats=clean, layers=layers)


def _adjacent(nodes: list[ir.Node], compute: list[int]) -> list[tuple[int, int]]:
    """(producer, consumer) pairs of compute nodes joined by one activation tensor, through
    Relu/Clip and data-movement nodes: keeping both in float is what leaves that tensor unquantized."""
    index = {id(n): i for i, n in enumerate(nodes)}
    computed = set(compute)
    pairs = []
    for j in compute:
        for v in nodes[j].inputs[:2]:
            p = v.producer() if v is not None else None
            while p is not None and is_onnx_op(p, ("Relu", "Clip", *TRANSPARENT)) and p.inputs and p.inputs[0] is not None:
                p = p.inputs[0].producer()
            if p is not None and index.get(id(p)) in computed:
                pairs.append((index[id(p)], j))
    return list(dict.fromkeys(pairs))


def _mask_nodes(model: ir.Model, plan: Plan, masks: set[str], replan) -> set[int]:  # noqa: ANN001
    """Compute nodes kept float so that no mask-like tensor (or one sharing its scale) gets a Q."""
    keep: set[int] = set()
    while True:
        p = replan(keep)
        more = touching(model, p, masks & set(p.groups)) - keep
        if not more:
            return keep
        keep |= more


__all__ = ["QuantizeStatic", "output_sqnr"]
