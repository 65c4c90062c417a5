"""Bias correction on and off: quantize-static and quantize-weights (int8), with their sensitivity
search (the default) and all-int8 (``search=false``, which shows the correction's effect directly).

Per model (benchmarks/zoo_models.py: same calibration and scored data, same task metrics as the
zoo) and setting: SQNR of the outputs on the scored data at ORT's default level, size ratio, layers
kept in float by the search, layers corrected, and the task metric.

    python -m benchmarks.bias_correction [--quick] [--models effnet_lite0,ocr_det] [--settings static,weights] [--no-write]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from benchmarks import harness
from benchmarks.zoo import evaluate, outputs
from benchmarks.zoo_models import Entry, entry
from benchmarks.zoo_tools import INT8, VERIFY_CAP_BYTES, VERIFY_CAP_ROWS

MODELS = ("effnet_lite0", "ocr_det", "ocr_cls", "ocr_rec", "digits_cnn", "light_resnet50", "light_squeezenet")
LOOSE = "budget-min-sqnr=-100,budget-min-cosine=0"
SETTINGS = {
    "static": "cleanup,quantize-static{{bias-correction={bc}}}",
    "static all-int8": f"cleanup,quantize-static{{{{search=false,{LOOSE},bias-correction={{bc}}}}}}",
    "weights": f"cleanup,quantize-weights{{{{gather=true,{INT8},bias-correction={{bc}}}}}}",
    "weights all-int8": f"cleanup,quantize-weights{{{{gather=true,search=false,{LOOSE},bias-correction={{bc}}}}}}",
    "dynamic": "cleanup,quantize-dynamic{{bias-correction={bc}}}",
    "int4 all": f"cleanup,quantize-weights{{{{bits=4,rounding=gptq,search=false,{LOOSE},bias-correction={{bc}}}}}}",
}
DEFAULT_SETTINGS = ("static", "static all-int8", "weights", "weights all-int8")
QUICK = (["digits_cnn"], ["static all-int8", "weights all-int8"])


def run_one(e: Entry, setting: str, bc: bool, tmp: Path, reference: list[dict], original: onnx.ModelProto) -> dict[str, Any]:
    import graphopt

    pipeline = SETTINGS[setting].format(bc="true" if bc else "false")
    verify = e.calib
    if e.path.stat().st_size > VERIFY_CAP_BYTES:  # as the zoo does
        verify = [{k: v[:VERIFY_CAP_ROWS] for k, v in s.items()} for s in e.calib[:2]]
    t0 = time.perf_counter()
    model, report = graphopt.optimize(e.path, pipeline, inputs=verify, calibration=e.calib, on_violation="rollback")
    seconds = time.perf_counter() - t0
    dst = tmp / f"{e.name}_{setting.replace(' ', '_')}_{bc}.onnx"
    graphopt.save(model, dst)
    row: dict[str, Any] = {"model": e.name, "setting": setting, "bias_correction": bc, "seconds": round(seconds, 1)}
    row.update(evaluate(e, setting, dst, reference, original))
    quant = [r for r in report.records if r.name.startswith("quantize-")]
    stats = quant[-1].stats if quant else {}
    row["verdict"] = quant[-1].verdict if quant else "missing"
    row["kept_float"] = stats.get("kept_float_sensitivity", stats.get("kept_float", 0))
    row["corrected"] = stats.get("bias_corrected", 0)
    row["size_ratio"] = round(row["bytes"] / e.path.stat().st_size, 4)
    if row.get("sqnr_db") is not None:
        row["sqnr_db"] = round(row["sqnr_db"], 2)
    if isinstance(row.get("metric"), float):
        row["metric"] = round(row["metric"], 4)
    dst.unlink()
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits_cnn, all-int8 settings only (smoke test)")
    ap.add_argument("--models", help="comma-separated model names (default: " + ",".join(MODELS) + ")")
    ap.add_argument("--settings", help="comma-separated settings: " + ", ".join(SETTINGS))
    ap.add_argument("--no-write", action="store_true", help="print only, don't write benchmarks/results/")
    args = ap.parse_args(argv)
    models, settings = QUICK if args.quick else (list(MODELS), list(DEFAULT_SETTINGS))
    models = args.models.split(",") if args.models else models
    settings = args.settings.split(",") if args.settings else settings
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            e = entry(name)
            reference = outputs(e.path, e.scored, "exact")
            original = onnx.load(e.path)
            for setting in settings:
                for bc in (False, True):
                    row = run_one(e, setting, bc, Path(tmp), reference, original)
                    rows.append(row)
                    print(f"{name:18s} {setting:18s} bc={bc!s:5s} sqnr={row.get('sqnr_db')} size={row['size_ratio']} kept={row['kept_float']} "
                          f"corrected={row['corrected']} {e.metric}={row.get('metric')} ({row['verdict']}, {row['seconds']} s)", flush=True)  # fmt: skip
    table = report_md(rows)
    print(table)
    if not args.no_write:
        harness.write_results("bias_correction", rows, table)
    return rows


NOTES = """# Bias correction on and off (`python -m benchmarks.bias_correction`)

`sqnr_db`: worst output's SQNR on the scored data at ORT's default level; `size_ratio`: file size
over the original's; `kept_float`: layers the sensitivity search kept in float; `corrected`: layers
whose bias was corrected; `metric`: the zoo's task metric (effnet_lite0 top-1 agreement with the
float model, ocr_det text IoU, ocr_cls/digits accuracy, ocr_rec CER (lower is better), light
models: SQNR). `static`/`weights`: the passes as the zoo runs them (budget 20 dB / 0.99 on
calibration rows, search on); `all-int8`: `search=false`, every layer quantized."""


def report_md(rows: list[dict[str, Any]]) -> str:
    columns = ["model", "setting", "bias_correction", "sqnr_db", "size_ratio", "kept_float", "corrected", "metric", "verdict", "seconds"]
    return NOTES + "\n\n" + harness.markdown_table(rows, columns)


if __name__ == "__main__":
    main()
