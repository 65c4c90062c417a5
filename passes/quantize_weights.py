"""quantize-weights: constant MatMul/Gemm/Conv weights (and optionally Gather tables) stored as
int8/int4 initializers read through DequantizeLinear, or as onnxruntime's MatMulNBits.

Layouts, all in the form onnxruntime fuses:
- 8 bits: per output channel (``axis`` 1 for ``X @ W``, 0 for Gemm ``transB=1``, ``W @ X`` and
  Conv; opset 13) or per tensor (opset 10).
- 4 bits: MatMul weights ``[K, N]`` blocked along K (``block_size``, opset 21), which ORT turns
  into MatMulNBits at its default level; Gemm (``transA=0``) is rewritten to MatMul (+ Add bias)
  for that; Conv weights ``[O, C/g, *kernel]`` blocked along the input channels (``axis=1``,
  ``conv_block_size`` channels per scale at each kernel position) where that makes two blocks or
  more and beats per-channel scales by ``conv_block_min_gain`` dB of weight SQNR, else per output
  channel (depthwise, small fan-in, Gaussian-like weights; ``_qconv``). ORT keeps a Conv's
  DequantizeLinear as its own node before a float Conv either way. ``format=matmulnbits`` writes the contrib op
  directly (no opset upgrade; fp32 compute, while ORT's fused DQ->MatMul quantizes activations
  to int8 at its default ``accuracy_level`` 4).
The model's opset is raised by onnx's version converter when needed, verified with ORT first.
float16 MatMul/Gemm/Conv weights (half exports) get float16 scales, so their DequantizeLinear gives
float16 (opset 19), float16 embedding tables float16 rows; recurrent and ConvTranspose weights are
taken in float32 only.
Weights computed from constants (Transpose of a weight, torch's per-gate Slice/Concat of LSTM
weights) are folded first, so that they are constants to quantize (``_qgraph.fold_weight_chains``).

When the all-quantized model misses the budget the runner will hold the pass to (plus ``margin``)
on a few calibration rows at ORT's default level, a sensitivity search (``_qsearch``, shared with
quantize-static) ranks layers by what quantizing each alone costs the output and keeps the fewest
most harmful ones in float (``search=false``: quantize every candidate). At 4 bits those layers
get 8-bit per-channel weights instead (``fallback-bits=8``, mixed precision): EfficientNet-Lite0's
classifier (1280x1000, a quarter of its weights) misses the 4-bit budget from 28 calibration
images, and float kept it at 5 MB where 8 bits take 1.3 MB at ~40 dB.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import Counter
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.activations import capture
from graphopt.edit import NameSet, add_initializer, constant_array, drop_if_unused, is_onnx_op, onnx_opset
from graphopt.errors import UsageError
from graphopt.layers import Kind, LinearLayer, linear_layers
from graphopt.metrics import Tolerance
from graphopt.passbase import GraphPass, PassResult, option
from graphopt.registry import register
from graphopt.passes import _biascorr
from graphopt.passes._gptq import gptq
from graphopt.passes._qgraph import add_dequantize, add_node, fold_transposed_weights, fold_weight_chains, is_quantized, matches, ort_qdq_gap, share_initializers, upgrade_opset
from graphopt.passes._qmath import QuantizedWeight, pack_matmulnbits, qtype, quantize_weight, sqnr_db
from graphopt.passes._qsearch import RANK_ROWS, SEARCH_ROWS, Search, keep_float_search, search_goal, search_rows, note_search
from graphopt.passes._gptq import Inputs
from graphopt.passes._qconv import ConvInputs, conv_block, conv_calibration
from graphopt.passes._qdynamic import gather_rows_first
from graphopt.verify import OrtFailure

logger = logging.getLogger(__name__)

HALF_SCALE_OPSET = 19
"""DequantizeLinear takes float16 scales (and gives float16 outputs) since opset 19: float16 weights need it."""

TOLERANCE_4BIT = Tolerance(min_sqnr_db=15.0, min_cosine=0.99)
"""Default budget at 4 bits (int8 has the class ``tolerance``); see benchmarks/results/quantize.md."""


@register
@dataclasses.dataclass
class QuantizeWeights(GraphPass):
    """Store constant MatMul/Gemm/Conv weights as int8 (per channel) or int4 (blocked) initializers read through DequantizeLinear.

    Default budget: SQNR >= 30 dB and cosine >= 0.999 at 8 bits; 15 dB / 0.99 at 4 bits (checked at
    ORT's default level, where 4-bit DQ->MatMul runs as MatMulNBits with int8 activations).
    A model that already holds Q/DQ or quantized ops is left alone.
    """

    name = "quantize-weights"
    lossless = False
    uses_data = True
    tolerance = Tolerance(min_sqnr_db=30.0, min_cosine=0.999)

    bits: int = option(8, "weight bits: 8 or 4")
    per_channel: bool = option(True, "8 bits: one scale per output channel (opset 13) instead of one per tensor")
    symmetric: bool = option(True, "zero point at the middle of the range (no zero-point arithmetic) instead of min/max")
    signed: bool = option(True, "int8/int4 weights (false: uint8/uint4)")
    block_size: int = option(128, "4 bits (or blocked 8 bits): weights per scale along the reduction axis (power of 2, >= 16)")
    blocked: bool = option(False, "8 bits: scales per block of the reduction axis like 4 bits (opset 21; ORT runs MatMul ones as MatMulNBits)")
    format: Literal["qdq", "matmulnbits"] = option("qdq", "4 bits: DequantizeLinear (standard ONNX) or com.microsoft MatMulNBits")
    conv_block_size: int = option(32, "4 bits (or blocked 8 bits): Conv scales per this many input channels at each kernel position where that makes >= 2 blocks (0: per output channel)")
    conv_block_min_gain: float = option(3.0, "Conv blocks only where they raise the weight's SQNR by this many dB over per-output-channel scales (Gaussian weights gain ~2 dB at 32)")
    rounding: Literal["nearest", "mse", "gptq"] = option("nearest", "round to nearest; mse: per-group range search; gptq: error feedback on calibration data (MatMul/Gemm/Conv)")
    gather: bool = option(True, "also quantize constant Gather tables (embeddings), one scale per row (8 bits: rows gathered before they are converted)")
    ops: list[str] = option(["MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN"], "op types whose constant weights are quantized (LSTM/GRU/RNN: W and R)")
    exclude: list[str] = option([], "fnmatch patterns (node name, op type, output or weight name) left in float")
    min_elements: int = option(256, "leave weights with fewer elements in float (small first layers are the sensitive ones), and any whose quantized form would not be smaller")
    min_fan_in: int = option(32, "4 bits: convs whose output channels each sum fewer weights than this get fallback-bits (depthwise 3x3/5x5, RGB stems: a tiny share of bytes, ruined by 15 levels)")
    per_channel_min_gain: float = option(1.0, "8 bits: per-tensor scale where per-channel scales raise the weight's SQNR by less than this many dB (0: always per channel)")
    search: bool = option(True, "when the all-quantized model misses the budget, keep the most harmful layers in float until it meets it (with margin)")
    cheap_float_share: float = option(0.001, "within budget too, keep back (float; 8 bits at 4) the layers whose weights are at most this share of all and that alone gain >= 1 dB output SQNR (0: off)")
    fallback_bits: int = option(8, "4 bits: the layers the search keeps from 4 bits get 8-bit per-channel weights (float where the budget needs more; 0: always float)")
    target_sqnr: float | None = option(None, "SQNR (dB, calibration rows, deploy level) the search aims at instead of the budget's plus margin")
    margin: float = option(1.0, "head room (dB) over the budget the search keeps, for samples other than the calibration ones")
    search_seconds: float = option(120.0, "time limit of the search's per-layer ranking; layers it has not reached rank as harmless")
    bias_correction: bool = option(True, "subtract each quantized layer's mean output shift on the calibration data from its bias (_biascorr)")

    def default_tolerance(self) -> Tolerance:
        return self.tolerance if self.bits == 8 else TOLERANCE_4BIT

    def call(self, model: ir.Model) -> PassResult:
        self._check_options()
        stats: Counter[str] = Counter()
        if is_quantized(model):
            return PassResult(model, modified=False, stats={"already_quantized": 1})
        stats["folded_weight_chain_nodes"] = fold_weight_chains(model, self.ops + ["Gather"] * self.gather)
        stats["folded_transpose"] = fold_transposed_weights(model, NameSet(model), [op for op in self.ops if op in ("MatMul", "Gemm")])
        candidates = self._candidates(model, stats)
        if self._fallback() is None and all(self._why_not_4bit(c) for c in candidates):  # nothing would change but the opset
            stats.update(_not_4bit_stat(c) for c in candidates)
            candidates = []
        if not candidates:
            return self._result(model, stats, [])
        need = max(self._opset_needed(), HALF_SCALE_OPSET if any(map(_needs_half_scales, candidates)) else 0)
        per_tensor = False
        if onnx_opset(model) < need:
            why = upgrade_opset(model, need, self.calibration.samples if self.calibration else None)
            if why and self.bits == 8 and self.per_channel and onnx_opset(model) >= 10:
                per_tensor = True  # per-tensor DequantizeLinear exists since opset 10
                stats["per_tensor_fallback"] += 1
                logger.warning("%s: %s; falling back to per-tensor scales", self.name, why)
            elif why:
                logger.warning("%s: %s; nothing quantized", self.name, why)
                stats["skipped_opset"] += len(candidates)
                return self._result(model, stats, [])
            else:
                stats["opset_upgraded_to"] = need
            candidates = self._candidates(model, Counter())  # the graph was rebuilt
            if onnx_opset(model) < HALF_SCALE_OPSET:  # the per-tensor fallback: float16 weights have no DequantizeLinear here
                stats["skipped_half_opset"] = sum(map(_needs_half_scales, candidates))
                candidates = [c for c in candidates if not _needs_half_scales(c)]
        if self.format == "qdq" or self.bits == 8:
            layout = "blocked" if self.bits == 4 or self.blocked else ("tensor" if per_tensor or not self.per_channel else "axis")
            why, best = ort_qdq_gap(onnx_opset(model), qtype(self.bits, self.signed).dtype, layout=layout)
            if why:
                logger.warning("%s: %s; nothing quantized", self.name, why)
                stats["skipped_ort_opset"] += len(candidates)
                stats["ort_qdq_max_opset"] = best
                return self._result(model, stats, [])
        activations = self._activations(model, candidates)
        means = _biascorr.input_means(model, [c for c in candidates if c.tensor.dtype == ir.DataType.FLOAT], self.calibration.samples) if self.bias_correction and self.calibration else None
        stats["bias_correction_no_calibration"] = int(self.bias_correction and not self.calibration)
        groups = _weight_groups(candidates)
        found: Search | None = None
        budget = self.budget(self.default_budget)  # what the runner holds this pass to
        quantizer = self
        if self.search and budget.is_set():
            found = self._search(model, groups, per_tensor, activations, budget, stats, means)
            if found is not None and not found.met:
                logger.info("%s: the budget needs layers beyond 8 bits; searching again with float as the fallback", self.name)
                quantizer = copy.copy(self)
                quantizer.fallback_bits = 0
                stats["fallback_float"] = 1
                found = quantizer._search(model, groups, per_tensor, activations, budget, stats, means)
        keep = {k for k, g in enumerate(groups) if found is not None and g in found.keep}
        layers = quantizer._quantize_all(model, candidates, keep, per_tensor, activations, stats, means)
        if found is not None:
            for k, record in enumerate(layers):
                if groups[k] in found.alone:
                    record["alone_sqnr_db"] = round(found.alone[groups[k]], 2)
                if k in keep:
                    why = f"alone the output's SQNR is {found.alone[groups[k]]:.1f} dB" if groups[k] in found.alone else "not ranked in time"
                    if groups[k] in found.cheap:
                        why = f"cheap: kept back it gains {found.cheap[groups[k]]:.1f} dB"
                    record.update(reason=f"sensitivity at {self.bits} bits: {why}")
            stats["kept_cheap"] = len(found.cheap)
        return self._result(model, stats, layers)

    def _quantize_all(self, model: ir.Model, candidates: list[LinearLayer], keep: set[int], per_tensor: bool,
                      activations: dict[str, list[np.ndarray]], stats: Counter[str], means: dict | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Quantize every candidate; those at the positions in ``keep`` at :meth:`_fallback`'s bits, or left in float."""
        names = NameSet(model)
        layers: list[dict[str, Any]] = []
        made: list[ir.Value] = []
        fallback = self._fallback()
        for k, layer in enumerate(candidates):
            quantizer = self
            why = self._why_not_4bit(layer) if k not in keep else ""  # set: the layer takes the fallback whatever the search says
            if k in keep or why:
                if fallback is None:
                    w = layer.tensor
                    layers.append({"name": layer.name, "op": layer.node.op_type, "shape": list(w.shape), "bits": 32, "bytes_before": int(w.size * 4), "choice": "float"}
                                  | ({"reason": why} if why else {}))
                    stats[_not_4bit_stat(layer) if why else "kept_float_sensitivity"] += 1
                    continue
                quantizer = fallback
                stats[f"{_not_4bit_stat(layer)}_{fallback.bits}bit" if why else f"kept_{fallback.bits}bit_sensitivity"] += 1
            record = quantizer._quantize(layer, names, per_tensor, activations.get(layer.node.inputs[0].name if layer.kind != "matmul-left" else ""), made, means)
            if why:
                record["reason"] = f"{why}: {quantizer.bits} bits"
            stats[record["choice"]] += 1
            if "bias_correction" in record:
                stats["bias_corrected" if record["bias_correction"] == "applied" else "bias_uncorrected_" + record["bias_correction"]] += 1
            if record.get("scales") == "per-tensor":
                stats["per_tensor_scale"] += 1
            layers.append(record)
        for graph in {id(v.graph): v.graph for v in made if v.graph is not None}.values():
            stats["shared_initializers"] += share_initializers(graph, [v for v in made if v.graph is graph])
        return layers

    def _why_not_4bit(self, layer: LinearLayer) -> str:
        """Why a layer takes the fallback bits (or stays float) at bits=4, or "": a Conv or ConvTranspose
        too narrow for 4 bits (``min-fan-in``), or an embedding table (int8 rows are gathered before
        they are converted; an int4 table would be converted whole on every run)."""
        if self.bits != 4:
            return ""
        if layer.kind == "gather":
            return "embedding table"
        if layer.kind not in ("conv", "convtranspose"):
            return ""
        groups = layer.node.attributes.get_int("group", 1) if layer.kind == "convtranspose" else 1  # a Conv's W already holds C/g
        fan_in = int(np.prod(layer.shape)) // (layer.shape[layer.output_axis] * groups)
        return f"fan-in {fan_in} < min-fan-in {self.min_fan_in}" if fan_in < self.min_fan_in else ""

    def _fallback(self) -> QuantizeWeights | None:
        """This pass at ``fallback_bits`` (8-bit per-channel, DequantizeLinear) for the layers the
        search keeps from 4 bits, or None (they stay float)."""
        if self.bits != 4 or self.fallback_bits != 8:
            return None
        fallback = copy.copy(self)
        fallback.bits, fallback.blocked, fallback.format, fallback.per_channel = 8, False, "qdq", True
        return fallback

    def _search(self, model: ir.Model, groups: list[int], per_tensor: bool, activations: dict[str, list[np.ndarray]], budget: Tolerance, stats: Counter[str],
                means: dict | None = None) -> Search | None:  # fmt: skip
        """Layers (keys: first candidate position of each weight) kept in float so the model meets the
        budget plus ``margin`` on a few calibration rows (``_qsearch.keep_float_search``)."""
        samples = list(self.calibration.samples) if self.calibration else None
        if not samples:
            from graphopt.data import generate

            samples = generate(model, samples=1, seed=1)
            stats["generated_calibration"] = len(samples)

        def build(keep: set[int] | None) -> tuple[ir.Model, None]:
            if keep is None:
                return model, None
            m = model.clone()
            self._quantize_all(m, self._candidates(m, Counter()), {k for k, g in enumerate(groups) if g in keep}, per_tensor, activations, Counter(), means)
            return m, None

        first = self._candidates(model, Counter())  # the same list in the same order: build relies on it
        keys = sorted(g for g in set(groups) if not self._why_not_4bit(first[g]))  # those never take 4 bits
        weights = {g: int(np.prod(first[g].shape)) for g in keys}
        check = search_rows(samples, SEARCH_ROWS, model)
        rank = search_rows(samples, RANK_ROWS, model)
        target, task = search_goal(budget, self.calibration, self.margin, self.target_sqnr, self.default_tolerance(), stats)
        try:
            found = keep_float_search(build, keys, rank, check, target, self.search_seconds, weights, self.name, task, kept_exact=self._fallback() is None, cheap_share=self.cheap_float_share)
        except OrtFailure as e:
            logger.warning("%s: no search, onnxruntime cannot run the candidates: %s", self.name, e)
            stats["search_skipped_ort_failure"] = 1
            return None
        note_search(found, stats, "all_quantized")
        if found.keep:
            logger.info("%s: kept %d of %d layers in float to meet %s%s", self.name, len(found.keep), len(keys), target, "" if task is None else f" and an accuracy drop <= {task.max_drop:g} points")
        return found

    def _check_options(self) -> None:
        if self.bits not in (4, 8):
            raise UsageError(f"quantize-weights: bits={self.bits}: use 8 or 4")
        if (self.bits == 4 or self.blocked) and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise UsageError(f"quantize-weights: block-size={self.block_size}: use a power of 2 >= 16")
        if self.format == "matmulnbits" and self.bits != 4:
            raise UsageError("quantize-weights: format=matmulnbits needs bits=4")
        if self.fallback_bits not in (0, 8):
            raise UsageError(f"quantize-weights: fallback-bits={self.fallback_bits}: use 8 or 0 (float)")
        if self.conv_block_size < 0:
            raise UsageError(f"quantize-weights: conv-block-size={self.conv_block_size}: use 0 (per output channel) or a block size")

    def _opset_needed(self) -> int:
        if self.bits == 4:
            return 10 if self.format == "matmulnbits" else 21
        if self.blocked:
            return 21
        return 13 if self.per_channel else 10

    def _result(self, model: ir.Model, stats: Counter[str], layers: list[dict[str, Any]]) -> PassResult:
        stats = Counter({k: v for k, v in stats.items() if v})
        modified = bool(stats["quantized"] or stats["folded_weight_chain_nodes"] or stats["folded_transpose"] or stats["opset_upgraded_to"])
        logger.debug("%s: %s", self.name, dict(stats))
        return PassResult(model, modified=modified, stats=dict(stats), layers=layers)

    def _candidates(self, model: ir.Model, stats: Counter[str]) -> list[LinearLayer]:
        out = []
        ops = [op for op in self.ops if op in ("MatMul", "Gemm", "Conv")]
        by_weight: dict[int, list[LinearLayer]] = {}
        for layer in linear_layers(model, ops, float_only=False):
            if layer.tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or (layer.tensor.dtype == ir.DataType.FLOAT16 and self.format == "matmulnbits"):
                stats["skipped_dtype"] += 1
            elif matches(layer.node, self.exclude, layer.weight):
                stats["excluded"] += 1
            elif int(np.prod(layer.shape)) < self.min_elements:
                stats["too_small"] += 1
            elif not self._saves_bytes(layer):
                stats["not_smaller"] += 1
            elif layer.weight.is_graph_output() or layer.weight.is_graph_input():
                stats["skipped_shared"] += 1
            else:
                by_weight.setdefault(id(layer.weight), []).append(layer)
        for group in by_weight.values():
            if len(group) != len(group[0].weight.uses()):  # some reader is not a quantizable layer
                stats["skipped_shared"] += len(group)
            else:
                out.extend(group)
        if self.gather:
            out.extend(_gather_tables(model, self.exclude, self.min_elements))
        out.extend(_other_weights(model, [op for op in self.ops if op in OTHER_KINDS], self.exclude, self.min_elements))
        return out

    def _saves_bytes(self, layer: LinearLayer) -> bool:
        """Would the quantized weight, its scales and a DequantizeLinear node take fewer bytes than the float weight?"""
        n = int(np.prod(layer.shape))
        groups = n // self.block_size if (self.bits == 4 or self.blocked) else layer.shape[layer.output_axis]
        if layer.kind == "conv" and (self.bits == 4 or self.blocked):
            block = conv_block(layer.shape[1], self.conv_block_size)
            groups = n // layer.shape[1] * -(-layer.shape[1] // block) if block else layer.shape[0]
        name = len(layer.weight.name or "w")
        overhead = 3 * name + 60 + 4 * max(groups, 1)  # names (+_q, _s, _dq), node and tensor headers, scales
        return n * self.bits // 8 + overhead < n * layer.tensor.dtype.itemsize

    def _activations(self, model: ir.Model, layers: list[LinearLayer]) -> dict[str, list[np.ndarray]]:
        """GPTQ's data by input name: MatMul/Gemm input activations, or for a Conv input a
        ``_qconv.ConvInputs`` (per reading Conv: its im2col Hessians, and its GPTQ result once made)."""
        if self.rounding != "gptq" or self.calibration is None:
            return {}
        wanted = sorted({layer.node.inputs[0].name for layer in layers if layer.kind in ("matmul", "gemm") and layer.node.graph is model.graph})
        out: dict[str, Any] = {name: Inputs(arrays) for name, arrays in capture(model, self.calibration.samples, wanted).items()}
        for name, convs in conv_calibration(model, layers, self.calibration.samples).items():
            out.setdefault(name, convs)  # a tensor read by a MatMul too: its Convs get plain rounding
        return out

    def _quantize(self, layer: LinearLayer, names: NameSet, per_tensor: bool, acts: list[np.ndarray] | None, made: list[ir.Value], means: dict | None = None) -> dict[str, Any]:
        node, w = layer.node, layer.tensor.numpy()
        record: dict[str, Any] = {"name": layer.name, "op": node.op_type, "shape": list(w.shape), "bits": self.bits}
        if layer.kind == "gemm" and (self.bits == 4 or self.blocked) and node.attributes.get_int("transA", 0) == 0:
            if (converted := _gemm_to_matmul(layer, names, self.name)) is not None:
                layer = converted
                node, w = layer.node, layer.tensor.numpy()
                record["rewritten"] = "Gemm->MatMul"
        signed = self.signed and self.format != "matmulnbits"
        qt = qtype(self.bits, signed)
        axis, block = self._layout(layer, per_tensor)
        if layer.kind in ("conv", "convtranspose") and block and self.conv_block_min_gain > 0:  # blocks cost a scale per 32 weights: only where they pay
            blocked, channel = (min(sqnr_db(w, quantize_weight(w, qt, axis=a, block_size=b).dequantized()), 300.0) for a, b in ((axis, block), (layer.output_axis, 0)))
            gain = blocked - channel
            record["block_gain_db"] = round(min(gain, 300.0), 2)
            if gain < self.conv_block_min_gain:
                axis, block = layer.output_axis, 0
        search = self.rounding in ("mse", "gptq")
        conv = acts.get(node.outputs[0].name) if isinstance(acts, ConvInputs) and layer.kind == "conv" and axis is not None else None
        if conv is not None:  # per group on im2col Hessians; made once per run, the search's clones reuse it
            qw, choice = conv.gptq(w, qt, block_size=block, symmetric=self.symmetric)
            record.update(choice)
        elif self.rounding == "gptq" and acts is not None and layer.kind in ("matmul", "gemm") and (block or axis == layer.output_axis):
            done = getattr(acts, "done", {})  # the search rebuilds clones: one GPTQ per weight and run
            key = (layer.weight.name, axis, block, qt.name)
            if key not in done:
                fitted, choice = gptq(layer.matrix().T, acts, qt, block_size=block, symmetric=self.symmetric, search=True)
                done[key] = _from_nk(fitted, layer), choice
            qw, choice = done[key]
            record.update(choice)
        else:
            qw = quantize_weight(w, qt, axis=axis, block_size=block, symmetric=self.symmetric, search=search)
            record["rounding"] = "mse" if search else "nearest"
            if axis is not None and not block and layer.kind != "gather" and self.per_channel_min_gain > 0:
                one = quantize_weight(w, qt, axis=None, symmetric=self.symmetric, search=search)
                gain = min(sqnr_db(w, qw.dequantized()), 300.0) - min(sqnr_db(w, one.dequantized()), 300.0)  # both exact: no gain
                record["per_channel_gain_db"] = round(gain, 2)
                if gain < self.per_channel_min_gain:
                    qw, axis = one, None
        if w.dtype == np.float16:  # a half model's DequantizeLinear has half scales (opset 19): the codes stay, the scales round by 2^-11
            qw = dataclasses.replace(qw, scale=qw.scale.astype(np.float16))
        record["scales"] = "per-tensor" if qw.scale.ndim == 0 or axis is None else ("blocked" if block else "per-channel")
        record.update(axis=axis, block_size=block, type=qt.name, weight_sqnr_db=round(sqnr_db(w, qw.dequantized()), 2))
        if means is not None and layer.kind not in ("gather", "recurrent", "convtranspose") and w.dtype == np.float32:
            record.update(_biascorr.correct_bias(layer, w, qw.dequantized(), _biascorr.lookup(means, layer), names))
        graph = node.graph
        assert graph is not None
        old = layer.weight
        base = old.name or "w"
        if self.format == "matmulnbits" and layer.kind == "matmul" and block and axis == 0:
            _to_matmulnbits(layer, qw, names, self.name)
            record["format"] = "MatMulNBits"
        elif layer.kind == "gather" and qw.qt.dtype == ir.DataType.INT8 and not np.any(qw.zero_point):
            gather_rows_first(graph, node, qw, names, self.name)  # DequantizeLinear first would convert the whole table per run
            record["format"] = "Gather rows, then Cast/Mul"
        else:
            dq = add_dequantize(graph, node, qw, base, names, self.name)
            node.replace_input_with(layer.weight_index, dq)
            made.extend(v for v in dq.producer().inputs[1:] if v is not None)
            record["format"] = "DequantizeLinear"
        drop_if_unused(old)
        record["bytes_before"], record["bytes_after"], record["scale_bytes"] = int(w.size * 4), _bytes(qw), int(qw.scale.size * 4)
        record["choice"] = "quantized"
        return record

    def _layout(self, layer: LinearLayer, per_tensor: bool) -> tuple[int | None, int]:
        """(axis, block_size) of the scales for this layer's stored weight."""
        if layer.kind == "gather":
            return 0, 0
        if self.bits == 8 and not self.blocked:
            return (None, 0) if per_tensor or not self.per_channel else (layer.output_axis, 0)
        if layer.kind in ("conv", "convtranspose"):  # blocks of input channels at each kernel position, or per output channel
            in_axis = 1 if layer.kind == "conv" else 0  # Conv W[O, C/g, *k]; ConvTranspose W[C, O/g, *k]
            block = conv_block(layer.shape[in_axis], self.conv_block_size)
            return (in_axis, block) if block else (layer.output_axis, 0)
        return layer.reduction_axes[0], self.block_size


def _weight_groups(candidates: list[LinearLayer]) -> list[int]:
    """Per candidate, the position of the first candidate reading the same weight: layers sharing a
    weight stay in float or get quantized together."""
    first: dict[int, int] = {}
    return [first.setdefault(id(layer.weight), k) for k, layer in enumerate(candidates)]


def _bytes(qw: QuantizedWeight) -> int:
    zero_points = 0 if qw.qt.signed and not np.any(np.asarray(qw.zero_point)) else qw.zero_point.size  # add_dequantize leaves 0s out
    return (qw.q.size * qw.qt.bits + 7) // 8 + qw.scale.size * 4 + (zero_points * qw.qt.bits + 7) // 8


def _from_nk(g: QuantizedWeight, layer: LinearLayer) -> QuantizedWeight:
    """A GPTQ result in ``[N, K]`` layout (axis 0 per-channel, axis 1 blocked) in the layer's stored layout."""
    if layer.output_axis == 0:
        return g
    axis = 0 if g.block_size else 1
    return QuantizedWeight(np.ascontiguousarray(g.q.T), np.ascontiguousarray(g.scale.T), np.ascontiguousarray(g.zero_point.T), g.qt, axis, g.block_size)


def _gemm_to_matmul(layer: LinearLayer, names: NameSet, pass_name: str) -> LinearLayer | None:
    """Gemm(A, B, C) with constant B and C -> MatMul(A, alpha*B') [+ Add(beta*C)], so the weight is [K, N]."""
    node = layer.node
    graph = node.graph
    assert graph is not None
    alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
    c = node.inputs[2] if len(node.inputs) > 2 else None
    bias = constant_array(c) if c is not None else None
    if c is not None and bias is None:
        return None
    dtype = layer.matrix().dtype  # float32, or float16 in a half model
    weight = add_initializer(graph, (layer.matrix() * np.float32(alpha)).astype(dtype), (layer.weight.name or "w") + "_kn", names)
    out = node.outputs[0]
    elem = ir.DataType.FLOAT16 if dtype == np.float16 else ir.DataType.FLOAT
    y = add_node(graph, node, "MatMul", [node.inputs[0], weight], {}, (out.name or "y") + "_matmul", names, pass_name, dtype=elem)
    matmul = y.producer()
    assert matmul is not None
    if bias is not None:
        b = add_initializer(graph, (bias * np.float32(beta)).astype(dtype), (c.name or "b") + "_bias", names)
        y = add_node(graph, node, "Add", [y, b], {}, (out.name or "y") + "_bias", names, pass_name, dtype=elem)
    old_weight, old_bias = layer.weight, c
    _take_over(out, y)
    graph.remove(node, safe=True)
    drop_if_unused(old_weight)
    if old_bias is not None:
        drop_if_unused(old_bias)
    return LinearLayer(matmul, "matmul", 1)


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` everywhere, keeping ``old``'s name, shape and type (graph outputs included)."""
    name, shape, type_ = old.name, old.shape, old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name, new.shape, new.type = name, shape, type_


def _to_matmulnbits(layer: LinearLayer, qw: QuantizedWeight, names: NameSet, pass_name: str) -> None:
    node = layer.node
    graph = node.graph
    assert graph is not None
    k, n = qw.q.shape
    packed, scales, zp = pack_matmulnbits(qw)
    base = layer.weight.name or "w"
    inputs = [node.inputs[0], add_initializer(graph, packed, base + "_q4", names), add_initializer(graph, scales, base + "_scales", names)]
    if np.any(np.asarray(qw.zero_point) != 8):
        inputs.append(add_initializer(graph, zp, base + "_zero_points", names))
    attrs = {"K": k, "N": n, "bits": 4, "block_size": qw.block_size}
    y = add_node(graph, node, "MatMulNBits", inputs, attrs, (node.outputs[0].name or "y") + "_nbits", names, pass_name, domain="com.microsoft")
    if "com.microsoft" not in graph.opset_imports:
        graph.opset_imports["com.microsoft"] = 1
    _take_over(node.outputs[0], y)
    graph.remove(node, safe=True)


OTHER_KINDS: dict[str, Kind] = {"LSTM": "recurrent", "GRU": "recurrent", "RNN": "recurrent", "ConvTranspose": "convtranspose"}
"""Ops whose weights only this pass quantizes (weight-only: onnxruntime dequantizes them and runs
the float op), as layers of these kinds: LSTM/GRU/RNN W and R (``[directions, gates x hidden, K]``:
one scale per gate row, axis 1, at 8 bits; blocks along axis 2 at 4) and ConvTranspose weights
(``[Cin, Cout/group, *kernel]``: one scale per output channel, axis 1; at 4 bits blocks of
``conv-block-size`` input channels along axis 0 where that gains, as for Conv)."""


def quantize_weight_only(model: ir.Model, ops: list[str], exclude: list[str], per_channel: bool, tag: str, stats: Counter[str]) -> list[dict[str, Any]]:
    """The float weights of the :data:`OTHER_KINDS` ops in ``ops`` to int8, round to nearest, as this
    pass does them at bits=8: for a pass that leaves these ops in float between its Q/DQ pairs."""
    quantizer = QuantizeWeights(ops=list(ops), exclude=list(exclude), search=False, cheap_float_share=0.0, bias_correction=False)
    quantizer.name = tag  # the nodes made are tagged with the pass that asked for them
    layers = [layer for layer in _other_weights(model, ops, exclude, quantizer.min_elements) if quantizer._saves_bytes(layer)]
    return quantizer._quantize_all(model, layers, set(), not per_channel, {}, stats)


def _needs_half_scales(layer: LinearLayer) -> bool:
    """A float16 weight read through DequantizeLinear, whose float16 scales need opset 19 (a float16
    table's rows are converted by Cast/Mul, at any opset)."""
    return layer.tensor.dtype == ir.DataType.FLOAT16 and layer.kind != "gather"


def _not_4bit_stat(layer: LinearLayer) -> str:
    return "small_fan_in" if layer.kind in ("conv", "convtranspose") else layer.kind


def _other_weights(model: ir.Model, ops: list[str], exclude: list[str], min_elements: int) -> list[LinearLayer]:
    """The constant float32 weights of the :data:`OTHER_KINDS` ops, each read by its node alone."""
    out = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        op = next((op for op in ops if is_onnx_op(node, op)), None)
        if op is None:
            continue
        kind = OTHER_KINDS[op]
        for index in (1, 2) if kind == "recurrent" else (1,):
            w = _own_float_weight(node, index, exclude, min_elements)
            if w is not None and (w.ndim == 3 if kind == "recurrent" else w.ndim >= 3):
                out.append(LinearLayer(node, kind, index))
    return out


def _gather_tables(model: ir.Model, exclude: list[str], min_elements: int) -> list[LinearLayer]:
    """Gather(constant 2-D float table, indices) along axis 0, seen as a layer of kind "gather"."""
    out = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not is_onnx_op(node, "Gather") or node.attributes.get_int("axis", 0) != 0:
            continue
        table = _own_float_weight(node, 0, exclude, min_elements, half=True)
        if table is not None and table.ndim == 2:
            out.append(LinearLayer(node, "gather", 0))
    return out


def _own_float_weight(node: ir.Node, index: int, exclude: list[str], min_elements: int, half: bool = False) -> np.ndarray | None:
    """Input ``index`` of ``node`` when it is a float32 (or with ``half``, float16) constant of at least
    ``min_elements`` that this pass may rewrite: read by ``node`` alone, not a graph output, not excluded."""
    w = node.inputs[index] if len(node.inputs) > index else None
    array = constant_array(w) if w is not None else None
    if array is None or array.dtype not in ((np.float32, np.float16) if half else (np.float32,)) or array.size < min_elements:
        return None
    if matches(node, exclude, w) or len(w.uses()) != 1 or w.is_graph_output():
        return None
    return array
