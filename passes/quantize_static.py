"""quantize-static: int8 activations and weights as QuantizeLinear/DequantizeLinear pairs, calibrated
on data, in the layout onnxruntime fuses into QLinearConv / QLinearMatMul / QGemm / QLinearAdd /
MatMulIntegerToFloat (see ``_qstatic`` for the rules).

Where it differs from onnxruntime.quantization.quantize_static: Conv+BatchNormalization are folded
and Transpose'd constant weights (legacy exports) unfolded first, so every weight is quantized;
graph outputs stay float (the last layer runs as QGemm/MatMulIntegerToFloat with float output);
activations default to uint8 (on x86 ORT converts int8 Q/DQ pairs to uint8 only when a Q has a
single reader, so int8 activations that fan out stay unfused); the opset is raised to 13 for
per-channel weights with onnx's converter, verified; ``target-sqnr`` keeps the most harmful layers
in float, and ``latency-aware`` the layers that run slower in int8 on this machine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any, Literal

import onnx_ir as ir

from graphopt.activations import capture
from graphopt.edit import NameSet, onnx_opset
from graphopt.metrics import Tolerance
from graphopt.passbase import GraphPass, PassResult, option
from graphopt.passes._calibrate import Method
from graphopt.passes._qgraph import fold_transposed_weights, is_quantized, upgrade_opset
from graphopt.passes._qmath import QTYPES
from graphopt.passes._qsearch import output_sqnr, sensitivity, time_layers, whole_model_ms
from graphopt.passes._qstatic import COMPUTE, Plan, apply_plan, collect_ranges, float_tensors, fold_batchnorm, fuse_matmul_add, group_params, make_plan
from graphopt.registry import register
from graphopt.verify import run

logger = logging.getLogger(__name__)


@register
@dataclasses.dataclass
class QuantizeStatic(GraphPass):
    """Quantize activations and weights to 8 bits with Q/DQ pairs calibrated on data, in the layout onnxruntime fuses into integer kernels.

    Default budget: SQNR >= 20 dB and cosine >= 0.99 at ORT's default level. A model that already
    holds Q/DQ or quantized ops is left alone.
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
    target_sqnr: float | None = option(None, "keep the most harmful layers in float until the output SQNR (dB, calibration data) reaches this")
    latency_aware: bool = option(False, "time each layer in float and int8 with onnxruntime here; keep in float where int8 is not faster")

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
        if not plan.compute:
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
        ranges = collect_ranges(model, list(plan.groups), samples, self.calibrate, qt, self.percentile)
        labels = {i: n.name or n.outputs[0].name or n.op_type for i, n in enumerate(model.graph)}
        nodes = list(model.graph)

        def build(keep: set[int], target: ir.Model | None = None) -> tuple[ir.Model, Plan]:
            m = target if target is not None else model.clone()
            p = make_plan(model, self.ops, self.exclude, keep, floats)
            apply_plan(m, p, group_params(p, ranges, qt), qt, per_channel, self.name)
            return m, p

        keep: set[int] = set()
        layers: dict[int, dict[str, Any]] = {i: {"name": labels[i], "op": nodes[i].op_type, "choice": "int8"} for i in plan.compute}
        if self.latency_aware:
            shapes = {n: a[0].shape for n, a in capture(model, samples[:1], sorted({nodes[i].inputs[0].name for i in plan.compute})).items()}
            for i, (t_float, t_int8) in time_layers(model, plan, group_params(plan, ranges, qt), qt, per_channel, shapes, self.name).items():
                layers[i].update(float_ms=round(t_float, 4), int8_ms=round(t_int8, 4))
                if t_int8 >= t_float:
                    keep.add(i)
                    layers[i].update(choice="float", reason="latency")
        if self.latency_aware:  # per-layer choices ignore the conversions between layers: check end to end
            candidates = {"int8": set(), "mixed": set(keep), "float": set(plan.compute)}
            if not keep:
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
        if self.target_sqnr is not None:
            reference = run(model, samples, "exact")
            more, records, reached = sensitivity(lambda k: build(keep | k), [i for i in plan.compute if i not in keep], samples, reference, self.target_sqnr, labels)
            stats["kept_float_sensitivity"] = len(more)
            by_name = {r["name"]: r for r in records}
            for i in plan.compute:
                if labels[i] in by_name:
                    r = by_name[labels[i]]
                    layers[i]["alone_sqnr_db"] = r["alone_sqnr_db"]
                    if i in more:
                        layers[i].update(choice="float", reason="sensitivity")
            keep |= more
            stats["reached_sqnr_centi_db"] = int(round(reached * 100)) if reached != float("inf") else 0
        stats["kept_float_latency"] = sum(1 for r in layers.values() if r.get("reason") == "latency")
        _, final = build(keep, target=model)
        stats["quantized_nodes"] = len(final.compute)
        stats["qdq_pairs"] = len(final.tensors)
        stats["relu_absorbed"] = len(final.absorbed)
        return self._result(model, stats, [layers[i] for i in sorted(layers)])

    def _result(self, model: ir.Model, stats: Counter[str], layers: list[dict[str, Any]]) -> PassResult:
        clean = {k: int(v) for k, v in stats.items() if v}
        modified = any(clean.get(k) for k in ("quantized_nodes", "folded_transpose", "folded_batchnorm", "fused_matmul_add", "opset_upgraded_to"))
        logger.debug("%s: %s", self.name, clean)
        return PassResult(model, modified=modified, stats=clean, layers=layers)


__all__ = ["QuantizeStatic", "output_sqnr"]
