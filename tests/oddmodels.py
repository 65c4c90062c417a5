"""Small models with the features optimizers trip over, each valid and runnable by onnxruntime.

Local functions, If/Loop/Scan bodies capturing outer values, sparse initializers, string tensors,
float16/bfloat16/int/bool tensors, and one small CNN-like model at every opset from 7 to the
latest (through ``onnx.version_converter``). Every model also carries something a cleanup pass
can remove (a dead node or a Dropout), so passes have work to do, not only things to skip.
Shared by ``test_odd_models.py`` and the fuzz corpus.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
from onnx import TensorProto

F = TensorProto.FLOAT
RNG = np.random.default_rng(11)


def _t(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(array, name)


def _w(name: str, *shape: int, dtype: type = np.float32) -> onnx.TensorProto:
    return _t(name, (RNG.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype))


def _vi(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, elem, shape)


def _model(graph: onnx.GraphProto, opset: int = 17, ir_version: int = 9, **kwargs: object) -> onnx.ModelProto:
    opsets = [oh.make_opsetid("", opset)] + list(kwargs.pop("extra_opsets", []))  # type: ignore[arg-type]
    return oh.make_model(graph, opset_imports=opsets, ir_version=ir_version, **kwargs)


def local_function() -> onnx.ModelProto:
    """y = local.fn::Block(x, w): MatMul, Dropout, Relu inside the function; a dead node outside."""
    block = oh.make_function(
        "local.fn",
        "Block",
        ["a", "b"],
        ["out"],
        [oh.make_node("MatMul", ["a", "b"], ["m"]), oh.make_node("Dropout", ["m"], ["d"]), oh.make_node("Relu", ["d"], ["out"])],
        opset_imports=[oh.make_opsetid("", 17)],
    )
    nodes = [
        oh.make_node("Block", ["x", "w"], ["h"], domain="local.fn"),
        oh.make_node("Identity", ["h"], ["dead"]),
        oh.make_node("MatMul", ["h", "w2"], ["y"]),
    ]
    graph = oh.make_graph(nodes, "g", [_vi("x", F, ["N", 16])], [_vi("y", F, ["N", 8])], [_w("w", 16, 16), _w("w2", 16, 8)])
    return _model(graph, functions=[block], extra_opsets=[oh.make_opsetid("local.fn", 1)])


def if_branches() -> onnx.ModelProto:
    """y = If(c) then Relu(x @ w) else (x @ w) * 2: both branches capture the outer x and w; dead nodes inside."""
    then = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["t1"]), oh.make_node("Identity", ["t1"], ["t_dead"]), oh.make_node("Relu", ["t1"], ["t_out"])],
        "then",
        [],
        [_vi("t_out", F, ["N", 8])],
    )
    other = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["e1"]), oh.make_node("Dropout", ["e1"], ["e2"]), oh.make_node("Mul", ["e2", "two"], ["e_out"])],
        "else",
        [],
        [_vi("e_out", F, ["N", 8])],
    )
    nodes = [oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other), oh.make_node("Neg", ["x"], ["dead"])]
    graph = oh.make_graph(nodes, "g", [_vi("c", TensorProto.BOOL, []), _vi("x", F, ["N", 16])], [_vi("y", F, ["N", 8])], [_w("w", 16, 8), _t("two", np.array(2, np.float32))])
    return _model(graph)


def loop_body() -> onnx.ModelProto:
    """Three rounds of h = Relu(h @ w) in a Loop body reading the outer w; a Dropout in the body."""
    body = oh.make_graph(
        [
            oh.make_node("Identity", ["cond_in"], ["cond_out"]),
            oh.make_node("MatMul", ["h_in", "w"], ["m"]),
            oh.make_node("Dropout", ["m"], ["d"]),
            oh.make_node("Relu", ["d"], ["h_out"]),
        ],
        "body",
        [_vi("i", TensorProto.INT64, []), _vi("cond_in", TensorProto.BOOL, []), _vi("h_in", F, ["N", 8])],
        [_vi("cond_out", TensorProto.BOOL, []), _vi("h_out", F, ["N", 8])],
    )
    nodes = [oh.make_node("Loop", ["trips", "true", "x"], ["y"], body=body)]
    inits = [_w("w", 8, 8), _t("trips", np.array(3, np.int64)), _t("true", np.array(True))]
    graph = oh.make_graph(nodes, "g", [_vi("x", F, ["N", 8])], [_vi("y", F, ["N", 8])], inits)
    return _model(graph)


def scan_body() -> onnx.ModelProto:
    """A running sum s += Relu(x_t @ w) over the sequence axis of x[T, 8], w captured from outside."""
    body = oh.make_graph(
        [oh.make_node("MatMul", ["x_t", "w"], ["m"]), oh.make_node("Relu", ["m"], ["r"]), oh.make_node("Add", ["s_in", "r"], ["s_out"]), oh.make_node("Identity", ["r"], ["r_out"])],
        "body",
        [_vi("s_in", F, [1, 4]), _vi("x_t", F, [1, 8])],
        [_vi("s_out", F, [1, 4]), _vi("r_out", F, [1, 4])],
    )
    nodes = [oh.make_node("Scan", ["s0", "x"], ["s", "rs"], body=body, num_scan_inputs=1), oh.make_node("Identity", ["s"], ["dead"])]
    graph = oh.make_graph(nodes, "g", [_vi("x", F, ["T", 1, 8])], [_vi("s", F, [1, 4]), _vi("rs", F, ["T", 1, 4])], [_w("w", 8, 4), _t("s0", np.zeros((1, 4), np.float32))])
    return _model(graph)


def sparse_initializer() -> onnx.ModelProto:
    """y = Relu(x @ w) with w a 64x32 COO sparse_initializer (90% zeros); a dead node."""
    dense = RNG.standard_normal((64, 32)).astype(np.float32) * (RNG.random((64, 32)) < 0.1)
    index = np.flatnonzero(dense)
    sparse = oh.make_sparse_tensor(_t("w", dense.reshape(-1)[index]), _t("", index.astype(np.int64)), [64, 32])
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Identity", ["h"], ["dead"]), oh.make_node("Relu", ["h"], ["y"])]
    graph = oh.make_graph(nodes, "g", [_vi("x", F, ["N", 64])], [_vi("y", F, ["N", 32])], [], sparse_initializer=[sparse])
    return _model(graph)


def strings() -> onnx.ModelProto:
    """A string input compared with a string constant, next to a float path; a Dropout."""
    nodes = [
        oh.make_node("Equal", ["s", "word"], ["is_a"]),
        oh.make_node("MatMul", ["x", "w"], ["h"]),
        oh.make_node("Dropout", ["h"], ["y"]),
        oh.make_node("Identity", ["s"], ["s_copy"]),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [_vi("s", TensorProto.STRING, ["N"]), _vi("x", F, ["N", 8])],
        [_vi("is_a", TensorProto.BOOL, ["N"]), _vi("y", F, ["N", 4]), _vi("s_copy", TensorProto.STRING, ["N"])],
        [_t("word", np.array(["a"], dtype=object)), _w("w", 8, 4)],
    )
    return _model(graph, opset=19)  # Equal on strings since opset 19


def float16() -> onnx.ModelProto:
    """A float16 MLP: MatMul, Add, Relu, Dropout, MatMul, float16 in and out."""
    H = TensorProto.FLOAT16
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h1"]),
        oh.make_node("Add", ["h1", "b1"], ["h2"]),
        oh.make_node("Relu", ["h2"], ["h3"]),
        oh.make_node("Dropout", ["h3"], ["h4"]),
        oh.make_node("MatMul", ["h4", "w2"], ["y"]),
    ]
    inits = [_w("w1", 32, 64, dtype=np.float16), _w("b1", 64, dtype=np.float16), _w("w2", 64, 16, dtype=np.float16)]
    graph = oh.make_graph(nodes, "g", [_vi("x", H, ["N", 32])], [_vi("y", H, ["N", 16])], inits)
    return _model(graph)


def bfloat16() -> onnx.ModelProto:
    """bfloat16 input, weights and output; the arithmetic in float32 between Casts; a dead node."""
    B = TensorProto.BFLOAT16
    nodes = [
        oh.make_node("Cast", ["x"], ["xf"], to=F),
        oh.make_node("Cast", ["w"], ["wf"], to=F),
        oh.make_node("MatMul", ["xf", "wf"], ["h"]),
        oh.make_node("Relu", ["h"], ["r"]),
        oh.make_node("Identity", ["r"], ["dead"]),
        oh.make_node("Cast", ["r"], ["y"], to=B),
    ]
    graph = oh.make_graph(nodes, "g", [_vi("x", B, ["N", 32])], [_vi("y", B, ["N", 16])], [_w("w", 32, 16, dtype=ml_dtypes.bfloat16)])
    return _model(graph)


def ints_and_bools() -> onnx.ModelProto:
    """int32/int64/int8/bool arithmetic: Add, Mul, Greater, Where, Not, And, ArgMax, Cast; an int8 weight."""
    I32, I64, BOOL = TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL
    nodes = [
        oh.make_node("Add", ["i", "k"], ["i1"]),
        oh.make_node("Mul", ["i1", "k"], ["i2"]),
        oh.make_node("Greater", ["i2", "zero"], ["pos"]),
        oh.make_node("Not", ["pos"], ["neg"]),
        oh.make_node("And", ["neg", "b"], ["mask"]),
        oh.make_node("Where", ["mask", "i2", "k"], ["sel"]),
        oh.make_node("Cast", ["sel"], ["f"], to=F),
        oh.make_node("Cast", ["w8"], ["wf"], to=F),
        oh.make_node("MatMul", ["f", "wf"], ["h"]),
        oh.make_node("ArgMax", ["h"], ["y"], axis=1, keepdims=0),
        oh.make_node("Identity", ["h"], ["dead"]),
    ]
    inits = [
        _t("k", RNG.integers(-3, 4, 16).astype(np.int32)),
        _t("zero", np.array(0, np.int32)),
        _t("w8", RNG.integers(-100, 100, (16, 6)).astype(np.int8)),
    ]
    graph = oh.make_graph(nodes, "g", [_vi("i", I32, ["N", 16]), _vi("b", BOOL, ["N", 16])], [_vi("y", I64, ["N"]), _vi("mask", BOOL, ["N", 16])], inits)
    return _model(graph)


ODD: dict[str, Callable[[], onnx.ModelProto]] = {
    "local-function": local_function,
    "if": if_branches,
    "loop": loop_body,
    "scan": scan_body,
    "sparse-initializer": sparse_initializer,
    "strings": strings,
    "float16": float16,
    "bfloat16": bfloat16,
    "ints-bools": ints_and_bools,
}


def small_cnn(opset: int = 7) -> onnx.ModelProto:
    """Conv, BatchNormalization, Relu, MaxPool, Dropout, Reshape (constant shape), Gemm, Softmax at ``opset``
    (7 is the base; other opsets through onnx.version_converter)."""
    inits = [
        _w("k", 8, 3, 3, 3),
        _t("kb", RNG.standard_normal(8).astype(np.float32)),
        _t("scale", RNG.uniform(0.5, 1.5, 8).astype(np.float32)),
        _t("bias", RNG.standard_normal(8).astype(np.float32)),
        _t("mean", RNG.standard_normal(8).astype(np.float32)),
        _t("var", RNG.uniform(0.5, 1.5, 8).astype(np.float32)),
        _t("shape", np.array([-1, 8 * 4 * 4], np.int64)),
        _w("w", 8 * 4 * 4, 10),
        _t("b", RNG.standard_normal(10).astype(np.float32)),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "k", "kb"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        oh.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"]),
        oh.make_node("Relu", ["n"], ["r"]),
        oh.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Dropout", ["p"], ["d"], ratio=0.3),
        oh.make_node("Reshape", ["d", "shape"], ["flat"]),
        oh.make_node("Gemm", ["flat", "w", "b"], ["g"]),
        oh.make_node("Softmax", ["g"], ["y"]),
        oh.make_node("Identity", ["g"], ["dead"]),
    ]
    weights = [oh.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = oh.make_graph(nodes, "cnn", [_vi("x", F, [2, 3, 8, 8]), *weights], [_vi("y", F, [2, 10])], inits)
    model = _model(graph, opset=7, ir_version=3)  # IR 3: initializers are also graph inputs
    if opset > 7:
        model = onnx.version_converter.convert_version(model, opset)
    if opset >= 9:  # the modern form: weights are initializers only
        del model.graph.input[1:]
        model.ir_version = 4 if opset < 11 else 7 if opset < 15 else 8 if opset < 19 else 9 if opset < 21 else 10
    return model


LATEST_OPSET = onnx.defs.onnx_opset_version()
OPSETS = list(range(7, LATEST_OPSET + 1))
