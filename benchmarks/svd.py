"""svd-split on the trained models: kept-parameter sweep, plain vs data-aware vs uniform ranks.

    python -m benchmarks.svd            # full sweep, writes benchmarks/results/svd.{json,md,png}
    python -m benchmarks.svd --quick    # smallest model, two ratios; prints only

Rows per model: the original, then svd-split at each kept-parameter ratio in three modes:
``plain`` (``global-ratio=R``: one budget, ranks spread by output error per parameter, plain SVD),
``data-aware`` (the same with whitened SVD) and ``uniform`` (``ratio=R`` in every layer, plain SVD).
Every MatMul/Gemm/pointwise-Conv weight that can save is eligible (``min-params=0``).

Calibration never overlaps the scored samples. The digits models were trained on sklearn's bundled
digits with an 80/20 split; the calibration set is 512 images of the training part (rebuilt here
with the same preprocessing and checked to give exactly the stored test split), and every figure
is measured on the 360 test images. seq_transformer's data is synthetic with no training split
stored: its first 500 test sequences calibrate, the other 1500 are scored.

Latency: ORT CPU at its default optimization level, one intra-op thread, median of interleaved
rounds, as a ratio to the original, at batch 1 and batch 64.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: idle BLAS threads spinning on 2 shared cores
os.environ.setdefault("OMP_NUM_THREADS", "1")  # slow SVDs 10x and disturb the latency figures

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from benchmarks import harness
from graphopt.data import load_npz
from graphopt.activations import capture
from graphopt.edit import NameSet, add_initializer, bypass, constant_array, drop_if_unused, is_onnx_op
from graphopt.layers import linear_layers
from graphopt.passbase import Calibration
from graphopt.passes.lowrank import SvdSplit

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
RATIOS = (1.0, 0.75, 0.5, 0.35, 0.25)
MODES = ("plain", "data-aware", "uniform")
ALL_MODELS = ("digits_skl_mlp", "digits_cnn", "digits_mlp_wide", "seq_transformer")
COLUMNS = ["model", "mode", "target", "kept", "linear_kept", "macs", "bytes", "lat_b1", "lat_b64", "sqnr_db", "cosine", "accuracy", "acc_delta"]


def digits_train(side: int) -> np.ndarray:
    """The training images of the split the digits models were trained on (models/_common.py)."""
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    if side != 8:
        images = np.clip(zoom(images, (1, side / 8, side / 8), order=1), 0.0, 1.0).astype(np.float32)
    x_train, x_test, _, _ = train_test_split(images, digits.target, test_size=0.2, stratify=digits.target, random_state=0)
    return x_train, x_test


def dataset(name: str, model: ir.Model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, str]:
    """(calibration feed, scored feed, scored labels, how the calibration set was made)."""
    samples, labels = load_npz(MODELS / f"{name}_test.npz", model)
    feed = samples[0]
    if name.startswith("digits"):
        key = next(iter(feed))
        side = 8 if name == "digits_skl_mlp" else 16
        train, test = digits_train(side)
        shape = feed[key].shape[1:]
        if not np.array_equal(test.reshape(len(test), *shape), feed[key]):
            raise SystemExit(f"{name}: the rebuilt test split differs from the stored one; cannot trust the training split")
        pick = np.random.default_rng(0).choice(len(train), 512, replace=False)
        return {key: train[pick].reshape(512, *shape)}, feed, labels, "512 training images (disjoint from the 360 scored)"
    n = len(labels) // 4
    return {k: v[:n] for k, v in feed.items()}, {k: v[n:] for k, v in feed.items()}, labels[n:], f"first {n} test sequences; the other {len(labels) - n} scored"


def fold_weight_transposes(model: ir.Model) -> int:
    """Transpose(initializer) -> a transposed initializer (PyTorch exports Linear as MatMul(x, Wᵀ))."""
    names, count = NameSet(model), 0
    for node in list(model.graph):
        w = constant_array(node.inputs[0]) if is_onnx_op(node, "Transpose") else None
        if w is None:
            continue
        perm = node.attributes.get_ints("perm", list(range(w.ndim))[::-1])
        new = add_initializer(model.graph, np.ascontiguousarray(np.transpose(w, perm)), f"{node.inputs[0].name}_t", names)
        old = node.inputs[0]
        if bypass(node, 0, new):
            model.graph.remove(node, safe=True)
            drop_if_unused(old)
            count += 1
    return count


def macs(model: ir.Model, feed: dict[str, np.ndarray]) -> int:
    """Multiply-adds of every MatMul, Gemm and Conv on ``feed`` (shapes measured with onnxruntime)."""
    nodes = [n for n in model.graph if is_onnx_op(n, ("MatMul", "Gemm", "Conv"))]
    names = sorted({v.name for n in nodes for v in (n.inputs[0], n.inputs[1], n.outputs[0])} - set(model.graph.initializers))
    shapes = {k: v[0].shape for k, v in capture(model, [feed], names).items()}
    total = 0
    for n in nodes:
        a, b, out = (shapes.get(v.name) or tuple(v.const_value.shape.dims) for v in (n.inputs[0], n.inputs[1], n.outputs[0]))
        if n.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(b[1:]))
        elif n.op_type == "Gemm":
            total += int(np.prod(out)) * (a[0] if n.attributes.get_int("transA", 0) else a[-1])
        else:
            total += int(np.prod(out)) * (a[-1] if len(a) > 1 else a[0])
    return total


def linear_params(model: ir.Model) -> int:
    return sum(layer.tensor.size for layer in linear_layers(model))


def prediction(name: str) -> tuple[str | None, str]:
    meta = MODELS / f"{name}.json"
    if meta.exists():
        p = json.loads(meta.read_text()).get("prediction", {})
        return p.get("output"), p.get("decode", "argmax")
    return None, "argmax"


def accuracy(outs: dict[str, np.ndarray], labels: np.ndarray, name: str) -> float:
    output, decode = prediction(name)
    value = outs[output or next(iter(outs))]
    pred = value if decode == "label" else value.argmax(-1)
    return float(np.mean(pred.reshape(-1) == labels.reshape(-1)))


def score_outputs(outs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float outputs only: an integer label output has no meaningful SQNR."""
    return {k: v for k, v in outs.items() if v.dtype.kind == "f"}


def run_model(name: str, ratios: tuple[float, ...], modes: tuple[str, ...], tmp: Path, quick: bool) -> list[dict[str, Any]]:
    model = ir.load(MODELS / f"{name}.onnx")
    folded = fold_weight_transposes(model)
    calib, feed, labels, how = dataset(name, model)
    base_path = tmp / f"{name}.onnx"
    ir.save(model, base_path)
    reference = harness.outputs(base_path, [feed])
    base_linear = linear_params(model)
    base_acc = accuracy(reference[0], labels, name)
    one = {k: v[:1] for k, v in feed.items()}
    base_macs = macs(model, one)
    rows = [{"model": name, "mode": "original", "target": 1.0, "kept": 1.0, "linear_kept": 1.0, "macs": 1.0, "macs_per_sample": base_macs, "bytes": base_path.stat().st_size,
             "sqnr_db": None, "cosine": 1.0, "accuracy": base_acc, "acc_delta": 0.0, "path": base_path, "calibration": how, "folded_transposes": folded}]
    for mode in modes:
        for ratio in ratios:
            work = model.clone()
            options: dict[str, Any] = {"min_params": 0}
            options.update({"ratio": ratio} if mode == "uniform" else {"global_ratio": ratio, "data_aware": mode == "data-aware"})
            p = SvdSplit(**options)
            p.calibration = Calibration(({k: v for k, v in calib.items()},))
            result = p(work)
            path = tmp / f"{name}-{mode}-{ratio}.onnx"
            ir.save(work, path)
            outs = harness.outputs(path, [feed])
            figures = harness.error_figures([score_outputs(reference[0])], [score_outputs(outs[0])])
            eligible = sum(r["params_before"] for r in result.layers)
            rows.append({
                "model": name, "mode": mode, "target": ratio,
                "kept": round(sum(r["params_after"] for r in result.layers) / eligible, 4) if eligible else 1.0,
                "linear_kept": round(linear_params(work) / base_linear, 4),
                "macs": round(macs(work, one) / base_macs, 4),
                "bytes": path.stat().st_size,
                "sqnr_db": figures["sqnr_db"], "cosine": round(figures["cosine"], 6) if figures["cosine"] is not None else None,
                "accuracy": accuracy(outs[0], labels, name),
                "acc_delta": round(100 * (accuracy(outs[0], labels, name) - base_acc), 2),
                "path": path, "layers": [{k: r[k] for k in ("layer", "shape", "rank", "params_before", "params_after") if k in r} | {"sqnr_db": r.get("sqnr_db")} for r in result.layers],
            })
    kw = {"repeats": 5, "min_seconds": 0.05, "rounds": 1} if quick else {"repeats": 30, "min_seconds": 0.3, "rounds": 3}
    harness.add_latency_columns(rows, feed, **kw)
    for r in rows:
        del r["path"]
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(4 * len(models), 7), squeeze=False)
    for col, name in enumerate(models):
        base = next(r for r in rows if r["model"] == name and r["mode"] == "original")
        for mode, style in zip(MODES, ("o-", "s-", "^--")):
            pts = sorted((r["kept"], r["accuracy"], r["sqnr_db"]) for r in rows if r["model"] == name and r["mode"] == mode)
            if not pts:
                continue
            axes[0][col].plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=mode)
            finite = [p for p in pts if p[2] is not None]
            axes[1][col].plot([p[0] for p in finite], [p[2] for p in finite], style, label=mode)
        axes[0][col].axhline(100 * base["accuracy"], color="gray", lw=0.8, ls=":")
        axes[0][col].axhline(100 * base["accuracy"] - 1, color="red", lw=0.6, ls=":")
        axes[0][col].set_title(name)
        axes[0][col].set_ylabel("accuracy (%)")
        axes[1][col].set_ylabel("output SQNR (dB)")
        axes[1][col].set_xlabel("parameters kept (factorizable layers)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.invert_xaxis()
        axes[0][col].legend(fontsize=8)
    fig.suptitle("svd-split: accuracy and output SQNR vs parameters kept (dotted red: original − 1 point)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


NOTES = """Columns: `target` the kept-parameter ratio asked for (`global-ratio` for plain/data-aware, per-layer
`ratio` for uniform); `kept` parameters kept in the factorizable layers; `linear_kept` in all MatMul/Gemm/Conv
weights; `macs` multiply-adds of all MatMul/Gemm/Conv (attention included) per sample vs the original;
`lat_b1`/`lat_b64` ORT CPU latency ratio vs the original (default optimization level, 1 thread, median of
interleaved rounds): rows with target 1 are the unchanged model and show the noise band of this shared
2-core machine; `sqnr_db`/`cosine` of the float outputs vs the original on the scored samples;
`acc_delta` in accuracy points. Calibration never overlaps the scored samples (see the JSON)."""


def goals(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        at = {(r["mode"], r["target"]): r for r in rows if r["model"] == name}
        for mode in ("plain", "data-aware"):
            if (r := at.get((mode, 0.5))) is not None:
                lines.append(f"{name} {mode} at 50%: accuracy {r['acc_delta']:+.2f} points, kept {r['kept']:.3f}, latency b64 x{r['lat_b64']}")
        gaps = [f"{t:g}: {at[('data-aware', t)]['sqnr_db'] - at[('plain', t)]['sqnr_db']:+.1f} dB" for t in RATIOS
                if ("plain", t) in at and ("data-aware", t) in at and at[("plain", t)]["sqnr_db"] is not None and at[("data-aware", t)]["sqnr_db"] is not None]
        if gaps:
            lines.append(f"{name} data-aware minus plain SQNR: " + ", ".join(gaps))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest model, ratios 1.0 and 0.5; prints only")
    parser.add_argument("--models", nargs="*", default=None, help="subset of " + ", ".join(ALL_MODELS))
    args = parser.parse_args(argv)
    names = args.models or (["digits_skl_mlp"] if args.quick else [m for m in ALL_MODELS if (MODELS / f"{m}_test.npz").exists()])
    ratios = (1.0, 0.5) if args.quick else RATIOS
    modes = ("plain", "data-aware") if args.quick else MODES
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-svd-") as tmp:
        for name in names:
            rows += run_model(name, ratios, modes, Path(tmp), args.quick)
    table = harness.markdown_table(rows, COLUMNS)
    summary = goals(rows)
    print(table)
    print("\n".join(summary))
    if not args.quick:
        notes = {"calibration": {r["model"]: r["calibration"] for r in rows if "calibration" in r}, "goals": summary}
        harness.write_results("svd", rows, "# svd-split sweep\n\n" + NOTES + "\n\n" + table + "\n\n" + "\n".join(f"- {s}" for s in summary), extra=notes)
        plot(rows, harness.RESULTS / "svd.png")
        print(f"wrote {harness.RESULTS / 'svd.json'}, svd.md, svd.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
