"""Shared helpers for the model build scripts: seeding, digits data, export, ORT measurement, json.

Torch is imported lazily so that the scikit-learn model builds without it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

MODELS_DIR = Path(__file__).resolve().parent
# Where builds publish; override to experiment without touching the committed files.
OUT_DIR = Path(os.environ.get("GRAPHOPT_MODELS_OUT", MODELS_DIR))
SEED = 0
NUM_THREADS = 2
TEST_SIZE = 0.2

# How to turn a model's outputs into predictions to compare with the npz `labels`:
#   "argmax": argmax over the last axis of `output` (logits or probabilities);
#   "label":  `output` already holds class ids.
ARGMAX = "argmax"
LABEL = "label"


def seed_everything(seed: int = SEED) -> None:
    """Seed python, numpy and (if installed) torch; torch on 2 threads, deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)


def digits_split(side: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's bundled digits (1797 8x8 images, offline), scaled to [0, 1], split 80/20 stratified.

    Returns x_train, x_test as float32 [N, side, side] (bilinear upsampling when side > 8)
    and y_train, y_test as int64. The split is the same for every model (random_state=SEED).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    if side != 8:
        from scipy.ndimage import zoom

        images = zoom(images, (1, side / 8, side / 8), order=1).astype(np.float32)
        images = np.clip(images, 0.0, 1.0)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=SEED
    )
    return x_train, x_test, y_train, y_test


def ort_session(path: Path | str):
    """An onnxruntime CPU session with all graph optimizations disabled (measures the graph as stored)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = NUM_THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_ort(path: Path | str, feeds: dict[str, np.ndarray], batch: int = 512) -> dict[str, np.ndarray]:
    """Run the model on `feeds` in batches along axis 0; returns every output, concatenated."""
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]
    n = len(next(iter(feeds.values())))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, n, batch):
        chunk = {k: v[start : start + batch] for k, v in feeds.items()}
        for name, value in zip(names, session.run(names, chunk)):
            parts[name].append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def predictions(outputs: dict[str, np.ndarray], prediction: dict[str, str]) -> np.ndarray:
    value = outputs[prediction["output"]]
    if prediction["decode"] == ARGMAX:
        return value.argmax(axis=-1)
    if prediction["decode"] == LABEL:
        return value
    raise ValueError(f"unknown decode {prediction['decode']!r}")


def load_npz(path: Path | str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The test split: the model's inputs by name, and the int64 `labels`."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    labels = arrays.pop("labels")
    return arrays, labels


def ort_accuracy(onnx_path: Path | str, npz_path: Path | str, prediction: dict[str, str]) -> float:
    """Accuracy of the stored .onnx on the stored test npz, measured with onnxruntime (no graph optimizations)."""
    feeds, labels = load_npz(npz_path)
    preds = predictions(run_ort(onnx_path, feeds), prediction)
    return float((preds == labels).mean())


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Op counts of the main graph, keyed `op_type` (or `domain:op_type` outside the default domain)."""
    counts = collections.Counter(
        f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node
    )
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def initializer_elements(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer))


def check_onnx(path: Path | str) -> onnx.ModelProto:
    """Load, refuse external data, and run the full checker (with strict shape inference)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"{path}: initializer {tensor.name} uses external data")
    onnx.checker.check_model(str(path), full_check=True)
    return model


def value_info_summary(values) -> list[dict[str, Any]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
                 for d in t.shape.dim]  # None: dynamic dim without a name
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
    return out


def opset_of(model: onnx.ModelProto) -> dict[str, int]:
    return {(o.domain or "ai.onnx"): o.version for o in model.opset_import}


# ---------------------------------------------------------------- torch export


def register_inference_dropout(opset: int) -> None:
    """Make the TorchScript exporter emit eval-mode `nn.Dropout` as an ONNX Dropout node.

    The stock symbolic (symbolic_opset12.dropout) drops an eval-mode dropout from the graph,
    and the dynamo exporter decomposes it away before translation. This custom symbolic emits
    `Dropout(x, ratio, training_mode=false)` (opset >= 12), which is the ONNX spelling of the same
    inference-time identity, so the graph keeps the node that graphopt's cleanup passes remove.
    """
    import torch
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "f", "b")
    def dropout(g, x, p, train):
        ratio = g.op("Constant", value_t=torch.tensor(p, dtype=torch.float32))
        training_mode = g.op("Constant", value_t=torch.tensor(bool(train)))
        return g.op("Dropout", x, ratio, training_mode)

    torch.onnx.register_custom_op_symbolic("aten::dropout", dropout, opset)


EXPORTER_TORCHSCRIPT = (
    "torch.onnx.export(dynamo=False, training=TrainingMode.EVAL, do_constant_folding=False) "
    "+ custom aten::dropout symbolic emitting Dropout(training_mode=false)"
)


def export_torch(
    model,
    example: tuple,
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> onnx.ModelProto:
    """Export an eval-mode torch model with the TorchScript exporter, keeping BatchNormalization and Dropout.

    do_constant_folding=False keeps BatchNormalization (folding would merge it into the Conv),
    and the custom symbolic keeps Dropout. Writes a single self-contained .onnx file.
    """
    import warnings

    import torch

    register_inference_dropout(opset)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated and says so
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            export_params=True,
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
    return check_onnx(path)


def torch_ort_max_abs_diff(model, onnx_path: Path, feeds: dict[str, np.ndarray], output: str) -> float:
    """Max |torch eval output - ORT output| over the given inputs (positional order = feed order)."""
    import torch

    model.eval()
    with torch.no_grad():
        expected = model(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    got = run_ort(onnx_path, feeds)[output]
    return float(np.abs(expected - got).max())


def torch_num_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------- metadata


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for p in packages:
        out[p] = version(p)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def staged(name: str, suffix: str) -> Path:
    """Where a build writes its file first; `finish` moves it into OUT_DIR once everything is measured,
    so readers of models/ (tests running meanwhile) never see a half-written file."""
    directory = OUT_DIR / ".staging"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{name}{suffix}"


def finish(
    name: str,
    *,
    test_feeds: dict[str, np.ndarray],
    test_labels: np.ndarray,
    prediction: dict[str, str],
    meta: dict[str, Any],
    start_time: float,
) -> dict[str, Any]:
    """Write <name>_test.npz, measure the staged <name>.onnx with ORT, write <name>.json, publish all three.

    `meta` gives source, framework, exporter, task, metric, num_parameters, notes, ... and is
    completed with what is measured on the files as written.
    """
    onnx_path = staged(name, ".onnx")
    npz_path = staged(name, "_test.npz")
    json_path = staged(name, ".json")
    np.savez_compressed(npz_path, **test_feeds, labels=test_labels.astype(np.int64))
    model = check_onnx(onnx_path)
    accuracy = ort_accuracy(onnx_path, npz_path, prediction)
    info: dict[str, Any] = {
        "name": name,
        **meta,
        "opset": opset_of(model),
        "ir_version": model.ir_version,
        "inputs": value_info_summary(model.graph.input),
        "outputs": value_info_summary(model.graph.output),
        "prediction": prediction,
        "test_accuracy": round(accuracy, 6),
        "test_samples": int(len(test_labels)),
        "measured_with": "onnxruntime CPU, GraphOptimizationLevel.ORT_DISABLE_ALL",
        "onnx_initializer_elements": initializer_elements(model),
        "file_bytes": onnx_path.stat().st_size,
        "npz_bytes": npz_path.stat().st_size,
        "sha256": sha256(onnx_path),
        "op_histogram": op_histogram(model),
        "build_seconds": round(time.time() - start_time, 1),
        "rebuild": f"python -m models.build {name}",
    }
    json_path.write_text(json.dumps(info, indent=2) + "\n")
    for path in (onnx_path, npz_path, json_path):
        os.replace(path, OUT_DIR / path.name)
    try:
        onnx_path.parent.rmdir()
    except OSError:  # another build is staging too
        pass
    print(json.dumps({k: info[k] for k in ("name", "test_accuracy", "file_bytes", "op_histogram")}, indent=2))
    return info


# ---------------------------------------------------------------- torch training


def train_classifier(model, x, y, *, epochs: int, batch: int, lr: float, weight_decay: float = 1e-4) -> None:
    """Cross-entropy training with AdamW and a one-cycle schedule; seeded shuffling.

    `y` holds class ids; for sequence models the logits are [N, L, C] and `y` is [N, L].
    """
    import torch
    from torch import nn

    steps_per_epoch = (len(x) + batch - 1) // batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            logits = model(x[idx])
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), y[idx].reshape(-1))
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % max(1, epochs // 4) == 0 or epoch == epochs - 1:
            print(f"epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f}", flush=True)
    model.eval()


def build_torch_digits(
    name: str,
    model,
    split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch: int,
    lr: float,
    opset: int,
    expect_ops: dict[str, int],
    start_time: float,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Train a torch digits classifier, export it (input ``input`` -> ``logits``, dynamic batch), check
    the op counts in ``expect_ops`` and torch vs ORT, and publish it with ``finish``. ``meta`` holds
    the model's own description, source, task and notes; the measured and shared fields are added."""
    import torch

    x_train, x_test, y_train, y_test = split
    train_classifier(model, torch.from_numpy(x_train), torch.from_numpy(y_train), epochs=epochs, batch=batch, lr=lr)
    model.eval()
    with torch.no_grad():
        torch_acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    print(f"torch eval test accuracy {torch_acc:.4f}")
    onnx_path = staged(name, ".onnx")
    model_proto = export_torch(
        model,
        (torch.from_numpy(x_test[:2]),),
        onnx_path,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset=opset,
    )
    hist = op_histogram(model_proto)
    print("op histogram:", hist)
    assert all(hist.get(op, 0) == n for op, n in expect_ops.items()), hist
    feeds = {"input": x_test}
    diff = torch_ort_max_abs_diff(model, onnx_path, feeds, "logits")
    print(f"max |torch - ORT| on the test split: {diff:.3g}")
    assert diff < 1e-4, diff
    return finish(
        name,
        test_feeds=feeds,
        test_labels=y_test,
        prediction={"output": "logits", "decode": ARGMAX},
        start_time=start_time,
        meta={
            "description": meta["description"],
            "source": f"sklearn.datasets.load_digits (bundled, offline); 80/20 stratified split, random_state=0; trained from scratch by models/{name}.py",
            "framework": versions("torch", "onnx", "onnxruntime"),
            "exporter": EXPORTER_TORCHSCRIPT,
            "task": meta["task"],
            "metric": "top-1 accuracy of argmax(logits) on the 360-image test split",
            "torch_test_accuracy": round(torch_acc, 6),
            "max_abs_diff_torch_vs_ort": diff,
            "num_parameters": torch_num_parameters(model),
            "training": f"AdamW lr {lr} one-cycle, {epochs} epochs, batch {batch}, seed {SEED}, 2 threads",
            "notes": meta["notes"],
        },
    )
