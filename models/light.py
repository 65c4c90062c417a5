"""onnx's ``backend/test/data/light/`` architectures with realistic weights, built into models/cache/.

    python -m models.light                   # every architecture (VGG19 and AlexNet/ZFNet are 250-570 MB)
    python -m models.light resnet50 squeezenet
    python -m models.light list

onnx ships these nine real architectures (ResNet50, SqueezeNet, VGG19, DenseNet121, Inception v1
and v2, ShuffleNet, AlexNet, ZFNet512) as IR 3 / opset 9 files whose weights are
``ConstantOfShape(value=0.02)`` placeholders. Here every placeholder becomes a seeded random
initializer of its real shape, chosen by what reads it:

- Conv / Gemm weights: He-normal, std sqrt(2 / fan_in) (fan_in = in_channels/group * kh * kw, or
  Gemm's reduction size); biases N(0, 0.02);
- BatchNormalization: scale U(0.5, 1.5), bias N(0, 0.1); running mean mu + N(0, 0.1) * sigma and
  running var sigma^2 * U(0.5, 2), where mu, sigma are the per-channel statistics of the BN's
  actual input on one N(0,1) image (set BN by BN in graph order): not identity, so folding and
  quantization see real per-channel spread, and activations stay in range as in a trained net
  (with fixed N(0,1)/U(0.5,2) statistics ResNet's residual sums grow until the softmax is one-hot);
- the scale / shift of the Mul / Add affine after Unsqueeze (DenseNet, Inception v2): U(0.5, 1.5) / N(0, 0.1);
- Inception v1's classifier weight, a placeholder read through a Reshape, likewise;
- anything else stays a ConstantOfShape (none in these nine).

The last Conv/Gemm before the output Softmax (DenseNet: the output Conv) is then scaled so the logits' std is 3 on that image
(a trained classifier's softmax is neither uniform nor one-hot).

Then the IR-3 weight inputs are dropped from the graph inputs (IR 7) and the opset goes 9 -> 13
with onnx.version_converter (outputs checked to be unchanged), as a current exporter would write it.
Random weights carry no task: these models are for size, latency and structure benchmarks
(output error vs the original and top-1 agreement are still meaningful). Each model gets
``light_<name>.onnx``, ``light_<name>_test.npz`` (2 images N(0,1), stacked [2,3,224,224]; the
models take batch 1: some Reshapes hard-code it, so feed them one image at a time),
``light_<name>_calib.npz`` (4 other images) and ``light_<name>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python models/light.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "models"

import numpy as np
import onnx
from onnx import numpy_helper

from .pretrained import CACHE

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
NAMES = ("squeezenet", "shufflenet", "inception_v1", "densenet121", "inception_v2", "resnet50", "bvlc_alexnet", "zfnet512", "vgg19")
OPSET = 13


def source(name: str) -> Path:
    return LIGHT / f"light_{name}.onnx"


def paths(name: str) -> dict[str, Path]:
    stem = f"light_{name}"
    return {"onnx": CACHE / f"{stem}.onnx", "test": CACHE / f"{stem}_test.npz", "calib": CACHE / f"{stem}_calib.npz", "json": CACHE / f"{stem}.json"}


def available(name: str) -> bool:
    return all(p.exists() for p in paths(name).values())


def _role(model: onnx.ModelProto, output: str) -> str:
    """What reads a placeholder: 'conv_w', 'conv_b', 'gemm_w', 'gemm_w_t', 'gemm_b', 'bn_scale', ... or 'other'."""
    readers = defaultdict(list)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers[name].append((node, i))
    uses = readers[output]
    if len(uses) != 1:
        return "other"
    node, i = uses[0]
    if node.op_type == "Reshape" and i == 0:  # Inception v1's fc weight is Reshape(placeholder)
        inner = _role(model, node.output[0])
        return inner + ":reshaped" if inner.startswith("gemm_w") else "other"
    if node.op_type == "Unsqueeze":
        nxt = readers[node.output[0]]
        if len(nxt) == 1 and nxt[0][0].op_type in ("Mul", "Add"):
            return "affine_scale" if nxt[0][0].op_type == "Mul" else "affine_shift"
        return "other"
    if node.op_type == "Conv":
        return {1: "conv_w", 2: "conv_b"}.get(i, "other")
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return {1: "gemm_w_t" if trans_b else "gemm_w", 2: "gemm_b"}.get(i, "other")
    if node.op_type == "BatchNormalization":
        return {1: "bn_scale", 2: "bn_bias", 3: "bn_mean", 4: "bn_var"}.get(i, "other")
    return "other"


def _reshape_target(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], data: str) -> list[int]:
    node = next(n for n in model.graph.node if n.op_type == "Reshape" and n.input[0] == data)
    if node.input[1] in inits:
        return [int(d) for d in numpy_helper.to_array(inits[node.input[1]])]
    const = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == node.input[1])
    return [int(d) for d in numpy_helper.to_array(const.attribute[0].t)]


def realistic(model: onnx.ModelProto, seed: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Replace ConstantOfShape placeholders with seeded weights (see the module doc); returns counts per role."""
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    counts: dict[str, int] = defaultdict(int)
    keep, new_inits = [], []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        role = _role(model, node.output[0])
        counts[role] += 1
        if role == "conv_w":
            fan_in = int(np.prod(shape[1:]))
            w = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif role in ("gemm_w", "gemm_w_t"):
            fan_in = shape[1] if role == "gemm_w_t" else shape[0]
            w = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif role.endswith(":reshaped"):  # fan-in from the Reshape's constant target shape
            target = _reshape_target(model, inits, node.output[0])
            fan_in = target[1] if role.startswith("gemm_w_t") else target[0]
            w = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif role in ("conv_b", "gemm_b"):
            w = rng.normal(0.0, 0.02, shape)
        elif role in ("bn_scale", "affine_scale"):
            w = rng.uniform(0.5, 1.5, shape)
        elif role in ("bn_bias", "bn_mean", "affine_shift"):
            w = rng.normal(0.0, 0.1, shape)
        elif role == "bn_var":
            w = rng.uniform(0.5, 2.0, shape)
        else:
            keep.append(node)
            continue
        new_inits.append(numpy_helper.from_array(w.astype(np.float32), node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.initializer.extend(new_inits)
    used = {i for n in model.graph.node for i in n.input}
    live = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names and i.name in used]  # IR >= 4: weights are not inputs
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.ir_version = 7
    return model, dict(counts)


def _values(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    """Any intermediate values of ``model`` on ``feed`` (the graph outputs are swapped temporarily)."""
    saved = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    try:
        return _run(model, feed)
    finally:
        del model.graph.output[:]
        model.graph.output.extend(saved)


def calibrate_batchnorm(model: onnx.ModelProto, feed: dict[str, np.ndarray], rng: np.random.Generator) -> int:
    """Give every BatchNormalization running statistics near those of its real input: mean
    mu + N(0, 0.1) * sigma, var sigma^2 * U(0.5, 2) per channel, BN by BN in graph order (each
    measured with the earlier ones set). Random He weights without this let the residual sums
    of ResNet grow until the softmax is one-hot."""
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.input[3] not in inits or node.input[4] not in inits:
            continue
        (x,) = _values(model, feed, [node.input[0]])
        axes = tuple(i for i in range(x.ndim) if i != 1)
        mu, sigma = x.mean(axis=axes), x.std(axis=axes) + 1e-3
        mean = mu + rng.normal(0.0, 0.1, mu.shape) * sigma
        var = sigma**2 * rng.uniform(0.5, 2.0, sigma.shape)
        for name, value in ((node.input[3], mean), (node.input[4], var)):
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
        count += 1
    return count


def scale_logits(model: onnx.ModelProto, feed: dict[str, np.ndarray], target_std: float = 3.0) -> float | None:
    """Scale the last Conv/Gemm before the output Softmax (or making the output) so the logits' std is ``target_std``
    (a trained classifier's softmax is neither uniform nor one-hot). Returns the factor."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    node = producers.get(model.graph.output[0].name)
    if node is None or node.op_type not in ("Softmax", "Conv", "Gemm"):
        return None
    logits = node.input[0] if node.op_type == "Softmax" else node.output[0]  # DenseNet ends in its fc Conv
    node = producers.get(logits)
    while node is not None and node.op_type in ("Reshape", "Flatten", "Relu", "AveragePool", "GlobalAveragePool", "Dropout", "Identity", "Squeeze"):
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Gemm", "Conv"):
        return None
    (z,) = _values(model, feed, [logits])
    factor = float(target_std / max(float(np.std(z)), 1e-12))
    for name in node.input[1:3]:
        source = name if name in inits else producers[name].input[0]  # Inception v1: Reshape(weight)
        t = inits[source]
        t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * factor).astype(np.float32), t.name))
    return factor


def _run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feed)


def build(name: str) -> dict[str, Any]:
    start = time.time()
    model = onnx.load(source(name))
    nodes_before = len(model.graph.node)
    model, roles = realistic(model, seed=zlib.crc32(name.encode()))
    (inp,) = model.graph.input
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(7)
    test = {inp.name: rng.standard_normal([2, *shape[1:]]).astype(np.float32)}
    calib = {inp.name: rng.standard_normal([4, *shape[1:]]).astype(np.float32)}
    init_feed = {inp.name: rng.standard_normal([1, *shape[1:]]).astype(np.float32)}  # sets BN stats and the logit scale
    batchnorms = calibrate_batchnorm(model, init_feed, np.random.default_rng(zlib.crc32(name.encode()) + 1))
    factor = scale_logits(model, init_feed)
    before = _run(model, {k: v[:1] for k, v in test.items()})[0]
    converted = onnx.version_converter.convert_version(model, OPSET)
    after = _run(converted, {k: v[:1] for k, v in test.items()})[0]
    if not np.allclose(before, after, rtol=1e-5, atol=1e-5 * float(np.abs(before).max())):
        raise RuntimeError(f"{name}: opset {OPSET} conversion changed the outputs (max diff {np.abs(before - after).max()})")
    del converted.graph.value_info[:]
    p = paths(name)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = p["onnx"].with_suffix(".tmp")
    onnx.save(converted, tmp)
    onnx.checker.check_model(str(tmp), full_check=True)
    outputs = np.concatenate([_run(tmp, {k: v[i : i + 1] for k, v in test.items()})[0] for i in range(len(test[inp.name]))])
    os.replace(tmp, p["onnx"])
    np.savez_compressed(p["test"], **test)
    np.savez_compressed(p["calib"], **calib)
    params = int(sum(int(np.prod(t.dims)) for t in converted.graph.initializer))
    info = {
        "name": f"light_{name}",
        "source": f"onnx {onnx.__version__} backend/test/data/light/light_{name}.onnx (ConstantOfShape placeholders)",
        "weights": "seeded random (models/light.py): He-normal conv/gemm, non-identity BatchNormalization",
        "seed": zlib.crc32(name.encode()),
        "placeholders_replaced": roles,
        "batchnorm_statistics_from_data": batchnorms,
        "logit_scale": factor,
        "opset": OPSET,
        "ir_version": converted.ir_version,
        "nodes_source": nodes_before,
        "nodes": len(converted.graph.node),
        "parameters": params,
        "file_bytes": p["onnx"].stat().st_size,
        "input": {"name": inp.name, "shape": list(test[inp.name].shape)},
        "output_std": float(np.std(outputs)),
        "output_top1_differs_between_images": bool(len(outputs) > 1 and np.argmax(outputs[0]) != np.argmax(outputs[1])),
        "build_seconds": round(time.time() - start, 1),
        "rebuild": f"python -m models.light {name}",
    }
    p["json"].write_text(json.dumps(info, indent=2) + "\n")
    print(f"light_{name:14s} {params / 1e6:7.2f} M params  {info['file_bytes'] / 1e6:8.1f} MB  {info['nodes']:4d} nodes  output std {info['output_std']:.3g}  {info['build_seconds']} s", flush=True)
    return info


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "list":
        for n in NAMES:
            print(f"{n:14s} {'built' if available(n) else 'not built'}")
        return 0
    names = [a.removeprefix("light_") for a in argv] or list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        print(f"unknown light model(s) {unknown}; known: {NAMES}", file=sys.stderr)
        return 2
    for n in names:
        build(n)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
