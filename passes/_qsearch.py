"""The searches that decide which layers stay in float: the sensitivity one (quantize-static,
-weights and -dynamic) and quantize-static's latency one.

- sensitivity: when the all-int8 model misses the budget, quantize each compute node alone, rank by
  the output SQNR that costs, and bisect on how many of the most harmful to keep in float; the
  budget is the pass's output criteria plus a margin on a few calibration rows and, when the
  calibration data has labels, its task-accuracy criterion on all of them (``search_goal``);
- latency: time each weighted layer (Conv/MatMul/Gemm) in float and as its int8 QDQ pattern with
  onnxruntime on this machine (ORT's default level, 1 thread, interleaved medians) and keep in
  float those where int8 is not faster.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.data import Sample, batch_rows, dynamic_batch, sample_rows
from graphopt.errors import UsageError
from graphopt.layers import as_linear_layer
from graphopt.metrics import OutputError, Tolerance, compare_outputs, task_accuracy, worst
from graphopt.passbase import Calibration
from graphopt.passes._qmath import QType
from graphopt.passes._qstatic import WEIGHTED, Plan, apply_plan
from graphopt.progress import track
from graphopt.verify import make_session, run

Build = Callable[[set[int] | None], tuple[ir.Model, Any]]
"""``build(keep)``: the model with every node but ``keep`` quantized, and anything else (ignored here)."""
logger = logging.getLogger(__name__)


def output_sqnr(model: ir.Model, samples: Sequence[Sample], reference: list[dict[str, np.ndarray]]) -> float:
    """Worst-output SQNR at ORT's default level against the float reference."""
    got = run(model, samples, "deploy")
    w = worst(compare_outputs(reference, got))
    return w.sqnr_db if w is not None else float("inf")


def tightened(budget: Tolerance, margin_db: float, min_sqnr_db: float | None = None) -> Tolerance:
    """``budget`` with ``margin_db`` of head room on every criterion (on 1 - cosine and the abs/rel
    bounds too, as noise-power ratios), so a model that meets it on the calibration data still meets
    ``budget`` on other samples; ``min_sqnr_db`` (an explicit target) replaces the SQNR floor as is."""
    power, amplitude = 10 ** (margin_db / 10), 10 ** (margin_db / 20)
    return Tolerance(
        max_abs=None if budget.max_abs is None else budget.max_abs / amplitude,
        max_rel=None if budget.max_rel is None else budget.max_rel / amplitude,
        min_sqnr_db=min_sqnr_db if min_sqnr_db is not None else (None if budget.min_sqnr_db is None else budget.min_sqnr_db + margin_db),
        min_cosine=None if budget.min_cosine is None else 1.0 - (1.0 - budget.min_cosine) / power,
    )


@dataclasses.dataclass(frozen=True)
class TaskCheck:
    """Task accuracy a search holds its candidates to: the labelled calibration samples (all of them:
    labels follow their rows) and the points of accuracy the budget lets go."""

    samples: tuple[Sample, ...]
    labels: np.ndarray
    max_drop: float


def search_goal(budget: Tolerance, calibration: Calibration | None, margin_db: float, target_sqnr: float | None,
                fallback: Tolerance, stats: Counter[str]) -> tuple[Tolerance, TaskCheck | None]:  # fmt: skip
    """What a keep-float search aims at: ``budget``'s output criteria tightened by ``margin_db``
    (``tightened``), and its task criterion when the calibration data has labels. A task-only budget
    on unlabelled calibration data can't be checked during the search: the pass's default output
    budget (``fallback``) stands in for it (stat ``search_task_unchecked``), and the runner still
    judges the task budget on the verification data."""
    task = None
    if budget.max_accuracy_drop is not None:
        if calibration is not None and calibration.labels is not None:
            task = TaskCheck(tuple(dict(s) for s in calibration.samples), np.asarray(calibration.labels), budget.max_accuracy_drop)
            stats["search_task_samples"] = len(task.samples)
        else:
            stats["search_task_unchecked"] = 1
            if budget == budget.without_output_criteria():
                budget = fallback.merged(budget)
    return tightened(budget, margin_db, target_sqnr), task


@dataclasses.dataclass
class Search:
    keep: set[int]  # node indices kept in float
    alone: dict[int, float]  # worst-output SQNR with only that node quantized (ranking samples)
    full: OutputError | None  # worst output of the all-int8 model
    reached: OutputError | None  # worst output of the chosen model (None: all float, not run)
    runs: int = 0
    unranked: int = 0  # nodes the ranking did not reach in time
    order: str = ""  # which ranking won: "harm", or "weightless first" when that keeps fewer weights float
    accuracy_drop: float | None = None  # task accuracy points the chosen model loses on the labelled calibration data
    met: bool = True  # False: even with every node kept the target was missed (only when kept nodes are not exact)
    cheap: dict[int, float] = dataclasses.field(default_factory=dict)  # kept within budget (``cheap_share``): node -> output SQNR gained (dB)


def note_search(found: Search, stats: Counter[str], full: str = "all_int8") -> None:
    """The search's figures in a pass's stats: runs, unranked nodes, SQNR (centi-dB) of the fully
    quantized model (``full``) and of the one chosen."""
    stats["search_runs"] = found.runs
    stats["search_unranked"] = found.unranked
    for key, e in ((full, found.full), ("reached", found.reached)):
        if e is not None and math.isfinite(e.sqnr_db):
            stats[f"{key}_sqnr_centi_db"] = int(round(e.sqnr_db * 100))
    if found.accuracy_drop is not None:
        stats["reached_accuracy_drop_centi_points"] = int(round(found.accuracy_drop * 100))


class _Evaluator:
    """Runs candidates at ORT's deploy level against the float model: output criteria on
    ``samples``, task accuracy on the labelled ones of ``task``."""

    def __init__(self, build: Build, samples: Sequence[Sample], target: Tolerance, task: TaskCheck | None = None) -> None:
        self.build, self.samples, self.target, self.task = build, samples, target, task
        reference_model = build(None)[0]
        self.reference = run(reference_model, samples, "exact")  # type: ignore[arg-type]
        self.runs = 0
        self.drop: float | None = None  # of the last candidate run
        if task is not None:
            self.rows = batch_rows(task.samples)
            found = task_accuracy(run(reference_model, task.samples, "exact"), task.labels, self.rows)  # type: ignore[arg-type]
            if found is None:
                raise UsageError(f"the calibration labels (shape {list(task.labels.shape)}) fit no model output: a task budget needs class labels for a classifier output")
            self.reference_accuracy = found.accuracy

    def __call__(self, keep: set[int]) -> tuple[bool, OutputError | None]:
        self.runs += 1
        model = self.build(keep)[0]
        errors = compare_outputs(self.reference, run(model, self.samples, "deploy"), self.target)
        ok = not any(e.violations(self.target) for e in errors)
        if self.task is not None:
            got = task_accuracy(run(model, self.task.samples, "deploy"), self.task.labels, self.rows)
            self.drop = 100.0 * (self.reference_accuracy - (got.accuracy if got else 0.0))
            ok = ok and self.drop <= self.task.max_drop
        return ok, worst(errors)


def keep_float_search(
    build: Build, compute: list[int], rank_samples: Sequence[Sample], check_samples: Sequence[Sample], target: Tolerance,
    seconds: float = float("inf"), weights: dict[int, int] | None = None, label: str = "quantize-static", task: TaskCheck | None = None,
    kept_exact: bool = True, cheap_share: float = 0.0, pairs: Sequence[tuple[int, int]] = (),
) -> Search:
    """The fewest compute nodes to keep in float for the model to meet ``target`` at ORT's deploy level.

    ``build(keep)`` returns the model with every node of ``compute`` but ``keep`` quantized
    (``build(None)``: the float model). All-int8 first; when that misses, each node is quantized
    alone on ``rank_samples`` (a few rows: the cost is mostly session creation) and ranked by the
    output SQNR that costs; the shortest prefix of that ranking (most harmful first) kept in float
    that meets the target on ``check_samples`` is found by bisection, then each kept node is tried
    back in int8 (least harmful first, a few tries), since the ranking ignores interactions.
    With ``weights`` (weight elements per node, 0 for Add/Mul/...), a second order puts weightless
    nodes first (they cost no size in float) and the result keeping fewer weights in float wins.
    Nodes the ranking has not reached after ``seconds`` rank as harmless (last). ``compute`` holds
    any stable keys ``build`` understands (node indices for quantize-static, layer indices for
    quantize-weights); ``label`` names the pass in logs and on the progress bar. With ``task``, a
    candidate must also keep task accuracy on the labelled calibration data (``search_goal``); the
    ranking stays by output SQNR, a finer signal than accuracy on a few samples. ``kept_exact``
    false: a kept node is not float but a finer quantization (quantize-weights' 4-bit search keeps
    layers at 8 bits), so keeping every node may miss too; that case is checked (``Search.met``).
    Then, within the budget, :func:`_keep_cheap` (``cheap_share`` > 0 and ``weights``).
    """
    check = _Evaluator(build, check_samples, target, task)
    ok, full = check(set())
    if ok:
        found = _keep_cheap(check, compute, Search(set(), {}, full, full, accuracy_drop=check.drop), weights, cheap_share, label, pairs)
        return dataclasses.replace(found, runs=check.runs)
    rank = _Evaluator(build, rank_samples, target) if rank_samples is not check_samples else check
    alone: dict[int, float] = {}
    t0 = time.perf_counter()
    for n, i in enumerate(track(compute, f"{label}: sensitivity")):
        if time.perf_counter() - t0 > seconds:
            logger.warning("%s: sensitivity ranking stopped after %.0f s at %d/%d nodes; the rest rank as harmless", label, seconds, n, len(compute))
            break
        w = rank(set(compute) - {i})[1]
        alone[i] = w.sqnr_db if w is not None else float("inf")
        if (n + 1) % 16 == 0 or n + 1 == len(compute):
            logger.info("%s: sensitivity %d/%d nodes (%.0f s)", label, n + 1, len(compute), time.perf_counter() - t0)
    harm = lambda i: (alone.get(i, float("inf")), i)  # noqa: E731
    orders = {"harm": sorted(compute, key=harm)}
    if weights and any(weights.get(i, 0) == 0 for i in compute) and any(weights.get(i, 0) for i in compute):
        orders["weightless first"] = sorted(compute, key=lambda i: (weights.get(i, 0) > 0, harm(i)))
    best: tuple[int, int, str, set[int], OutputError | None, float | None, bool] | None = None
    for how, order in orders.items():
        keep, reached, drop, met = _bisect(check, order, alone, label, kept_exact)
        cost = (sum(weights.get(i, 0) for i in keep) if weights else 0, len(keep))
        logger.info("%s: %s order keeps back %d nodes (%d weight elements)", label, how, cost[1], cost[0])
        if best is None or cost < best[:2]:
            best = (*cost, how, keep, reached, drop, met)
        if not met:  # every order ends with every node kept
            break
    assert best is not None
    found = Search(best[3], alone, full, best[4], 0, len(compute) - len(alone), best[2], best[5], best[6])
    if found.met:
        found = _keep_cheap(check, compute, found, weights, cheap_share, label, pairs)
    return dataclasses.replace(found, runs=check.runs + (rank.runs if rank is not check else 0))


CHEAP_GAIN_DB = 1.0
"""Output SQNR a cheap node (or pair) must gain to be kept (:func:`_keep_cheap`)."""


def _keep_cheap(
    check: _Evaluator, compute: list[int], found: Search, weights: dict[int, int] | None, share: float, label: str, pairs: Sequence[tuple[int, int]] = ()
) -> Search:
    """Also keep the nodes whose weights are at most ``share`` of all of ``compute``'s where that
    raises the worst output's SQNR by :data:`CHEAP_GAIN_DB` over ``found``.

    Meeting the budget is not the best a few bytes can buy. In EfficientNet-Lite0 the RGB stem (864
    weights) and the first depthwise conv (288), 0.02% of the weights, are where int8 costs most:
    keeping both in float takes static int8 from 22.2 to 25.8 dB at the same file size. Most of
    that is the activation between them, which is quantized unless both are float (each alone
    gains < 0.5 dB), so the candidates are each cheap node and each of ``pairs`` (producer,
    consumer) of cheap nodes. One check per candidate; the ones that gain are kept together when
    that checks better than the best alone."""
    total = sum(weights.values()) if weights else 0
    cheap = {i for i in compute if i not in found.keep and 0 < (weights or {}).get(i, 0) <= share * total}
    if not cheap or found.reached is None or not math.isfinite(found.reached.sqnr_db):
        return found
    base = found.reached.sqnr_db
    units = [frozenset([i]) for i in sorted(cheap)] + [frozenset(p) for p in pairs if set(p) <= cheap]
    gains: dict[frozenset[int], tuple[float, OutputError, float | None]] = {}
    for unit in track(units, f"{label}: cheap layers"):
        ok, w = check(found.keep | unit)
        if ok and w is not None and w.sqnr_db - base >= CHEAP_GAIN_DB:
            gains[unit] = (w.sqnr_db - base, w, check.drop)
    if not gains:
        return found
    best = max(gains, key=lambda u: gains[u][0])
    chosen, (gain, reached, drop) = set(best), gains[best]
    union = set().union(*gains)
    if union != chosen:
        ok, w = check(found.keep | union)
        if ok and w is not None and w.sqnr_db > reached.sqnr_db:
            chosen, gain, reached, drop = union, w.sqnr_db - base, w, check.drop
    logger.info("%s: %d cheap nodes kept too (%.2f -> %.2f dB)", label, len(chosen), base, reached.sqnr_db)
    return dataclasses.replace(found, keep=found.keep | chosen, reached=reached, accuracy_drop=drop, cheap=dict.fromkeys(chosen, gain))


def _bisect(check: _Evaluator, order: list[int], alone: dict[int, float], label: str, kept_exact: bool = True) -> tuple[set[int], OutputError | None, float | None, bool]:
    """The shortest prefix of ``order`` kept in float that meets the target, then refined; with the
    chosen model's worst output and task accuracy drop (None: all float, not run, or no task), and
    whether it meets (false only without ``kept_exact``, when keeping every node misses too)."""
    lo, hi = 0, len(order)  # prefix lo misses (k=0 is the all-int8 model), prefix hi meets (all float)
    reached: OutputError | None = None
    drop: float | None = None
    if not kept_exact:  # prefix hi is not the float model: check it
        ok, reached = check(set(order))
        drop = check.drop
        if not ok:
            return set(order), reached, drop, False
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, w = check(set(order[:mid]))
        task = "" if check.drop is None else f", accuracy -{check.drop:.2f} points"
        logger.info("%s: %d of %d nodes in float -> worst SQNR %.2f dB%s (%s)", label, mid, len(order), w.sqnr_db if w else float("inf"), task, "meets" if ok else "misses")
        if ok:
            hi, reached, drop = mid, w, check.drop
        else:
            lo = mid
    keep = set(order[:hi])
    for i in sorted(keep, key=lambda i: -alone.get(i, float("inf")))[:REFINE_TRIES]:
        ok, w = check(keep - {i})
        if ok:
            keep.discard(i)
            reached, drop = w, check.drop
    return keep, reached, drop, True


REFINE_TRIES = 4
"""Kept nodes tried back in int8 after the bisection."""

SEARCH_ROWS = 32
"""The searches check the budget on the first calibration samples holding at most this many rows."""
RANK_ROWS = 4
"""Rows of the first calibration samples the per-node sensitivity ranking runs on."""


def search_rows(samples: Sequence[Sample], rows: int, model: ir.Model) -> list[Sample]:
    """The first samples, in order, holding at most ``rows`` rows in all (at least one sample).

    A sample's rows are its inputs' common first dim; it is cut to the rows left only when every
    input's first dim is dynamic in the model (else it stays whole and counts its rows, or 1 when its
    inputs disagree). Rows, not samples, bound both the cost and the evidence: a batch-1 model's
    samples are one image each, and a cap of 2 samples let the static search choose light_resnet50's
    float layers from 2 images — 21.8 dB on them, 14.8 dB on 2 others; from all 4: 21.2 and 20.4 dB.
    """
    dynamic = dynamic_batch(model)
    out: list[Sample] = []
    left = rows
    for s in samples:
        n = sample_rows(s)
        if n is not None and dynamic:
            s, n = {k: v[:left] for k, v in s.items()}, min(n, left)
        n = 1 if n is None else n
        if out and n > left:
            break
        out.append(dict(s))
        left -= n
        if left <= 0:
            break
    return out


def time_layers(model: ir.Model, plan: Plan, params: dict, qt: QType, per_channel: bool, sample_shapes: dict[str, tuple[int, ...]], tag: str) -> dict[int, tuple[float, float]]:
    """(float ms, int8 ms) per weighted compute node of ``plan``, each timed in isolation."""
    nodes = list(model.graph)
    out = {}
    for i in plan.compute:
        node = nodes[i]
        if node.op_type not in WEIGHTED or as_linear_layer(node) is None:  # activation x activation MatMuls are not timed
            continue
        x = node.inputs[0]
        y = node.outputs[0]
        x_key = x.name if x.name in params else None
        y_key = next((t for t in (y.name, *(u.outputs[0].name for u, _ in y.uses() if u.op_type == "Relu")) if t in params), None)
        if x_key is None or x.name not in sample_shapes:
            continue
        float_model = _micro(node, x, sample_shapes[x.name])
        int8_model = _micro(node, x, sample_shapes[x.name])
        micro_plan = Plan([0], {}, [x.name] + ([y.name] if y_key else []), {}, {})
        micro_params = {x.name: params[x_key]} | ({y.name: params[y_key]} if y_key else {})
        apply_plan(int8_model, micro_plan, micro_params, qt, per_channel, tag)
        _int8_boundaries(int8_model, qt)
        feeds = [_feed(m) for m in (float_model, int8_model)]
        sessions = [make_session(m, "deploy", threads=1) for m in (float_model, int8_model)]
        times: list[list[float]] = [[], []]
        for _ in range(3):
            for k in (0, 1):
                times[k].append(_median_ms(sessions[k], feeds[k]))
        out[i] = (statistics.median(times[0]), statistics.median(times[1]))
    return out


def whole_model_ms(models: Sequence[ir.Model], feed: dict[str, np.ndarray], rounds: int = 3) -> list[float]:
    """End-to-end median latency of each model on ``feed`` (ORT default level, 1 thread, interleaved)."""
    sessions = [make_session(m, "deploy", threads=1) for m in models]
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for k, sess in enumerate(sessions):
            times[k].append(_median_ms(sess, feed, repeats=10, min_seconds=0.05))
    return [statistics.median(t) for t in times]


def _micro(node: ir.Node, x: ir.Value, shape: tuple[int, ...]) -> ir.Model:
    """A model holding a copy of ``node`` alone: activation input as graph input, constants as initializers."""
    x_in = ir.Value(name=x.name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    inputs: list[ir.Value | None] = [x_in]
    inits = []
    for v in node.inputs[1:]:
        if v is None:
            inputs.append(None)
            continue
        c = ir.Value(name=v.name, shape=v.shape, type=v.type, const_value=v.const_value if v.const_value is not None else ir.convenience.get_const_tensor(v))
        inputs.append(c)
        inits.append(c)
    y = ir.Value(name=node.outputs[0].name, type=ir.TensorType(ir.DataType.FLOAT))
    copy = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()), outputs=[y])
    out = ir.Value(name=(y.name or "y") + "_out", type=ir.TensorType(ir.DataType.FLOAT))
    ident = ir.Node("", "Identity", [y], outputs=[out])
    graph = ir.Graph([x_in], [out], nodes=[copy, ident], initializers=inits, opset_imports=dict(node.graph.opset_imports))  # type: ignore[union-attr]
    return ir.Model(graph, ir_version=10)


def _int8_boundaries(model: ir.Model, qt: QType) -> None:
    """Feed the int8 pattern int8 directly and read its int8 output: inside a quantized chain the
    float<->int8 conversions at a layer's edges are shared with its neighbours."""
    graph = model.graph
    x = graph.inputs[0]
    q = next(u for u, _ in x.uses() if u.op_type == "QuantizeLinear")
    xq = ir.Value(name=x.name + "_q", shape=x.shape, type=ir.TensorType(qt.dtype))
    q.outputs[0].replace_all_uses_with(xq)
    graph.remove(q, safe=True)
    graph.inputs[0] = xq
    ident = next(n for n in graph if n.op_type == "Identity")
    dq = ident.inputs[0].producer()
    if dq is not None and dq.op_type == "DequantizeLinear":
        yq = dq.inputs[0]
        graph.outputs[0] = yq
        graph.remove([ident, dq], safe=True)


def _feed(model: ir.Model) -> dict[str, np.ndarray]:
    v = model.graph.inputs[0]
    shape = tuple(int(d) for d in v.shape)
    rng = np.random.default_rng(0)
    if v.dtype == ir.DataType.FLOAT:
        return {v.name: rng.standard_normal(shape).astype(np.float32)}
    return {v.name: rng.integers(0, 100, size=shape).astype(v.dtype.numpy())}


def _median_ms(session: Any, feed: dict[str, np.ndarray], repeats: int = 15, min_seconds: float = 0.03) -> float:
    for _ in range(3):
        session.run(None, feed)
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 200):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3
