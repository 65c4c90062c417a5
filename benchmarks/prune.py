"""Pruning on the trained models: unstructured, 2:4 and structured, graphopt against onnxsim's own pruning.

    python -m benchmarks.prune            # full sweep, writes benchmarks/results/prune.{json,md,png}
    python -m benchmarks.prune --quick    # digits_skl_mlp, 50% / 25% only; prints only

Rows per model: the original; magnitude and Wanda pruning at sparsity 0.3/0.5/0.7/0.9; 2:4 (magnitude and
Wanda scores); 50% magnitude then ``quantize-weights`` (int8, graphopt only); structured pruning at ratio 0.1/0.25/0.5, each by graphopt and by onnxsim 0.8.1
(``apply_magnitude_pruning``, ``apply_wanda_pruning``, ``n=2, m=4``, ``apply_structured_pruning``). graphopt
prunes every MatMul/Gemm/Conv weight here (``min-size=0``), like onnxsim, so sparsities compare; structured
pruning runs with its defaults (``score=data`` with bias compensation, ``channel-multiple=8``; for the CNN also ``channel-multiple=16``, ORT's NCHWc block on this AVX-512 CPU).

Data: Wanda, graphopt's data score and the verification all use the model's test ``.npz``: its first third
(120 of 360 digits, 500 of 2000 sequences) calibrates, the rest is scored; every figure (SQNR, cosine,
accuracy) is on the scored part. ``verified``: the verdict of graphopt's runner under the default budgets
(onnxruntime at the default optimization level against the original): ok, rolled-back (the row then shows the
unverified result), unchanged; onnxsim rows are not verified by it.

Files: ``bytes`` as each tool saves the pruned model (dense zeros; onnxsim's magnitude pruning also keeps
the original dense weights as unused initializers); ``sparse_bytes`` after graphopt's lossless
``dce,sparse-storage`` on that same model (``sparse_storage``: the runner's verdict, and outputs compared bit for bit
with the dense model at both ORT levels, else NOT-BIT-EXACT); ``file_ratio`` is
``sparse_bytes`` over the original file. Latency: ORT CPU, default optimization level, one intra-op thread,
median of interleaved rounds, as a ratio to the original, at batch 1 and batch 64; ``sparse_lat_b64``: the
sparse-stored file against the same pruned model stored dense, interleaved (its decoder is constant-folded at
session load), for the 50% magnitude and Wanda rows. The machine is 2 cores shared with other jobs (load average
4-5 during the run): latency ratios within about ±10% of 1 are noise. seq_transformer's weights are exported
as ``Transpose(W)``: it is run through graphopt's ``fold-constants`` first and that folded model is the original
for every row.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

import graphopt
from benchmarks import harness
from graphopt import io
from graphopt.data import load_npz
from graphopt.layers import linear_layers
from graphopt.verify import run

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
ALL_MODELS = ("digits_skl_mlp", "digits_cnn", "digits_mlp_wide", "seq_transformer")
SPARSITIES = (0.3, 0.5, 0.7, 0.9)
RATIOS = (0.1, 0.25, 0.5)
COLUMNS = ["model", "tool", "method", "target", "sparsity", "params", "bytes", "sparse_bytes", "file_ratio", "lat_b1", "lat_b64", "sparse_lat_b64", "sqnr_db", "cosine", "accuracy", "acc_delta", "verified", "sparse_storage"]


def prediction(name: str) -> tuple[str | None, str]:
    meta = MODELS / f"{name}.json"
    p = json.loads(meta.read_text()).get("prediction", {}) if meta.exists() else {}
    return p.get("output"), p.get("decode", "argmax")


def accuracy(outs: dict[str, np.ndarray], labels: np.ndarray, name: str) -> float:
    output, decode = prediction(name)
    value = outs[output or next(iter(outs))]
    pred = value if decode == "label" else value.argmax(-1)
    return float(np.mean(pred.reshape(-1) == labels.reshape(-1)))


def floats(outs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float outputs only: an integer label output has no meaningful SQNR."""
    return {k: v for k, v in outs.items() if v.dtype.kind == "f"}


def split(name: str, model: ir.Model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    samples, labels = load_npz(MODELS / f"{name}_test.npz", model)
    feed = samples[0]
    n = len(labels) // 3 if name.startswith("digits") else len(labels) // 4
    return {k: v[:n] for k, v in feed.items()}, {k: v[n:] for k, v in feed.items()}, labels[n:]


def linear_stats(model: ir.Model) -> tuple[float, int]:
    """Fraction of zeros over every MatMul/Gemm/Conv weight (float, or int8 read by DequantizeLinear), and the parameter count."""
    arrays = [layer.tensor.numpy() for layer in linear_layers(model)]
    arrays += [v.const_value.numpy() for v in model.graph.initializers.values()
               if v.const_value is not None and v.dtype == ir.DataType.INT8 and any(n.op_type == "DequantizeLinear" and i == 0 for n, i in v.uses())]  # fmt: skip
    sizes = [(a.size, int(np.count_nonzero(a == 0))) for a in arrays]
    total = sum(s for s, _ in sizes)
    params = sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)
    return (sum(z for _, z in sizes) / total if total else 0.0), params


def graphopt_run(model: ir.Model, pipeline: str, calib: dict, scored: dict) -> tuple[ir.Model, str, dict[str, Any]]:
    """The pipeline through graphopt's runner under the default budgets; if a pass is rolled back, the
    unverified result anyway (the row shows what the pruning did, the verdict whether it was accepted)."""
    out, report = graphopt.optimize(model, pipeline, inputs=[scored], calibration=[calib], on_violation="rollback")
    verdicts = [r.verdict for r in report.records]
    verdict = "rolled-back" if "rolled-back" in verdicts else "ok" if "ok" in verdicts else verdicts[-1]
    if verdict == "rolled-back":
        out, report = graphopt.optimize(model, pipeline, calibration=[calib], verify=False)
    return out, verdict, report.records[0].stats


def store_sparse(model: ir.Model, scored: dict) -> tuple[ir.Model, str]:
    """``dce,sparse-storage`` (dce: onnxsim keeps the dense originals), then our own check: outputs identical
    to the dense model at both ORT levels. The runner's verdict comes first; on int8 DequantizeLinear models its
    deploy check (against exact-level outputs) fails any lossless pass, so that case is checked here only."""
    try:
        stored, report = graphopt.optimize(model, "dce,sparse-storage", inputs=[scored])
        verdict = report.records[-1].verdict
    except graphopt.errors.VerificationError:
        stored, _ = graphopt.optimize(model, "dce,sparse-storage", verify=False)
        verdict = "runner-deploy-check-n/a"
    same = all(
        all(np.array_equal(a[k], b[k]) for k in a) for level in ("exact", "deploy") for a, b in zip(run(model, [scored], level), run(stored, [scored], level))
    )
    return stored, verdict + ("" if same else " NOT-BIT-EXACT")


def onnxsim_run(proto: onnx.ModelProto, method: str, target: float, calib: dict) -> onnx.ModelProto:
    import onnxsim

    if method == "magnitude":
        return onnxsim.apply_magnitude_pruning(proto, sparsity=target)
    if method == "wanda":
        return onnxsim.apply_wanda_pruning(proto, calibration_data=[calib], sparsity=target)
    if method == "2:4 magnitude":
        return onnxsim.apply_magnitude_pruning(proto, sparsity=0.5, n=2, m=4)
    if method == "2:4 wanda":
        return onnxsim.apply_wanda_pruning(proto, calibration_data=[calib], sparsity=0.5, n=2, m=4)
    if method == "structured l2":
        return onnxsim.apply_structured_pruning(proto, sparsity=target)
    if method == "structured wanda":
        return onnxsim.apply_structured_wanda_pruning(proto, calibration_data=[calib], sparsity=target)
    raise ValueError(method)


def plan(quick: bool) -> list[tuple[str, str, float]]:
    """(tool, method, target) rows after the original."""
    sparsities, ratios = ((0.5,), (0.25,)) if quick else (SPARSITIES, RATIOS)
    rows = []
    for tool in ("graphopt", "onnxsim"):
        rows += [(tool, m, s) for m in ("magnitude", "wanda") for s in sparsities]
        rows += [(tool, m, 0.5) for m in ("2:4 magnitude", "2:4 wanda")]
        if tool == "graphopt":
            rows.append((tool, "magnitude+int8", 0.5))  # then quantize-weights: sparse-storage packs the int8 values
        structured = ("structured data", "structured data m16") if tool == "graphopt" else ("structured l2", "structured wanda")
        rows += [(tool, m, r) for m in structured for r in ratios]
    return rows


def pipeline_for(method: str, target: float) -> str:
    if method in ("magnitude", "wanda"):
        return f"prune-magnitude{{sparsity={target},score={method},min-size=0}}"
    if method == "magnitude+int8":  # the chain is held to the pruning budget (quantize-weights' own 30 dB is for unpruned weights)
        return f"prune-magnitude{{sparsity={target},min-size=0}},quantize-weights{{budget-min-sqnr=12,budget-min-cosine=0.97}}"
    if method.startswith("2:4"):
        return f"prune-nm{{score={method.split()[1]},min-size=0}}"
    if method == "structured data m16":  # channel counts in whole AVX-512 NCHWc blocks (ORT's conv kernels here)
        return f"prune-structured{{ratio={target},channel-multiple=16}}"
    return f"prune-structured{{ratio={target}}}"


def run_model(name: str, tmp: Path, quick: bool) -> list[dict[str, Any]]:
    model = io.load(MODELS / f"{name}.onnx")
    folded = ""
    if name == "seq_transformer":
        model, _ = graphopt.optimize(model, "fold-constants,dce", verify=False)
        folded = "fold-constants,dce"
    calib, scored, labels = split(name, model)
    base = tmp / f"{name}.onnx"
    io.save(model, base)
    reference = harness.outputs(base, [scored], level="exact")[0]
    base_acc = accuracy(reference, labels, name)
    sparsity, params = linear_stats(model)
    rows: list[dict[str, Any]] = [{
        "model": name, "tool": "original", "method": "", "target": 0.0, "sparsity": round(sparsity, 4), "params": params, "bytes": base.stat().st_size,
        "sparse_bytes": None, "file_ratio": 1.0, "sqnr_db": None, "cosine": 1.0, "accuracy": base_acc, "acc_delta": 0.0, "verified": None, "path": base,
        "calibration": f"first {len(next(iter(calib.values())))} of the test npz; the other {len(labels)} scored", "preprocessing": folded,
    }]  # fmt: skip
    proto = onnx.load(base)
    has_conv = any(node.op_type == "Conv" for node in model.graph)
    for tool, method, target in plan(quick):
        if method.endswith("m16") and not has_conv:
            continue  # identical to the default on these MLPs: their widths are multiples of 16
        start = time.perf_counter()
        try:
            if tool == "graphopt":
                pruned, verified, stats = graphopt_run(model, pipeline_for(method, target), calib, scored)
            else:
                pruned, verified, stats = graphopt.api.as_model(onnxsim_run(proto, method, target, calib)), None, {}
        except Exception as e:  # a tool that fails on a model is a result, not a crash
            rows.append({"model": name, "tool": tool, "method": method, "target": target, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"})
            continue
        seconds = time.perf_counter() - start
        path = tmp / f"{name}-{tool}-{method.replace(' ', '_').replace(':', '')}-{target}.onnx"
        if tool == "graphopt":
            io.save(pruned, path)
        else:
            onnx.save(ir.to_proto(pruned), path)  # as onnxsim returned it
        stored, storage = store_sparse(pruned, scored)
        sparse_path = path.with_suffix(".sparse.onnx")
        io.save(stored, sparse_path)
        outs = harness.outputs(path, [scored])[0]
        figures = harness.error_figures([floats(reference)], [floats(outs)])
        sparsity, params = linear_stats(pruned)
        acc = accuracy(outs, labels, name)
        rows.append({
            "model": name, "tool": tool, "method": method, "target": target, "sparsity": round(sparsity, 4), "params": params,
            "bytes": path.stat().st_size, "sparse_bytes": sparse_path.stat().st_size, "file_ratio": round(sparse_path.stat().st_size / base.stat().st_size, 3),
            "sqnr_db": figures["sqnr_db"], "cosine": None if figures["cosine"] is None else round(figures["cosine"], 5),
            "accuracy": acc, "acc_delta": round(100 * (acc - base_acc), 2), "verified": verified, "sparse_storage": storage,
            "seconds": round(seconds, 2), "stats": stats, "path": path, "sparse_path": sparse_path,
        })  # fmt: skip
    kw: dict[str, Any] = {"repeats": 5, "min_seconds": 0.05, "rounds": 1} if quick else {"repeats": 20, "min_seconds": 0.2, "rounds": 3}
    timed = [r for r in rows if "path" in r]
    b64 = {k: v[:64] for k, v in scored.items()}
    harness.add_latency_columns(timed, scored, **kw)
    for r in timed:  # the decoder costs nothing once loaded: sparse file against the same model dense, side by side
        if "sparse_path" in r and r["sparse_bytes"] < 0.98 * r["bytes"] and r["method"] in ("magnitude", "wanda") and r["target"] == 0.5:
            lat = harness.latency_ratios({"dense": r["path"], "sparse": r["sparse_path"]}, b64, **(kw | {"rounds": 1 if quick else 5}))
            r["sparse_lat_b64"] = round(lat["sparse"] / lat["dense"], 3)
    for r in rows:
        r.pop("path", None)
        r.pop("sparse_path", None)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 7.5), squeeze=False)
    for col, name in enumerate(models):
        mine = [r for r in rows if r["model"] == name and "accuracy" in r]
        base = next(r for r in mine if r["tool"] == "original")
        for (tool, method), style in {("graphopt", "magnitude"): "o-", ("graphopt", "wanda"): "s-", ("onnxsim", "magnitude"): "o--", ("onnxsim", "wanda"): "s--"}.items():
            pts = sorted((r["sparsity"], 100 * r["accuracy"]) for r in mine if r["tool"] == tool and r["method"] == method)
            if pts:
                axes[0][col].plot(*zip(*pts), style, label=f"{tool} {method}", color="C0" if tool == "graphopt" else "C1", alpha=1.0 if method == "wanda" else 0.6)
        for r in mine:
            if r["method"].startswith("2:4"):
                axes[0][col].plot(r["sparsity"], 100 * r["accuracy"], "*", ms=10, color="C0" if r["tool"] == "graphopt" else "C1", label=f"{r['tool']} {r['method']}")
        for (tool, method), style in {("graphopt", "structured data"): "o-", ("graphopt", "structured data m16"): "^-", ("onnxsim", "structured l2"): "o--", ("onnxsim", "structured wanda"): "s--"}.items():
            pts = sorted((r["params"] / base["params"], 100 * r["accuracy"]) for r in mine if r["tool"] == tool and r["method"] == method)
            if pts:  # against parameters kept: a run that removed nothing sits at 1.0
                axes[1][col].plot(*zip(*pts), style, label=f"{tool} {method}", color="C0" if tool == "graphopt" else "C1")
        axes[1][col].invert_xaxis()
        for ax, xlabel in ((axes[0][col], "weight sparsity (all MatMul/Gemm/Conv weights)"), (axes[1][col], "structured pruning: parameters kept (ratio 0.1/0.25/0.5)")):
            ax.axhline(100 * base["accuracy"], color="gray", lw=0.8, ls=":")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][col].set_title(name)
    fig.suptitle("Accuracy vs sparsity (top) and vs parameters kept by structured pruning (bottom); dotted: original. Scored on test data not used to calibrate.")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goals(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    ok = [r for r in rows if "accuracy" in r]
    for name in dict.fromkeys(r["model"] for r in ok):
        at = {(r["tool"], r["method"], r["target"]): r for r in ok if r["model"] == name}
        if (r := at.get(("graphopt", "magnitude", 0.5))) is not None:
            lines.append(f"{name}: 50% magnitude + sparse-storage file {r['file_ratio']}x of the original (goal <= 0.6); latency of that file x{r.get('sparse_lat_b64')} of the same model dense")
        if (r := at.get(("graphopt", "structured data", 0.25))) is not None:
            lines.append(f"{name}: structured 25%: latency b1 x{r.get('lat_b1')}, b64 x{r.get('lat_b64')} (goal <= 0.85), verdict under the default budget: {r['verified']}, accuracy {r['acc_delta']:+.2f} points, SQNR {r['sqnr_db']} dB")
        if (r := at.get(("graphopt", "structured data m16", 0.25))) is not None:
            lines.append(f"{name}: structured 25% with channel-multiple=16: latency b1 x{r.get('lat_b1')}, b64 x{r.get('lat_b64')}, verified: {r['verified']}, accuracy {r['acc_delta']:+.2f} points")
        wins = [f"{t:g}: {at[('graphopt', 'wanda', t)]['accuracy']:.4f} vs {at[('graphopt', 'magnitude', t)]['accuracy']:.4f}" for t in SPARSITIES
                if ("graphopt", "wanda", t) in at and ("graphopt", "magnitude", t) in at and at[("graphopt", "wanda", t)]["accuracy"] > at[("graphopt", "magnitude", t)]["accuracy"]]  # fmt: skip
        lines.append(f"{name}: wanda beats magnitude on accuracy at " + (", ".join(wins) if wins else "no sparsity"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits_skl_mlp, 50%% and 25%% only; prints only")
    parser.add_argument("--models", nargs="*", default=None, help="subset of " + ", ".join(ALL_MODELS))
    args = parser.parse_args(argv)
    logging.getLogger("graphopt").setLevel(logging.ERROR)  # rollbacks are expected here; they are in the table
    names = args.models or (["digits_skl_mlp"] if args.quick else [m for m in ALL_MODELS if (MODELS / f"{m}_test.npz").exists()])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-prune-") as tmp:
        for name in names:
            rows += run_model(name, Path(tmp), args.quick)
    table = harness.markdown_table(rows, COLUMNS)
    summary = goals(rows)
    errors = [f"{r['model']} {r['tool']} {r['method']} {r['target']}: {r['error']}" for r in rows if "error" in r]
    print(table)
    print("\n".join(summary + errors))
    if not args.quick:
        notes = {"calibration": {r["model"]: r["calibration"] for r in rows if "calibration" in r}, "goals": summary, "errors": errors}
        harness.write_results("prune", rows, table + "\n\n" + "\n".join(f"- {s}" for s in summary + errors), extra=notes)
        plot(rows, harness.RESULTS / "prune.png")
        print(f"wrote {harness.RESULTS / 'prune.json'}, prune.md, prune.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
