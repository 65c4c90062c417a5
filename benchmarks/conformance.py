"""The ``cleanup`` preset on every onnx node conformance case onnxruntime can run: no crash, no changed output.

Each case of ``onnx.backend.test.case.node.collect_testcases()`` is a one-op model with its test
inputs. Cases whose inputs are not tensors (sequences, optionals) are counted apart; so are cases
onnxruntime can't load or run (the verifier needs it). Every other case goes through
``graphopt.optimize(model, "cleanup", inputs=<its inputs>)``: it must finish, verify at both ORT
levels, and its optimized model must give bit-identical outputs to the original at
``ORT_DISABLE_ALL`` (checked again here, outside the verifier). Counts go to
``benchmarks/results/conformance.json``; the failures are listed by case.

    python -m benchmarks.conformance [--quick] [--pipeline TEXT] [--workers N]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import sys
import time
import warnings
from typing import Any

import numpy as np
import onnx

from benchmarks.harness import markdown_table, write_results


def pipeline_default() -> str:
    from graphopt.registry import presets

    return "cleanup" if "cleanup" in presets() else "lift-constants,dce"


def _feed(case: Any) -> tuple[dict[str, np.ndarray] | None, str]:
    """The first data set as a feed keyed by graph input name; None and why when it holds non-tensors."""
    if not case.data_sets:
        return None, "no data"
    initializers = {t.name for t in case.model.graph.initializer}
    names = [i.name for i in case.model.graph.input if i.name not in initializers]
    values = case.data_sets[0][0]
    if len(values) != len(names):
        return None, "inputs don't match the graph"
    feed = {}
    for name, value in zip(names, values):
        if isinstance(value, onnx.TensorProto):
            value = onnx.numpy_helper.to_array(value)
        if isinstance(value, (list, type(None), onnx.SequenceProto, onnx.OptionalProto)) or not hasattr(value, "dtype"):
            return None, "non-tensor input"
        feed[name] = np.asarray(value)
    for output in case.model.graph.output:
        if not output.type.HasField("tensor_type"):
            return None, "non-tensor output"
    return feed, ""


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == object:
        return a.tolist() == b.tolist()
    bits = lambda x: np.ascontiguousarray(x).reshape(-1).view(np.uint8)  # noqa: E731 - NaN == NaN, -0.0 != 0.0
    return bool(np.array_equal(bits(a), bits(b)))


def run_case(name: str, model_bytes: bytes, feed: dict[str, np.ndarray], pipeline: str) -> dict[str, Any]:
    """One case: ``ran`` (+ modified, passes that changed it), ``skipped_ort`` or ``failed`` with the reason."""
    import onnx_ir as ir

    import graphopt
    from graphopt import sparse
    from graphopt.errors import GraphoptError
    from graphopt.verify import OrtFailure, run

    out: dict[str, Any] = {"case": name}
    try:
        model = sparse.from_proto(onnx.ModelProto.FromString(model_bytes))
    except Exception as e:  # noqa: BLE001
        return {**out, "status": "skipped_ir", "reason": f"onnx_ir can't read it: {type(e).__name__}: {e}"[:200]}
    try:
        reference = run(model, [feed], "exact")
        run(model, [feed], "deploy")
    except OrtFailure as e:
        return {**out, "status": "skipped_ort", "reason": str(e)[:200]}
    try:
        result, report = graphopt.optimize(model, pipeline, inputs=[feed])
    except GraphoptError as e:
        return {**out, "status": "failed", "reason": f"{type(e).__name__}: {e}"[:300]}
    except Exception as e:  # noqa: BLE001 - a crash is exactly what this sweep looks for
        return {**out, "status": "failed", "reason": f"crash: {type(e).__name__}: {e}"[:300]}
    bad = [f"{r.name}: {r.verdict} {r.unverified or '; '.join(r.violations)}" for r in report.records if r.verdict not in ("ok", "unchanged")]
    if report.verification != "on" or bad:
        return {**out, "status": "failed", "reason": (report.verification if report.verification != "on" else bad[0])[:300]}
    changed = [r.name for r in report.records if r.modified]
    if changed:
        got = run(result, [feed], "exact")[0]
        diff = [k for k in reference[0] if k not in got or not _same(reference[0][k], got[k])]
        if diff:
            return {**out, "status": "failed", "reason": f"output '{diff[0]}' changed"}
        ir.to_proto(result)  # serializes
    return {**out, "status": "ran", "modified": bool(changed), "passes": sorted(set(changed)), "nodes": [report.original.nodes, report.final.nodes]}


def _worker(args: tuple[str, bytes, dict[str, np.ndarray], str]) -> dict[str, Any]:
    warnings.simplefilter("ignore")
    return run_case(*args)


def sweep(pipeline: str, *, quick: bool = False, workers: int = 1, limit: int | None = None, op_types: list[str] | None = None) -> dict[str, Any]:
    from onnx.backend.test.case.node import collect_testcases

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators overflow casts on purpose
        # Always collect everything: onnx's collector imports its case modules once, so a first call
        # filtered by op type would leave later unfiltered calls with only those cases.
        cases = list(collect_testcases())
    if op_types:
        cases = [c for c in cases if any(node.op_type in op_types for node in c.model.graph.node)]
    if quick:
        cases = cases[::15]
    if limit:
        cases = cases[:limit]
    results, jobs = [], []
    for case in cases:
        feed, why = _feed(case)
        if feed is None:
            results.append({"case": case.name, "status": "skipped_non_tensor", "reason": why})
        else:
            jobs.append((case.name, case.model.SerializeToString(), feed, pipeline))
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            results += list(pool.map(_worker, jobs, chunksize=8))
    else:
        results += [_worker(job) for job in jobs]
    counts = collections.Counter(r["status"] for r in results)
    by_pass = collections.Counter(p for r in results if r["status"] == "ran" for p in r["passes"])
    return {
        "pipeline": pipeline,
        "cases": len(cases),
        "ran": counts["ran"],
        "modified": sum(1 for r in results if r.get("modified")),
        "skipped_ort": counts["skipped_ort"],
        "skipped_non_tensor": counts["skipped_non_tensor"],
        "skipped_ir": counts["skipped_ir"],
        "failed": counts["failed"],
        "modified_by_pass": dict(by_pass.most_common()),
        "failures": sorted((r for r in results if r["status"] == "failed"), key=lambda r: r["case"]),
        "skipped": sorted((r for r in results if r["status"].startswith("skipped")), key=lambda r: r["case"]),
        "seconds": round(time.perf_counter() - start, 1),
        "quick": quick,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every 15th case only (smoke test); results are not written")
    parser.add_argument("--pipeline", default=None, help="pipeline text (default: the cleanup preset)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    summary = sweep(args.pipeline or pipeline_default(), quick=args.quick, workers=args.workers)
    keys = ["pipeline", "cases", "ran", "modified", "skipped_ort", "skipped_non_tensor", "skipped_ir", "failed", "seconds"]
    table = markdown_table([summary], keys)
    print(table)
    for f in summary["failures"][:30]:
        print(f"FAILED {f['case']}: {f['reason']}")
    if not args.quick:
        rows = summary.pop("failures") + summary.pop("skipped")
        write_results("conformance", rows, table, extra={"summary": summary})
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
