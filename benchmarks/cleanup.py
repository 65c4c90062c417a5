"""graphopt's `cleanup` against onnxsim, onnxslim, onnxoptimizer and onnxscript's optimizer.

    python -m benchmarks.cleanup            # every light model of onnx + models/*.onnx; writes results/cleanup.{json,md}
    python -m benchmarks.cleanup --quick    # two small trained models; prints only

Every tool runs on the same models in one process, with its default settings. Per model and tool:
nodes after (subgraphs included), saved file bytes, ORT CPU latency as a ratio to the original
(default optimization level, one thread, median of interleaved rounds), the largest output error
against the original (both at graphopt's exact level: ``ORT_DISABLE_ALL`` without weight prepacking, so
ORT's own rewrites don't blur it), and
what went wrong: a crash, a model the checker rejects (``full_check``), a changed signature
(onnx's light models are IR 3: every weight is listed as a graph input, and some tools drop those
inputs), or outputs ORT can't produce.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from benchmarks import harness
from graphopt.data import generate, load_npz

ROOT = Path(__file__).resolve().parent.parent
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
QUICK = ("digits_cnn", "digits_mlp_wide")
TOOLS = ("graphopt", "onnxsim", "onnxslim", "onnxoptimizer", "onnxscript")
COLUMNS = ["model", "tool", "nodes", "bytes", "latency", "max_abs", "seconds", "status"]


def _graphopt(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    import graphopt

    out, report = graphopt.optimize(model, "cleanup", inputs=samples)
    if not report.verified:
        raise RuntimeError("graphopt could not verify its result")
    return ir.to_proto(out)


def _onnxsim(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    import onnxsim

    out, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    return out


def _onnxslim(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    import onnxslim

    out = onnxslim.slim(model)
    if out is None:
        raise RuntimeError("onnxslim returned None")
    return out


def _onnxoptimizer(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model)


def _onnxscript(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)


RUNNERS: dict[str, Callable[[onnx.ModelProto, list[dict[str, np.ndarray]]], onnx.ModelProto]] = {
    "graphopt": _graphopt,
    "onnxsim": _onnxsim,
    "onnxslim": _onnxslim,
    "onnxoptimizer": _onnxoptimizer,
    "onnxscript": _onnxscript,
}


def model_paths(quick: bool) -> list[Path]:
    trained = sorted((ROOT / "models").glob("*.onnx"))
    if quick:
        return [p for p in trained if p.stem in QUICK]
    return sorted(LIGHT.glob("*.onnx")) + trained


def samples_for(path: Path) -> list[dict[str, np.ndarray]]:
    model = ir.load(path)
    npz = path.with_name(path.stem + "_test.npz")
    if npz.exists():
        samples, _ = load_npz(npz, model)
        return [{k: v[:16] for k, v in s.items()} for s in samples[:1]]
    return generate(model, samples=2)


def count_nodes(model: onnx.ModelProto) -> int:
    def count(graph: onnx.GraphProto) -> int:
        n = 0
        for node in graph.node:
            n += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    n += count(attr.g)
                n += sum(count(g) for g in attr.graphs)
        return n

    return count(model.graph)


def signature(model: onnx.ModelProto) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    def io(values: Any) -> list[tuple[str, int]]:
        return [(v.name, v.type.tensor_type.elem_type) for v in values]

    return io(model.graph.input), io(model.graph.output)


def measure(path: Path, tmp: Path, latency_rounds: int) -> list[dict[str, Any]]:
    original = onnx.load(path)
    samples = samples_for(path)
    reference = exact_outputs(path, samples)
    files = {"original": path}
    rows = [
        {"model": path.stem, "tool": "original", "nodes": count_nodes(original), "bytes": path.stat().st_size, "latency": 1.0, "max_abs": 0.0, "status": "ok"}
    ]
    for tool in TOOLS:
        row: dict[str, Any] = {"model": path.stem, "tool": tool}
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = RUNNERS[tool](onnx.load(path), samples)
        except Exception as e:  # a crash is a result
            row.update(status=f"crash: {type(e).__name__}: {' '.join(str(e).split())[:120]}", seconds=round(time.perf_counter() - start, 2))
            rows.append(row)
            continue
        row["seconds"] = round(time.perf_counter() - start, 2)
        target = tmp / f"{path.stem}.{tool}.onnx"
        onnx.save(out, target)
        row.update(nodes=count_nodes(out), bytes=target.stat().st_size)
        problems = []
        try:
            onnx.checker.check_model(str(target), full_check=True)
        except Exception as e:
            problems.append(f"invalid: {' '.join(str(e).split())[:100]}")
        (ins0, outs0), (ins1, outs1) = signature(original), signature(out)
        if outs0 != outs1:
            problems.append("outputs changed")
        if ins0 != ins1:
            dropped = len({n for n, _ in ins0} - {n for n, _ in ins1})
            problems.append(f"dropped {dropped} graph inputs" if dropped else "inputs changed")
        try:
            got = exact_outputs(target, [{k: v for k, v in s.items() if k in {n for n, _ in ins1}} for s in samples])
            row["max_abs"] = harness.error_figures(reference, got)["max_abs"]
            files[tool] = target
        except Exception as e:
            problems.append(f"ORT fails: {' '.join(str(e).split())[:100]}")
        row["status"] = "; ".join(problems) or "ok"
        rows.append(row)
    feed = {k: v for k, v in samples[0].items()}
    ratios = latency(files, feed, latency_rounds)
    for row in rows:
        if row["tool"] in ratios:
            row["latency"] = round(ratios[row["tool"]] / ratios["original"], 3)
    return rows


def exact_outputs(path: Path, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs at graphopt's exact level: no graph optimization and no weight prepacking (a prepacked
    constant weight sums in another order than the same weight computed in the graph)."""
    import onnxruntime as ort

    from graphopt.verify import session_options

    session = ort.InferenceSession(str(path), session_options("exact", threads=1), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, s))) for s in samples]


def latency(files: dict[str, Path], feed: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    """Medians per tool; heavy models get fewer repeats (the ratio is what is reported)."""
    once = time.perf_counter()
    harness.latency_ms(files["original"], feed, warmup=1, repeats=1, min_seconds=0.0)
    seconds = time.perf_counter() - once
    repeats = max(3, min(30, int(1.0 / max(seconds, 1e-4))))
    return harness.latency_ratios(files, feed, rounds=rounds, warmup=2, repeats=repeats, min_seconds=min(0.3, 10 * seconds))


def nodes_table(rows: list[dict[str, Any]]) -> str:
    """Model x tool node counts; a mark where the output is not a drop-in replacement."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    tools = ["original", *TOOLS]
    lines = ["| model | " + " | ".join(tools) + " |", "|" + "---|" * (len(tools) + 1)]
    for m in models:
        cells = []
        for t in tools:
            r = next((r for r in rows if r["model"] == m and r["tool"] == t), None)
            if r is None or r.get("nodes") is None:
                cells.append("crash")
                continue
            mark = "" if r["status"] == "ok" else " *"
            cells.append(f"{r['nodes']}{mark}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small trained models; prints only")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        for path in model_paths(args.quick):
            print(f"{path.stem} ...", flush=True)
            rows += measure(path, Path(tmp), 1 if args.quick else args.rounds)
    table = "### Nodes after (* = not a drop-in: see status)\n\n" + nodes_table(rows)
    table += "\n\n### All figures\n\n" + harness.markdown_table(rows, COLUMNS)
    print(table)
    if not args.quick:
        print("wrote", harness.write_results("cleanup", rows, table, {"tools": tool_versions()}))
    return rows


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("graphopt", "onnxsim", "onnxslim", "onnxoptimizer", "onnxscript", "onnx", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


if __name__ == "__main__":
    main()
