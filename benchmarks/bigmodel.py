"""Models past protobuf's 2 GB limit: peak memory of ``graphopt optimize`` against the weight bytes.

Builds (in a temp dir) an MLP of ``--layers`` MatMuls of ``--dim`` x ``--dim`` float32 weights with
external data (default 9 x 8192^2 x 4 B = 2.42 GB), written in chunks so the builder itself stays
small. The weights are low rank plus noise, so ``svd-split`` has something to find, and the graph
carries Dropout/Identity nodes and a dead branch for ``cleanup``. Each pipeline runs through the
CLI in a child process; its peak RSS comes from ``os.wait4`` (the kernel's high-water mark, file-
backed pages of memory-mapped weights included). Goal for lossless pipelines: peak RSS <= 1.5x
the weight bytes.

    python -m benchmarks.bigmodel [--quick] [--layers 9] [--dim 8192] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh
from onnx import TensorProto

from benchmarks.harness import markdown_table, write_results

GRAPHOPT = str(Path(sys.executable).parent / "graphopt")
RANK = 64
ALIGN = 4096


def build(path: Path, layers: int, dim: int, seed: int = 0) -> int:
    """Write ``path`` and ``path.data``; returns the weight bytes."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    inits, nodes = [], []
    offset = 0
    with open(path.parent / data_name, "wb") as f:
        for i in range(layers):
            u = rng.standard_normal((dim, RANK), dtype=np.float32) / np.float32(np.sqrt(dim))
            v = rng.standard_normal((RANK, dim), dtype=np.float32) / np.float32(np.sqrt(RANK))
            f.seek(offset)
            rows = max(1, (64 << 20) // (dim * 4))  # 64 MB at a time
            for r in range(0, dim, rows):
                block = u[r : r + rows] @ v
                block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(1e-3 / np.sqrt(dim))
                f.write(block.astype(np.float32).tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim], data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(dim * dim * 4))):
                t.external_data.add(key=key, value=value)
            inits.append(t)
            offset += -(-(dim * dim * 4) // ALIGN) * ALIGN
            h_in = "x" if i == 0 else f"a{i - 1}"
            nodes.append(oh.make_node("MatMul", [h_in, f"w{i}"], [f"m{i}"]))
            nodes.append(oh.make_node("Dropout", [f"m{i}"], [f"d{i}"]))
            nodes.append(oh.make_node("Identity", [f"d{i}"], [f"id{i}"]))
            nodes.append(oh.make_node("Relu" if i < layers - 1 else "Identity", [f"id{i}"], [f"a{i}" if i < layers - 1 else "y"]))
    inits.append(onnx.numpy_helper.from_array(np.ones((dim,), np.float32), "unused_bias"))
    nodes.append(oh.make_node("Add", ["x", "unused_bias"], ["dead"]))
    graph = oh.make_graph(
        nodes, "big", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])], [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])], inits
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))
    return layers * dim * dim * 4


def run_cli(args: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``graphopt`` in a child; exit code, wall time and the child's peak RSS in bytes."""
    start = time.perf_counter()
    with open(cwd / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([GRAPHOPT, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "exit": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss": usage.ru_maxrss * 1024,
        "stderr": (cwd / "stderr.txt").read_text()[-500:],
    }


def pipelines(svd_layers: int) -> dict[str, str]:
    """What runs, by label. A full SVD of an 8192x8192 matrix takes minutes on 2 cores, so svd-split
    is limited to the first ``svd_layers`` weights (0 = all)."""
    svd = "svd-split" if svd_layers == 0 else "svd-split{include=[" + ",".join(f"w{i}" for i in range(svd_layers)) + "]}"
    return {
        "lossless": "lift-constants,remove-dropout,remove-identity,dce",
        "cleanup": "cleanup",
        "svd-split": svd,
        "quantize-weights": "quantize-weights",
        "all": f"cleanup,{svd},quantize-weights",
    }


def available(pipeline: str) -> bool:
    from graphopt.errors import GraphoptError
    from graphopt.pipeline import parse_pipeline

    try:
        parse_pipeline(pipeline)
    except GraphoptError:
        return False
    return True


def lossless(pipeline: str) -> bool:
    from graphopt.pipeline import parse_pipeline
    from graphopt.registry import all_passes

    def flat(elements: Any) -> list[Any]:
        return [p for e in elements for p in (flat(e.body) if hasattr(e, "body") else [e])]

    return all(all_passes()[p.name].lossless for p in flat(parse_pipeline(pipeline)))


def baseline_rss(workdir: Path) -> int:
    """Peak RSS of the same command on a 3x8x8 model: the interpreter, onnx, onnxruntime and numpy."""
    tiny = workdir / "tiny"
    tiny.mkdir(exist_ok=True)
    build(tiny / "tiny.onnx", 3, 8)
    r = run_cli(["optimize", str(tiny / "tiny.onnx"), "-o", str(tiny / "o.onnx"), "-p", "cleanup", "-q"], tiny)
    shutil.rmtree(tiny)
    return int(r["peak_rss"])


def measure(workdir: Path, layers: int, dim: int, chosen: dict[str, str]) -> list[dict[str, Any]]:
    model = workdir / "big.onnx"
    weight_bytes = build(model, layers, dim)
    base = baseline_rss(workdir)
    rows = []
    for label, pipeline in chosen.items():
        if not available(pipeline):
            rows.append({"pipeline": label, "status": "not registered"})
            continue
        out = workdir / f"out-{label}"
        out.mkdir(exist_ok=True)
        report = out / "report.json"
        r = run_cli(["optimize", str(model), "-o", str(out / "o.onnx"), "-p", pipeline, "--report", str(report), "-q"], out)
        row: dict[str, Any] = {
            "pipeline": label,
            "text": pipeline,
            "lossless": lossless(pipeline),
            "layers": layers,
            "dim": dim,
            "weight_bytes": weight_bytes,
            "exit": r["exit"],
            "seconds": r["seconds"],
            "peak_rss_bytes": r["peak_rss"],
            "peak_rss_gb": round(r["peak_rss"] / 1e9, 3),
            "rss_over_weights": round(r["peak_rss"] / weight_bytes, 3),
            "baseline_rss_bytes": base,
            "net_rss_over_weights": round((r["peak_rss"] - base) / weight_bytes, 3),
        }
        if report.exists():
            summary = json.loads(report.read_text())["summary"]
            row.update(verified=summary["verified"], bytes_out=summary["bytes"][1], bytes_ratio=summary["bytes_ratio"], nodes=summary["nodes"])
            row["output_files_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("o.onnx"))
        if r["exit"] != 0:
            row["error"] = r["stderr"].strip().splitlines()[-1] if r["stderr"].strip() else ""
        rows.append(row)
        shutil.rmtree(out)
    return rows


COLUMNS = ["pipeline", "lossless", "weight_bytes", "exit", "verified", "seconds", "peak_rss_gb", "rss_over_weights", "net_rss_over_weights", "bytes_ratio"]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 layers of 1024x1024 (12 MB), nothing written to results/")
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--pipelines", default=",".join(pipelines(1)), help="comma-separated subset of " + ",".join(pipelines(1)))
    parser.add_argument("--svd-layers", type=int, default=1, help="svd-split only the first N weights (0 = all; each 8192^2 SVD takes minutes)")
    parser.add_argument("--keep", metavar="DIR", help="build in DIR and keep it (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    layers, dim = (3, 1024) if args.quick else (args.layers, args.dim)
    chosen = {k: pipelines(args.svd_layers)[k] for k in args.pipelines.split(",")}
    need = layers * dim * dim * 4 * 3
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="graphopt-big-"))
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"need {need / 1e9:.1f} GB free in {workdir}, have {free / 1e9:.1f} GB")
    try:
        rows = measure(workdir, layers, dim, chosen)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    table = markdown_table(rows, COLUMNS)
    print(table)
    if not args.quick:
        write_results("bigmodel", rows, table, extra={"goal": "peak RSS <= 1.5x weight bytes for lossless pipelines"})
    return rows


if __name__ == "__main__":
    main()
