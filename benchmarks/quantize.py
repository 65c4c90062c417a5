"""Quantization side by side: graphopt's quantize-weights / quantize-dynamic / quantize-static against
onnxruntime.quantization (quantize_dynamic, quantize_static QDQ per-channel on and off,
MatMulNBitsQuantizer 4-bit) on the trained models in models/, in one run.

Each model's test split is cut in two: the first part calibrates every tool (the same samples),
the rest measures. Figures: file bytes (and ratio to float), ORT CPU latency ratio to float
(median, interleaved, 1 thread, ORT's default level, one batch), SQNR/cosine of the outputs
against the float model, task accuracy. ORT's quantize_static gets its recommended
pre-processing (quant_pre_process: shape inference + ORT graph optimization, which folds BN).

    python -m benchmarks.quantize [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks import harness
from benchmarks.qsize import breakdown

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
ALL = ["digits_cnn", "digits_mlp_wide", "digits_skl_mlp", "seq_transformer", "digits_lstm"]
CALIBRATION_ROWS = {"seq_transformer": 256}
EVAL_ROWS = {"seq_transformer": 512}
LATENCY_BATCH = 32

OURS = {
    "graphopt int8 weights": "quantize-weights",
    "graphopt cleanup+int8 weights": "cleanup,quantize-weights{gather=true}",
    "graphopt int8 weights blocked": "quantize-weights{blocked=true}",
    "graphopt int4 weights": "quantize-weights{bits=4}",
    "graphopt int4 weights gptq": "quantize-weights{bits=4,rounding=gptq}",
    "graphopt dynamic int8": "quantize-dynamic",
    "graphopt static int8": "quantize-static",
    "graphopt static int8 latency-aware": "quantize-static{latency-aware=true}",
}
QUICK_OURS = ["graphopt int8 weights", "graphopt int4 weights", "graphopt dynamic int8", "graphopt static int8"]
THEIRS = ["ort dynamic int8", "ort static int8 (per-tensor)", "ort static int8 (per-channel)", "ort MatMulNBits 4-bit"]


def split(name: str) -> tuple[list[dict], list[dict], np.ndarray]:
    """(calibration samples, evaluation samples, evaluation labels): one batch each, rows of the test split."""
    with np.load(MODELS / f"{name}_test.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    labels = arrays.pop("labels")
    n = len(labels)
    c = CALIBRATION_ROWS.get(name, n // 4)
    e = min(n, c + EVAL_ROWS.get(name, n))
    calib = [{k: v[:c] for k, v in arrays.items()}]
    evaluation = [{k: v[c:e] for k, v in arrays.items()}]
    return calib, evaluation, labels[c:e]


class Reader:
    """onnxruntime.quantization's CalibrationDataReader over our calibration samples."""

    def __init__(self, samples: list[dict]) -> None:
        self._it = iter(samples)

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax
        pass


def run_ort_tool(tool: str, src: Path, dst: Path, calib: list[dict], tmp: Path) -> str:
    """Write ``dst`` with one of onnxruntime.quantization's tools; returns a note ("" when fine)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if tool == "ort dynamic int8":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return ""
    if tool.startswith("ort static"):
        pre = tmp / f"{src.stem}_pre.onnx"
        note = ""
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(src), str(pre))
        except Exception as e:  # noqa: BLE001
            shutil.copy(src, pre)
            note = f"quant_pre_process failed ({type(e).__name__}); raw model"
        quantize_static(str(pre), str(dst), Reader(calib), quant_format=QuantFormat.QDQ, per_channel="per-channel" in tool)
        return note
    if tool == "ort MatMulNBits 4-bit":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(src), block_size=128, is_symmetric=True)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
        return ""
    raise ValueError(tool)


def run_ours(pipeline: str, src: Path, dst: Path, calib: list[dict], evaluation: list[dict]) -> tuple[str, dict[str, Any]]:
    import graphopt

    model, report = graphopt.optimize(src, pipeline, inputs=evaluation, calibration=calib, on_violation="rollback")
    graphopt.save(model, dst)
    record = report.records[-1]
    info = {"verdict": record.verdict, "stats": record.stats, "seconds": round(record.seconds, 2)}
    if record.layers and "latency-aware" in pipeline:
        info["layers"] = [{k: r.get(k) for k in ("name", "choice", "float_ms", "int8_ms")} for r in record.layers if "float_ms" in r]
    return ("" if record.verdict == "ok" else f"verdict {record.verdict}"), info


def task_accuracy(name: str, outs: list[dict], labels: np.ndarray) -> float:
    meta = json.loads((MODELS / f"{name}.json").read_text())
    output = meta.get("prediction", {}).get("output")
    got = np.asarray(outs[0][output] if output in outs[0] else next(iter(outs[0].values())))
    preds = got if got.dtype.kind in "iu" else got.argmax(-1)
    return float(np.mean(preds.reshape(-1) == labels.reshape(-1)))


def bench_model(name: str, variants: list[str], tmp: Path, rounds: int) -> list[dict[str, Any]]:
    src = MODELS / f"{name}.onnx"
    calib, evaluation, labels = split(name)
    paths: dict[str, Path] = {"float": src}
    notes: dict[str, str] = {}
    extra: dict[str, dict] = {}
    for v in variants:
        dst = tmp / f"{name}__{v.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        try:
            if v in OURS:
                notes[v], extra[v] = run_ours(OURS[v], src, dst, calib, evaluation)
            else:
                notes[v] = run_ort_tool(v, src, dst, calib, tmp)
            paths[v] = dst
        except Exception as e:  # noqa: BLE001  (a tool that fails is a result too)
            notes[v] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
        extra.setdefault(v, {})["tool_seconds"] = round(time.perf_counter() - start, 2)
    reference = harness.outputs(src, evaluation, level="exact")
    feed = {k: v[:LATENCY_BATCH] for k, v in evaluation[0].items()}
    runnable: dict[str, Path] = {}
    rows = [{"model": name, "variant": v, "note": notes[v], "bytes": None} for v in variants if v not in paths]  # tools that failed
    for v, p in paths.items():
        row: dict[str, Any] = {"model": name, "variant": v, "note": notes.get(v, "")}
        try:
            outs = harness.outputs(p, evaluation)
            floats = [k for k, a in reference[0].items() if np.asarray(a).dtype.kind == "f"]  # labels are compared by accuracy
            row.update(harness.error_figures([{k: r[k] for k in floats} for r in reference], outs))
            row["accuracy"] = round(task_accuracy(name, outs, labels), 4)
            runnable[v] = p
        except Exception as e:  # noqa: BLE001
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"ORT cannot run it: {' '.join(str(e).split())[:160]}"
        row["bytes"] = p.stat().st_size
        row["bytes_by_role"] = breakdown(p)
        row.update(extra.get(v, {}))
        rows.append(row)
    harness.latency_ms(src, feed, min_seconds=0.3)  # warm the machine up before the interleaved rounds
    latency = harness.latency_ratios(runnable, feed, rounds=rounds, repeats=20, min_seconds=0.2)
    rows.sort(key=lambda r: (["float", *variants].index(r["variant"])))
    base_bytes = rows[0]["bytes"]
    for row in rows:
        if row["bytes"] is None:
            continue
        row["size_ratio"] = round(row["bytes"] / base_bytes, 3)
        if row["variant"] in latency:
            row["latency_ms"] = round(latency[row["variant"]], 4)
            row["latency_ratio"] = round(latency[row["variant"]] / latency["float"], 3)
        row["accuracy_delta_points"] = round(100 * (row.get("accuracy", np.nan) - rows[0]["accuracy"]), 2) if "accuracy" in row else None
    return rows


ROLE_GROUPS = {
    "int weights": ("quantized weight",),
    "scales+zero points": ("scale", "zero point"),
    "float weights left": ("float weight", "float weight (small)", "embedding table", "other float constants", "float into Q"),
    "bias+norm": ("bias", "norm params"),
    "graph (nodes, names, shapes, metadata)": ("nodes", "small / shape constants", "value_info", "graph inputs/outputs", "graph name/doc", "model header/metadata"),
}


def bytes_table(rows: list[dict[str, Any]]) -> str:
    """Where each file's bytes go (benchmarks/qsize.py roles, grouped), as fractions of the float file."""
    out = []
    base = {r["model"]: r["bytes"] for r in rows if r["variant"] == "float"}
    for r in rows:
        parts = r.get("bytes_by_role")
        if not parts or r["model"] not in base:
            continue
        rec = {"model": r["model"], "variant": r["variant"], "size_ratio": r.get("size_ratio")}
        for group, roles in ROLE_GROUPS.items():
            rec[group] = round(sum(parts.get(k, 0) for k in roles) / base[r["model"]], 4)
        out.append(rec)
    return "Bytes by role, as a fraction of the float file (python -m benchmarks.qsize FILE for the detail):\n\n" + harness.markdown_table(out, ["model", "variant", "size_ratio", *ROLE_GROUPS])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        for r in (r for r in rows if r["model"] == m and r.get("accuracy") is not None):
            ours = r["variant"].startswith("graphopt")
            ax.scatter(r["size_ratio"], 100 * r["accuracy"], marker="o" if ours else "x", s=40, color="C0" if ours else ("C3" if r["variant"] != "float" else "k"))
            ax.annotate(r["variant"].replace("graphopt ", "g:").replace("ort ", "o:"), (r["size_ratio"], 100 * r["accuracy"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_title(m)
        ax.set_xlabel("file size / float")
        ax.set_ylabel("accuracy %")
        ax.grid(alpha=0.3)
    fig.suptitle("accuracy vs size: graphopt (o, blue) vs onnxruntime.quantization (x, red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest model, a few variants, short timing (smoke test)")
    parser.add_argument("--models", nargs="*", help="subset of models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    models = args.models or (["digits_skl_mlp"] if args.quick else [m for m in ALL if (MODELS / f"{m}.onnx").exists() and (MODELS / f"{m}_test.npz").exists()])
    variants = (QUICK_OURS + THEIRS[:2]) if args.quick else list(OURS) + THEIRS
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-quantize-") as tmp:
        for m in models:
            rows += bench_model(m, variants, Path(tmp), rounds=1 if args.quick else 5)
    columns = ["model", "variant", "bytes", "size_ratio", "latency_ratio", "sqnr_db", "cosine", "accuracy", "accuracy_delta_points", "note"]
    table = harness.markdown_table(rows, columns) + "\n\n" + bytes_table(rows)
    print(table)
    if not args.quick:
        machine = harness.machine()
        header = f"machine: {machine['cpu']}, {machine['cores']} cores, VNNI={machine['vnni']}, flags {' '.join(machine['flags'])}; onnxruntime {machine['onnxruntime']}; latency batch {LATENCY_BATCH}, {harness.THREADS} thread\n\n"
        harness.write_results("quantize", rows, header + table)
        plot(rows, harness.RESULTS / "quantize.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
