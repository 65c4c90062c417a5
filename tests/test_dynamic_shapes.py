"""Symbolic batch and sequence dimensions through every registered pass.

Each default-constructed pass runs through ``graphopt.optimize`` (verified at batch 3, seq 5) on an
MLP, a CNN and a token model whose inputs have symbolic ``batch``/``seq`` dims and whose graphs
compute shapes at run time (``Shape``/``Reshape``). The output must keep the symbolic dims, and run
at other batch and sequence sizes with the same results: a pass that baked the verification
shape into the graph fails there. Budget violations roll back (what a pass may do with a random
model is not the question here); a pass raising or breaking the graph is a failure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest
from onnx import TensorProto

import graphopt
from graphopt import io
from graphopt.data import ShapeSpec, generate
from graphopt.metrics import Tolerance, compare_outputs
from graphopt.registry import all_passes
from graphopt.verify import run

from clirun import run_batch

RNG = np.random.default_rng(7)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(array, name)


def _low_rank(n: int, m: int, rank: int) -> np.ndarray:
    return (RNG.standard_normal((n, rank)) @ RNG.standard_normal((rank, m)) / np.sqrt(n * rank) + 0.001 * RNG.standard_normal((n, m))).astype(np.float32)


def mlp() -> onnx.ModelProto:
    """x[batch, 64] -> MatMul+Add, Relu, Dropout, MatMul (512x512, low rank)+Add, Relu, Reshape(0,-1), Gemm -> y[batch, 10]."""
    inits = [
        _init("w1", RNG.standard_normal((64, 512)).astype(np.float32) / 8),
        _init("b1", RNG.standard_normal(512).astype(np.float32)),
        _init("w2", _low_rank(512, 512, 8)),
        _init("b2", RNG.standard_normal(512).astype(np.float32) / 10),
        _init("w3", RNG.standard_normal((10, 512)).astype(np.float32) / 16),
        _init("b3", RNG.standard_normal(10).astype(np.float32)),
        _init("shape", np.array([0, -1], np.int64)),
    ]
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h1"]),
        oh.make_node("Add", ["h1", "b1"], ["h2"]),
        oh.make_node("Relu", ["h2"], ["h3"]),
        oh.make_node("Dropout", ["h3"], ["h4"]),
        oh.make_node("MatMul", ["h4", "w2"], ["h5"]),
        oh.make_node("Add", ["h5", "b2"], ["h6"]),
        oh.make_node("Relu", ["h6"], ["h7"]),
        oh.make_node("Reshape", ["h7", "shape"], ["h8"]),
        oh.make_node("Gemm", ["h8", "w3", "b3"], ["y"], transB=1),
    ]
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])], [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


def cnn() -> onnx.ModelProto:
    """x[batch, 3, 16, 16] -> Conv, BatchNorm, Relu, Conv, Relu, Reshape to (batch, C*H*W) computed from Shape, MatMul+Add -> y[batch, 10].

    The flattened size is a product of static dims (foldable); the batch entry is not."""
    c1, c2 = 16, 32
    inits = [
        _init("k1", RNG.standard_normal((c1, 3, 3, 3)).astype(np.float32) / 5),
        _init("kb1", RNG.standard_normal(c1).astype(np.float32)),
        _init("scale", RNG.uniform(0.5, 1.5, c1).astype(np.float32)),
        _init("bias", RNG.standard_normal(c1).astype(np.float32)),
        _init("mean", RNG.standard_normal(c1).astype(np.float32)),
        _init("var", RNG.uniform(0.5, 1.5, c1).astype(np.float32)),
        _init("k2", RNG.standard_normal((c2, c1, 3, 3)).astype(np.float32) / 12),
        _init("w", RNG.standard_normal((c2 * 4 * 4, 10)).astype(np.float32) / 20),
        _init("b", RNG.standard_normal(10).astype(np.float32)),
        _init("zero", np.array([0], np.int64)),
        _init("chw", np.array([1, 2, 3], np.int64)),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "k1", "kb1"], ["c1"], pads=[1, 1, 1, 1]),
        oh.make_node("BatchNormalization", ["c1", "scale", "bias", "mean", "var"], ["n1"]),
        oh.make_node("Relu", ["n1"], ["r1"]),
        oh.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Conv", ["p1", "k2"], ["c2"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c2"], ["r2"]),
        oh.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Shape", ["p2"], ["s"]),
        oh.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        oh.make_node("Gather", ["s", "chw"], ["dims"], axis=0),
        oh.make_node("ReduceProd", ["dims"], ["size"], keepdims=1),
        oh.make_node("Concat", ["n", "size"], ["flat_shape"], axis=0),
        oh.make_node("Reshape", ["p2", "flat_shape"], ["flat"]),
        oh.make_node("MatMul", ["flat", "w"], ["m"]),
        oh.make_node("Add", ["m", "b"], ["y"]),
    ]
    graph = oh.make_graph(nodes, "cnn", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])], [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


def tokens() -> onnx.ModelProto:
    """tokens[batch, seq] int64 -> embedding, projection, LayerNorm, self-attention scores over seq -> y[batch, seq, 64]."""
    d = 64
    inits = [
        _init("emb", RNG.standard_normal((50, d)).astype(np.float32)),
        _init("wq", RNG.standard_normal((d, d)).astype(np.float32) / 8),
        _init("wv", _low_rank(d, d, 4)),
        _init("gamma", np.ones(d, np.float32)),
        _init("beta", np.zeros(d, np.float32)),
        _init("scale", np.array(1 / np.sqrt(d), np.float32)),
        _init("one", np.array([1], np.int64)),
        _init("dim", np.array([d], np.int64)),
        _init("zero", np.array([0], np.int64)),
    ]
    nodes = [
        oh.make_node("Gather", ["emb", "tokens"], ["e"], axis=0),
        oh.make_node("LayerNormalization", ["e", "gamma", "beta"], ["ln"], axis=-1),
        oh.make_node("MatMul", ["ln", "wq"], ["q"]),
        oh.make_node("MatMul", ["ln", "wv"], ["v"]),
        oh.make_node("Transpose", ["q"], ["kt"], perm=[0, 2, 1]),
        oh.make_node("MatMul", ["q", "kt"], ["scores"]),
        oh.make_node("Mul", ["scores", "scale"], ["scaled"]),
        oh.make_node("Softmax", ["scaled"], ["attn"], axis=-1),
        oh.make_node("MatMul", ["attn", "v"], ["ctx"]),
        oh.make_node("Shape", ["tokens"], ["ts"]),
        oh.make_node("Gather", ["ts", "zero"], ["nb"], axis=0),
        oh.make_node("Gather", ["ts", "one"], ["ns"], axis=0),
        oh.make_node("Concat", ["nb", "ns", "dim"], ["out_shape"], axis=0),
        oh.make_node("Reshape", ["ctx", "out_shape"], ["y"]),
    ]
    graph = oh.make_graph(
        nodes,
        "tokens",
        [oh.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
        inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


MODELS = {"mlp": mlp, "cnn": cnn, "tokens": tokens}
PASSES = sorted(all_passes())
VERIFY_AT = ["batch=3", "seq=5"]
OTHER_SIZES = [{"batch": 1, "seq": 7}, {"batch": 6, "seq": 2}]


def _dims(values: list[ir.Value]) -> list[list[str]]:
    return [[str(d) for d in (v.shape or [])] for v in values]


def _samples(model: ir.Model, sizes: dict[str, int], seed: int) -> list[dict[str, np.ndarray]]:
    return generate(model, spec=ShapeSpec(by_dim={k: v for k, v in sizes.items()}), samples=1, seed=seed)


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> tuple[str, ir.Model]:
    proto = MODELS[request.param]()
    onnx.checker.check_model(proto, full_check=True)
    return request.param, ir.from_proto(proto)


@pytest.mark.parametrize("name", PASSES)
def test_symbolic_dims_flow_through_pass(model: tuple[str, ir.Model], name: str) -> None:
    label, original = model
    cls = all_passes()[name]
    result, report = graphopt.optimize(original, [cls()], input_shape=VERIFY_AT, on_violation="rollback")
    (record,) = report.records
    assert record.verdict in ("ok", "unchanged", "rolled-back"), (record.verdict, record.unverified, record.violations)
    assert _dims(result.graph.inputs) == _dims(original.graph.inputs)
    assert _dims(result.graph.outputs) == _dims(original.graph.outputs)
    onnx.checker.check_model(ir.to_proto(result), full_check=True)
    if record.verdict != "ok":
        return
    for i, sizes in enumerate(OTHER_SIZES):  # shapes the verifier never saw
        data = _samples(original, sizes, seed=100 + i)
        want, got = run(original, data, "exact"), run(result, data, "exact")
        for out in want[0]:
            assert got[0][out].shape == want[0][out].shape, (out, sizes)
        tol = cls.tolerance if cls.lossless else Tolerance(min_cosine=0.9)
        errors = compare_outputs(want, got, tol)
        assert not [v for e in errors for v in e.violations(tol)], (sizes, errors)


def test_whole_cleanup_keeps_symbolic_dims_on_disk(tmp_path: Path) -> None:
    """After save and load, inputs and outputs still read ``batch``/``seq``."""
    for label, build in MODELS.items():
        original = ir.from_proto(build())
        result, report = graphopt.optimize(original, "cleanup" if "cleanup" in graphopt.registry.presets() else "lift-constants,dce", input_shape=VERIFY_AT)
        assert report.verified, label
        path = tmp_path / f"{label}.onnx"
        io.save(result, path)
        again = io.load(path)
        assert _dims(again.graph.inputs) == _dims(original.graph.inputs) and _dims(again.graph.outputs) == _dims(original.graph.outputs)
        assert any(not d.isdigit() for dims in _dims(again.graph.outputs) for d in dims)


def test_cli_input_shape_and_defaults(tmp_path: Path) -> None:
    """A leading dim defaults to 1; any other dynamic dim needs --input-shape, and the message says how."""
    onnx.save(tokens(), tmp_path / "tokens.onnx")
    out = str(tmp_path / "o.onnx")
    base = ["optimize", str(tmp_path / "tokens.onnx"), "-o", out, "-p", "dce", "-q"]
    runs = run_batch(
        [
            (base, tmp_path),
            (base + ["--input-shape", "seq=4"], tmp_path),
            (base + ["--input-shape", "tokens:2x9"], tmp_path),
            (base + ["--input-shape", "batch=2,seq=3", "--report", str(tmp_path / "r.json")], tmp_path),
        ]
    )
    missing, by_dim, by_input, both = runs
    assert missing.code == 3 and missing.stderr.strip() == (
        "graphopt: error: input 'tokens' dimension 1 'seq' is dynamic: set it with --input-shape tokens:NxN or --input-shape seq=N"
    )
    for r in (by_dim, by_input, both):
        assert r.code == 0 and r.stderr == "", r.stderr
    assert [d.dim_param for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]
