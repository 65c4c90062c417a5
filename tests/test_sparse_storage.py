"""sparse-storage: bit-exact, smaller files, stock onnxruntime, decoder folded at load, both forms load back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt import io
from graphopt.edit import constant_array
from graphopt.passbase import TAG
from graphopt.passes.sparse_storage import SparseStorage
from graphopt.sparse import STORAGE_KEY
from tests.conftest import MODELS, assert_valid, outputs

RNG = np.random.default_rng(0)


def sparse_array(shape: tuple[int, ...], sparsity: float, dtype: type = np.float32) -> np.ndarray:
    a = RNG.standard_normal(shape).astype(dtype)
    flat = a.reshape(-1)
    flat[RNG.permutation(flat.size)[: int(round(sparsity * flat.size))]] = 0
    return a


def matmul_model(w: np.ndarray, opset: int = 17) -> ir.Model:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", 1, ["N", k])],
        [helper.make_tensor_value_info("y", 1, ["N", n])],
        [numpy_helper.from_array(w, "w")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8))


def session(path: Path, level: str, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "deploy" else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if level == "exact":
        options.add_session_config_entry("session.disable_prepacking", "1")
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_bitmask_1024x1024_half_sparse(tmp_path: Path) -> None:
    w = sparse_array((1024, 1024), 0.5)
    w.reshape(-1)[np.flatnonzero(w)[0]] = -0.0  # a negative zero is a value: it must come back as -0.0
    model = matmul_model(w)
    io.save(model, tmp_path / "dense.onnx")
    result = SparseStorage()(model)
    assert result.modified and result.stats["bitmask"] == 1 and result.layers[0]["form"] == "bitmask"
    assert {n.op_type for n in model.graph} >= {"BitShift", "Mod", "CumSum", "Gather", "Reshape", "MatMul"}  # opset 17: Mod, not BitwiseAnd
    assert_valid(model)
    io.save(model, tmp_path / "sparse.onnx")
    ratio = (tmp_path / "sparse.onnx").stat().st_size / (tmp_path / "dense.onnx").stat().st_size
    assert ratio <= 0.6
    x = {"x": RNG.standard_normal((4, 1024)).astype(np.float32)}
    for level in ("exact", "deploy"):
        dense = session(tmp_path / "dense.onnx", level).run(None, x)[0]
        np.testing.assert_array_equal(session(tmp_path / "sparse.onnx", level, tmp_path / f"{level}.opt.onnx").run(None, x)[0], dense)
    folded = onnx.load(tmp_path / "deploy.opt.onnx")
    assert [n.op_type for n in folded.graph.node] == ["MatMul"]  # ORT's constant folding rebuilt the dense weight at load
    back = io.load(tmp_path / "sparse.onnx")
    decoded = outputs(_as_output(back, "w"), [x])[0]["w"]
    assert np.array_equal(decoded.view(np.uint32), w.view(np.uint32))  # bit for bit, -0.0 included
    assert not SparseStorage()(back).modified  # the mask and the non-zeros are left alone


def _as_output(model: ir.Model, name: str) -> ir.Model:
    clone = model.clone()
    value = next(n.outputs[0] for n in clone.graph if n.outputs[0].name == name)
    clone.graph.outputs.append(value)
    return clone


@pytest.mark.parametrize(("opset", "shape"), [(18, (37, 23)), (11, (3001,)), (17, (4, 8, 3, 3))])
def test_decoder_variants_are_bit_exact(opset: int, shape: tuple[int, ...]) -> None:
    """BitwiseAnd (opset 18) or Mod; a length that isn't a multiple of 8 (Slice); 1-D (no Reshape); conv weights."""
    w = sparse_array(shape, 0.7)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])], "g", [], [helper.make_tensor_value_info("y", 1, list(shape))], [numpy_helper.from_array(w, "w")]
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8))
    result = SparseStorage(min_size=0, formats=["bitmask"])(model)
    assert result.modified
    ops = [n.op_type for n in model.graph]
    assert ("BitwiseAnd" in ops) == (opset >= 18) and ("Slice" in ops) == (w.size % 8 != 0)
    assert ops.count("Reshape") == (2 if len(shape) > 1 else 1)  # unpacked bits to 1-D; back to the weight's shape
    assert_valid(model)
    for level in ("exact", "deploy"):
        np.testing.assert_array_equal(outputs(model, [{}], level)[0]["y"], w)


def test_coo_above_98_percent_round_trips(tmp_path: Path) -> None:
    w = sparse_array((512, 512), 0.99)
    model = matmul_model(w)
    result = SparseStorage()(model)
    assert result.layers[0]["form"] == "coo" and model.graph.initializers["w"].metadata_props[STORAGE_KEY] == "sparse"
    io.save(model, tmp_path / "coo.onnx")
    proto = onnx.load(tmp_path / "coo.onnx")
    assert len(proto.graph.sparse_initializer) == 1 and not proto.graph.initializer
    assert (tmp_path / "coo.onnx").stat().st_size < 0.05 * w.nbytes
    onnx.checker.check_model(proto)  # (full_check rejects it: onnx types sparse_initializer as sparse_tensor; see graphopt/sparse.py)
    x = {"x": RNG.standard_normal((3, 512)).astype(np.float32)}
    np.testing.assert_array_equal(session(tmp_path / "coo.onnx", "exact").run(None, x)[0], outputs(matmul_model(w), [x])[0]["y"])
    back = io.load(tmp_path / "coo.onnx")  # graphopt reads it back: dense in memory, still marked
    np.testing.assert_array_equal(constant_array(back.graph.initializers["w"]), w)
    assert not SparseStorage()(back).modified
    io.save(back, tmp_path / "again.onnx")
    assert len(onnx.load(tmp_path / "again.onnx").graph.sparse_initializer) == 1


def test_loads_sparse_initializers_written_by_other_tools(tmp_path: Path) -> None:
    w = sparse_array((40, 30), 0.9)
    flat = np.flatnonzero(w)
    coords = np.stack(np.unravel_index(flat, w.shape), axis=1).astype(np.int64)  # [nnz, rank] form of indices
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(w.reshape(-1)[flat], "w"), numpy_helper.from_array(coords, "w_idx"), list(w.shape))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", 1, [2, 40])], [helper.make_tensor_value_info("y", 1, [2, 30])], sparse_initializer=[sparse])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "theirs.onnx")
    model = io.load(tmp_path / "theirs.onnx")
    np.testing.assert_array_equal(constant_array(model.graph.initializers["w"]), w)
    optimized, report = graphopt.optimize(tmp_path / "theirs.onnx", "dce")
    assert report.records[0].verdict in ("unchanged", "ok")


def test_int8_weights_after_quantization_use_the_zero_point(tmp_path: Path) -> None:
    q = RNG.integers(-127, 128, size=(256, 256)).astype(np.int8)
    q.reshape(-1)[RNG.permutation(q.size)[: q.size * 6 // 10]] = 3  # pruned then quantized with zero point 3
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", 1, ["N", 256])],
        [helper.make_tensor_value_info("y", 1, ["N", 256])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.array(0.02, np.float32), "scale"), numpy_helper.from_array(np.array(3, np.int8), "zp")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    io.save(model, tmp_path / "q.onnx")
    data = [{"x": RNG.standard_normal((4, 256)).astype(np.float32)}]
    reference = {level: outputs(model, data, level) for level in ("exact", "deploy")}
    optimized = model.clone()
    next(n for n in optimized.graph if n.op_type == "DequantizeLinear").metadata_props[TAG] = "quantize-weights"  # as that pass leaves it
    result = SparseStorage()(optimized)
    assert result.stats["bitmask"] == 1
    for level in ("exact", "deploy"):  # ORT fuses DQ+MatMul (MatMulNBits) at deploy: compare like with like
        np.testing.assert_array_equal(outputs(optimized, data, level)[0]["y"], reference[level][0]["y"])
    values = next(v for v in optimized.graph.initializers.values() if v.name.endswith(".nonzero"))
    assert constant_array(values)[0] == 3 and values.dtype == ir.DataType.INT8  # background = zero point, values stay int8
    io.save(optimized, tmp_path / "qs.onnx")
    assert (tmp_path / "qs.onnx").stat().st_size <= 0.6 * (tmp_path / "q.onnx").stat().st_size
    assert_valid(optimized)


def test_leaves_alone_what_does_not_pay() -> None:
    dense = matmul_model(sparse_array((64, 64), 0.2))
    assert SparseStorage()(dense).stats == {"skipped_dense": 1}
    small = matmul_model(sparse_array((15, 15), 0.9))
    assert SparseStorage()(small).stats == {"skipped_small": 1}
    coo_only = matmul_model(sparse_array((128, 128), 0.5))
    assert SparseStorage(formats=["coo"])(coo_only).stats == {"skipped_not_smaller": 1}  # 12 bytes/non-zero at 50%: bigger
    shapes = ir.from_onnx_text(
        """<ir_version: 8, opset_import: ["" : 17]> g (float[N,2048] x) => (float[N,2048] y) { y = Reshape(x, s) }"""
    )
    s = ir.Value(name="s", const_value=ir.tensor(np.zeros(2048, np.int64)), type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2048]))
    shapes.graph.register_initializer(s)
    shapes.graph[0].replace_input_with(1, s)
    assert not SparseStorage()(shapes).modified  # integer tensors other than DequantizeLinear data: never
    with pytest.raises(graphopt.errors.PipelineError):
        graphopt.pipeline.parse_pipeline("sparse-storage{formats=[csr]}")


def test_prune_then_store_on_a_trained_model(tmp_path: Path) -> None:
    model, report = graphopt.optimize(MODELS / "digits_mlp_wide.onnx", "prune-magnitude{sparsity=0.5},sparse-storage", inputs=MODELS / "digits_mlp_wide_test.npz")
    assert [r.verdict for r in report.records] == ["ok", "ok"]  # sparse-storage held bit-exact to the pruned model
    io.save(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size <= 0.6 * (MODELS / "digits_mlp_wide.onnx").stat().st_size
    assert report.records[1].after.bytes <= 0.6 * report.records[0].after.bytes
