"""The tools benchmarks/zoo.py compares, each run in its own process (``python -m benchmarks.zoo_tools``).

    python -m benchmarks.zoo_tools TOOL SRC.onnx DST.onnx CALIB.npz INFO.json

A worker loads the model, runs one tool with the calibration samples, writes ``DST.onnx`` and a
small json (what the tool reported: graphopt's per-pass verdicts, notes). The parent measures its
wall time and peak RSS (``os.wait4``), and a crash or a timeout only loses that one row.
The cleanup tools (onnxsim.simplify, onnxslim, onnxoptimizer, onnxscript) run as in
benchmarks/cleanup.py and onnxruntime.quantization as in benchmarks/quantize.py: same functions.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # idle BLAS threads spin on 2 shared cores

import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

CHAIN = "budget-min-sqnr=12,budget-min-cosine=0.97"
"""Budget of each lossy pass of the combined chain: prune-magnitude's own (every pass is measured
against the original model, so a later pass of a chain must allow what the earlier ones spent)."""

VERIFY_CAP_BYTES, VERIFY_CAP_ROWS = 4_000_000, 16
"""graphopt calibrates on every calibration sample and verifies on them too, except on models over
4 MB, where it verifies on the first 2 samples of at most 16 rows (never on scored data)."""

INT8 = "budget-min-sqnr=20,budget-min-cosine=0.99"
"""Both int8 rows are held to quantize-static's default budget (quantize-weights' own default, 30 dB,
is meant for a weight-only step on the way to something else). ``gather=true`` quantizes embedding
tables too, as onnxruntime's quantize_dynamic does."""

GRAPHOPT = {
    "graphopt cleanup": "cleanup",
    "graphopt svd": "cleanup,svd-split{global-ratio=0.5,data-aware=true}",
    "graphopt prune": "cleanup,prune-magnitude{sparsity=0.5},sparse-storage",
    "graphopt int8": "cleanup,quantize-static",
    "graphopt int8 weights": f"cleanup,quantize-weights{{gather=true,{INT8}}}",
    "graphopt int8 weights gptq": f"cleanup,quantize-weights{{gather=true,rounding=gptq,{INT8}}}",
    "graphopt int8 dynamic": "cleanup,quantize-dynamic",
    "graphopt int4": "cleanup,quantize-weights{bits=4,rounding=gptq}",
    "graphopt combined": f"cleanup,prune-magnitude{{sparsity=0.3,{CHAIN}}},svd-split{{global-ratio=0.6,data-aware=true,{CHAIN}}},"
    f"quantize-weights{{bits=8,gather=true,{CHAIN}}},sparse-storage",
}


@dataclass(frozen=True)
class Tool:
    name: str
    family: str  # graphopt | cleanup | onnxsim | ort
    kind: str  # lossless | prune | svd | int8 | int4 | combined
    how: str  # the call, for the table notes


TOOLS: dict[str, Tool] = {
    "graphopt cleanup": Tool("graphopt cleanup", "graphopt", "lossless", GRAPHOPT["graphopt cleanup"]),
    "onnxsim": Tool("onnxsim", "cleanup", "lossless", "onnxsim.simplify(model)"),
    "onnxslim": Tool("onnxslim", "cleanup", "lossless", "onnxslim.slim(model)"),
    "onnxoptimizer": Tool("onnxoptimizer", "cleanup", "lossless", "onnxoptimizer.optimize(model)"),
    "onnxscript": Tool("onnxscript", "cleanup", "lossless", "onnxscript.optimizer.optimize(model)"),
    "graphopt svd": Tool("graphopt svd", "graphopt", "svd", GRAPHOPT["graphopt svd"]),
    "graphopt prune": Tool("graphopt prune", "graphopt", "prune", GRAPHOPT["graphopt prune"]),
    "onnxsim prune": Tool("onnxsim prune", "onnxsim", "prune", "onnxsim.apply_magnitude_pruning(model, sparsity=0.5)"),
    "graphopt int8": Tool("graphopt int8", "graphopt", "int8", GRAPHOPT["graphopt int8"]),
    "graphopt int8 weights": Tool("graphopt int8 weights", "graphopt", "int8", GRAPHOPT["graphopt int8 weights"]),
    "graphopt int8 weights gptq": Tool("graphopt int8 weights gptq", "graphopt", "int8", GRAPHOPT["graphopt int8 weights gptq"]),
    "graphopt int8 dynamic": Tool("graphopt int8 dynamic", "graphopt", "int8", GRAPHOPT["graphopt int8 dynamic"]),
    "onnxsim int8 dynamic": Tool("onnxsim int8 dynamic", "onnxsim", "int8", "onnxsim.quantize_dynamic(model)"),
    "onnxsim int8 static": Tool("onnxsim int8 static", "onnxsim", "int8", "onnxsim.quantize_static(model, calibration_data)"),
    "ort dynamic int8": Tool("ort dynamic int8", "ort", "int8", "quantize_dynamic(weight_type=QInt8)"),
    "ort static int8 (per-channel)": Tool("ort static int8 (per-channel)", "ort", "int8", "quant_pre_process, quantize_static(QDQ, per_channel=True)"),
    "graphopt int4": Tool("graphopt int4", "graphopt", "int4", GRAPHOPT["graphopt int4"]),
    "onnxsim int4 gptq": Tool("onnxsim int4 gptq", "onnxsim", "int4", "onnxsim.quantize_weight_only_int4 + apply_gptq(calibration_data)"),
    "ort MatMulNBits 4-bit": Tool("ort MatMulNBits 4-bit", "ort", "int4", "MatMulNBitsQuantizer(block_size=128, is_symmetric=True)"),
    "graphopt combined": Tool("graphopt combined", "graphopt", "combined", GRAPHOPT["graphopt combined"]),
}
FAMILIES = ("graphopt", "cleanup", "onnxsim", "ort")


def save_samples(path: Path, samples: list[dict[str, np.ndarray]]) -> None:
    np.savez(path, **{f"{i}/{k}": v for i, s in enumerate(samples) for k, v in s.items()})


def load_samples(path: Path) -> list[dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            i, name = key.split("/", 1)
            out.setdefault(int(i), {})[name] = data[key]
    return [out[i] for i in sorted(out)]


def _graphopt(tool: str, src: Path, dst: Path, calib: list[dict]) -> dict[str, Any]:
    import graphopt

    verify = calib
    if src.stat().st_size > VERIFY_CAP_BYTES:  # graphopt verifies every modifying pass at two ORT levels: keep it lean on big models
        verify = [{k: v[:VERIFY_CAP_ROWS] for k, v in s.items()} for s in calib[:2]]
    model, report = graphopt.optimize(src, GRAPHOPT[tool], inputs=verify, calibration=calib, on_violation="rollback")
    graphopt.save(model, dst)
    passes = [
        {"pass": r.name, "verdict": r.verdict, "violations": r.violations[:2], "seconds": round(r.seconds + r.verify_seconds, 2), "stats": r.stats}
        for r in report.records
        if not r.lossless or r.verdict not in ("unchanged", "ok")
    ]
    rolled = {r.name: "; ".join(r.violations[:1]) for r in report.records if r.verdict == "rolled-back"}
    note = ("rolled back: " + ", ".join(f"{k} ({v})" if v else k for k, v in rolled.items())) if rolled else ""
    return {"verified": report.verified, "passes": passes, "note": note}


def _cleanup(tool: str, src: Path, dst: Path, calib: list[dict]) -> dict[str, Any]:
    from benchmarks.cleanup import RUNNERS

    onnx.save(RUNNERS[tool](onnx.load(src), calib), dst)
    return {}


def _onnxsim(tool: str, src: Path, dst: Path, calib: list[dict]) -> dict[str, Any]:
    import onnxsim

    model = onnx.load(src)
    if tool == "onnxsim prune":
        out = onnxsim.apply_magnitude_pruning(model, sparsity=0.5)
    elif tool == "onnxsim int8 dynamic":
        out = onnxsim.quantize_dynamic(model)
    elif tool == "onnxsim int8 static":
        out = onnxsim.quantize_static(model, calibration_data=calib)
    elif tool == "onnxsim int4 gptq":
        out = onnxsim.apply_gptq(model, onnxsim.quantize_weight_only_int4(model), calibration_data=calib)
    else:
        raise ValueError(tool)
    onnx.save(out, dst)
    return {}


def _ort(tool: str, src: Path, dst: Path, calib: list[dict]) -> dict[str, Any]:
    from benchmarks.quantize import run_ort_tool

    with tempfile.TemporaryDirectory(prefix="zoo-ort-") as tmp:
        note = run_ort_tool(tool, src, dst, calib, Path(tmp))
    return {"note": note}


def run(tool: str, src: Path, dst: Path, calib: list[dict]) -> dict[str, Any]:
    """Run one tool (``original``: copy the file, for the baseline time and RSS of a worker)."""
    if tool == "original":
        onnx.load(src)
        shutil.copyfile(src, dst)
        return {}
    family = TOOLS[tool].family
    runner = {"graphopt": _graphopt, "cleanup": _cleanup, "onnxsim": _onnxsim, "ort": _ort}[family]
    return runner(tool, src, dst, calib)


def peak_rss_mb() -> float | None:
    """This process's peak resident set (VmHWM). Not the parent's ``wait4`` figure: on Linux a child's
    ru_maxrss starts from the parent's RSS at fork, so it reports the benchmark's own size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def main(argv: list[str]) -> int:
    tool, src, dst, calib_path, info_path = argv
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    try:
        info = run(tool, Path(src), Path(dst), load_samples(Path(calib_path)))
        info["status"] = "ok"
    except Exception as e:  # noqa: BLE001  (a crash is a result)
        info = {"status": f"crash: {type(e).__name__}: {' '.join(str(e).split())[:160]}"}
    info["tool_seconds"] = round(time.perf_counter() - start, 2)
    info["peak_rss_mb"] = peak_rss_mb()
    Path(info_path).write_text(json.dumps(info, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main(sys.argv[1:]))
