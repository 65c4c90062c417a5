"""What every benchmark shares: latency (median of repeats), accuracy, error figures, machine facts.

Benchmarks compare tools in one run on one machine; machines are noisy, so they report ratios
and medians, never single timings.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from graphopt.metrics import compare_outputs, worst

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 1
"""intra-op threads for every latency figure (fixed, so ratios compare like with like)."""


def session(path: str | Path, *, level: str = "deploy") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "deploy" else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ms(path: str | Path, feed: dict[str, np.ndarray], *, warmup: int = 5, repeats: int = 30, min_seconds: float = 0.5) -> float:
    """Median wall time of one ``run`` at ORT's default optimization level."""
    sess = session(path)
    for _ in range(warmup):
        sess.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times) * 1e3


def latency_ratios(paths: dict[str, Path], feed: dict[str, np.ndarray], *, rounds: int = 3, **kw: Any) -> dict[str, float]:
    """Median latency per model, measured interleaved over ``rounds`` so drift hits all alike."""
    per: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, p in paths.items():
            per[k].append(latency_ms(p, feed, **kw))
    return {k: statistics.median(v) for k, v in per.items()}


def add_latency_columns(rows: list[dict[str, Any]], feed: dict[str, np.ndarray], batches: Sequence[int] = (1, 64), **kw: Any) -> None:
    """``lat_b<N>`` (ratio to ``rows[0]``, the original) and ``lat_b<N>_ms`` for each row's ``path``."""
    for batch in batches:
        paths = {str(i): r["path"] for i, r in enumerate(rows)}
        lat = latency_ratios(paths, {k: v[:batch] for k, v in feed.items()}, **kw)
        for i, r in enumerate(rows):
            r[f"lat_b{batch}"] = round(lat[str(i)] / lat["0"], 3)
            r[f"lat_b{batch}_ms"] = round(lat[str(i)], 4)


def outputs(path: str | Path, samples: Sequence[dict[str, np.ndarray]], level: str = "deploy") -> list[dict[str, np.ndarray]]:
    sess = session(path, level=level)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, s))) for s in samples]


def error_figures(reference: Sequence[dict[str, np.ndarray]], got: Sequence[dict[str, np.ndarray]]) -> dict[str, float | None]:
    """SQNR/cosine/max-abs over all outputs shared by both (worst output)."""
    common = [n for n in reference[0] if n in got[0]]
    w = worst(compare_outputs([{n: r[n] for n in common} for r in reference], [{n: g[n] for n in common} for g in got]))
    if w is None:
        return {"sqnr_db": None, "cosine": None, "max_abs": None}
    return {"sqnr_db": None if np.isinf(w.sqnr_db) else round(w.sqnr_db, 2), "cosine": w.cosine, "max_abs": w.max_abs}


def accuracy(outs: Sequence[dict[str, np.ndarray]], labels: np.ndarray, output: str | None = None) -> float:
    """Top-1 accuracy of argmax over the last axis of ``output`` (first output by default)."""
    preds = np.concatenate([np.asarray(o[output or next(iter(o))]).argmax(-1).reshape(-1) for o in outs])
    return float(np.mean(preds == np.asarray(labels).reshape(-1)))


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    flags: list[str] = []
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    keep = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c", "sse4_2")]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": keep,
        "vnni": any("vnni" in f for f in flags),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "threads": THREADS,
    }


def write_results(name: str, rows: list[dict[str, Any]], table_md: str, extra: dict[str, Any] | None = None) -> Path:
    """``results/<name>.json`` (machine + rows) and ``results/<name>.md`` (the printed table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), **(extra or {}), "rows": rows}, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(table_md + "\n")
    return RESULTS / f"{name}.json"


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
