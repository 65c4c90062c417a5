"""Symbolic shape folding (fold-constants), cse and merge-reshapes: bit-exact at several input shapes.

Every rewrite here must hold for every input shape, so each model is checked against onnxruntime at
several sizes of its dynamic dimensions, and the negative cases (dims of another tensor, allowzero=1,
opset < 15, dim_params two graph inputs share) must stay as they are.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import graphopt.passes  # noqa: F401  (registers the passes)
from graphopt.data import ShapeSpec
from graphopt.metrics import Tolerance
from graphopt.registry import get_pass
from tests.conftest import assert_valid, assert_within, feeds, from_text, outputs

EXACT = Tolerance.exact()
PASSES = ("fold-constants", "cse", "merge-reshapes", "dce")


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]


def cleanup(text: str, sizes: list[dict[str, int]], passes: tuple[str, ...] = PASSES) -> tuple[ir.Model, dict[str, int]]:
    """Run ``passes`` to a fixed point; outputs bit-exact at every size; valid; idempotent."""
    model = from_text(text)
    data = [s for size in sizes for s in feeds(model, samples=1, spec=ShapeSpec(by_dim=size))]
    reference = outputs(model, data)
    stats: dict[str, int] = {}
    for _ in range(4):
        for name in passes:
            for k, v in get_pass(name)()(model).stats.items():
                stats[k] = stats.get(k, 0) + v
    assert_valid(model)
    assert_within(model, data, reference, EXACT)
    for name in passes:
        assert not get_pass(name)()(model).modified, name  # idempotent
    return model, stats


SIZES = [{"N": 1, "M": 4}, {"N": 3, "M": 2}, {"N": 7, "M": 5}]


def _dims_chain(opset: int) -> str:
    """Expand(z, Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)))): dims 0 and 1 of x[N,M,4]."""
    return f"""<ir_version: 8, opset_import: ["" : {opset}]> g (float[N,M,4] x, float[1,1] z) => (float[N,M] y) {{
        s = Shape(x)  i0 = Constant<value=int64 {{0}}>()  i1 = Constant<value=int64 {{1}}>()  ax = Constant<value=int64[1] {{0}}>()
        d0 = Gather<axis=0>(s, i0)  d1 = Gather<axis=0>(s, i1)  u0 = Unsqueeze(d0, ax)  u1 = Unsqueeze(d1, ax)
        t = Concat<axis=0>(u0, u1)  y = Expand(z, t) }}"""


def test_concat_of_dims_of_one_tensor_becomes_shape() -> None:
    model, stats = cleanup(_dims_chain(17), SIZES)
    assert stats["shape_rewritten"] == 1 and ops(model) == ["Shape", "Expand"]
    shape = model.graph.node(0)
    assert (shape.attributes.get_int("start"), shape.attributes.get_int("end")) == (0, 2)


def test_partial_shape_needs_opset_15() -> None:
    text = _dims_chain(14).replace("Unsqueeze(d0, ax)", "Unsqueeze(d0, ax)").replace('"" : 14', '"" : 13')
    model, stats = cleanup(text, SIZES)
    assert "shape_rewritten" not in stats and "Concat" in ops(model)  # Shape's start/end came in opset 15


def test_whole_shape_chain_is_the_shape_itself() -> None:
    text = _dims_chain(13).replace("float[N,M,4] x", "float[N,M] x")
    model, _ = cleanup(text, SIZES)
    assert ops(model) == ["Shape", "Expand"] and not model.graph.node(0).attributes.get("start")


def test_torch_expand_pattern_equal_where_goes() -> None:
    """torch's expand(n, -1): Where(Equal(shape, -1), 1, shape): a size is never -1."""
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,M] x, float[1,M] z) => (float[N,M] y) {
        s = Shape(x)  i0 = Constant<value=int64 {0}>()  ax = Constant<value=int64[1] {0}>()
        d0 = Gather<axis=0>(s, i0)  u0 = Unsqueeze(d0, ax)  m1 = Constant<value=int64[1] {-1}>()  c = Concat<axis=0>(u0, m1)
        neg = Constant<value=int64[2] {-1, -1}>()  e = Equal(c, neg)  ones = Constant<value=int64[2] {1, 1}>()
        w = Where(e, ones, c)  y = Expand(z, w) }"""
    model, _ = cleanup(text, SIZES)
    assert "Equal" not in ops(model) and "Where" in ops(model)  # [N, -1] == -1 is [False, True]: Where makes [N, 1]
    both = text.replace("m1 = Constant<value=int64[1] {-1}>()  c = Concat<axis=0>(u0, m1)", "i1 = Constant<value=int64 {1}>()  d1 = Gather<axis=0>(s, i1)  u1 = Unsqueeze(d1, ax)  c = Concat<axis=0>(u0, u1)")
    model, _ = cleanup(both, SIZES)
    assert ops(model) == ["Shape", "Expand"]  # [N, M] == -1 is all false: Where is c, which is Shape(x)


def test_equal_undecidable_stays() -> None:
    """Equal(dim, 3) depends on the input: it must stay."""
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,M] x) => (bool[1] y) {
        s = Shape(x)  st = Constant<value=int64[1] {0}>()  en = Constant<value=int64[1] {1}>()  d = Slice(s, st, en)
        k = Constant<value=int64[1] {3}>()  y = Equal(d, k) }"""
    model, _ = cleanup(text, [{"N": 3, "M": 1}, {"N": 2, "M": 1}])
    assert "Equal" in ops(model)


def test_same_dims_of_same_tensor_are_computed_once() -> None:
    """Shape(a)[0] and Shape(relu(a))[0]: onnx's inference names both N, one Gather is enough."""
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,M] x) => (float[N,M] y) {
        a = Relu(x)  s1 = Shape(x)  s2 = Shape(a)  i0 = Constant<value=int64 {0}>()  j0 = Constant<value=int64 {0}>()
        d1 = Gather<axis=0>(s1, i0)  d2 = Gather<axis=0>(s2, j0)  ax = Constant<value=int64[1] {0}>()
        u1 = Unsqueeze(d1, ax)  u2 = Unsqueeze(d2, ax)  m = Constant<value=int64[1] {-1}>()
        t1 = Concat<axis=0>(u1, m)  t2 = Concat<axis=0>(u2, m)  f = Cast<to=1>(t1)  g2 = Cast<to=1>(t2)
        p = Add(f, g2)  q = ReduceSum<keepdims=1>(p)  y = Add(a, q) }"""
    model, stats = cleanup(text, SIZES)
    assert stats["shape_reused"] >= 1 and ops(model).count("Shape") == 1 and ops(model).count("Concat") == 1


def test_dims_of_graph_inputs_sharing_a_dim_param_are_not_trusted() -> None:
    """x[N,3] and y[N,6]: nothing makes a caller feed the same N, so Reshape(y, [N_x, -1]) stays computed."""
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,3] x, float[N,6] y) => (float[?,?] z) {
        s = Shape(x)  st = Constant<value=int64[1] {0}>()  en = Constant<value=int64[1] {1}>()  d = Slice(s, st, en)
        m = Constant<value=int64[1] {-1}>()  t = Concat<axis=0>(d, m)  z = Reshape(y, t) }"""
    model, _ = cleanup(text, [{"N": 2}, {"N": 5}])
    assert "Shape" in ops(model) and "Concat" in ops(model)
    mismatched = [{"x": np.ones((2, 3), np.float32), "y": np.arange(18, dtype=np.float32).reshape(3, 6)}]
    assert outputs(model, mismatched)[0]["z"].shape == (2, 9)  # what the original computes


def test_dims_of_another_tensor_do_not_become_copy_dims() -> None:
    """Reshape(y, [dim0(x), -1]) with y[K,6] and x[N,3]: dim 0 of x is not y's, no 0 in the target."""
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,3] x, float[K,6] y) => (float[?,?] z) {
        s = Shape(x)  st = Constant<value=int64[1] {0}>()  en = Constant<value=int64[1] {1}>()  d = Slice(s, st, en)
        m = Constant<value=int64[1] {-1}>()  t = Concat<axis=0>(d, m)  z = Reshape(y, t) }"""
    model, _ = cleanup(text, [{"N": 2, "K": 3}, {"N": 3, "K": 2}])
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value is None


@pytest.mark.parametrize("allowzero", [0, 1])
def test_reshape_copy_dim_through_int32_cast(allowzero: int) -> None:
    """paddle2onnx: Cast(Shape(x), int32) → Slice → Cast(int64) → Concat(N, M, [3, 2]); allowzero=1 must stay."""
    text = f"""<ir_version: 8, opset_import: ["" : 17]> g (float[N,M,6] x) => (float[?,?,?,?] y) {{
        s = Shape(x)  s32 = Cast<to=6>(s)  st = Constant<value=int64[1] {{0}}>()  en = Constant<value=int64[1] {{2}}>()
        d32 = Slice(s32, st, en)  d = Cast<to=7>(d32)  tail = Constant<value=int64[2] {{3, 2}}>()
        t = Concat<axis=0>(d, tail)  x2 = Relu(x)  y = Reshape<allowzero={allowzero}>(x2, t) }}"""
    model, _ = cleanup(text, SIZES)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    if allowzero:
        assert reshape.inputs[1].const_value is None  # with allowzero=1 a 0 is a literal 0: no copy-dims
    else:
        np.testing.assert_array_equal(reshape.inputs[1].const_value.numpy(), [0, 0, 3, 2])
        assert ops(model) == ["Relu", "Reshape"]


def test_slice_keeps_dims_it_does_not_slice() -> None:
    """torch's position_ids[:, :seq]: dim 0 of the Slice is the constant's 1, which onnx's inference loses."""
    text = """<ir_version: 8, opset_import: ["" : 17]> g (int64[N,M] ids) => (float[?,?] y) {
        table = Constant<value=float[1,8] {0, 1, 2, 3, 4, 5, 6, 7}>()  s = Shape(ids)  i1 = Constant<value=int64 {1}>()
        m = Gather<axis=0>(s, i1)  ax = Constant<value=int64[1] {0}>()  e = Unsqueeze(m, ax)  st = Constant<value=int64[1] {0}>()
        a1 = Constant<value=int64[1] {1}>()  pos = Slice(table, st, e, a1)  ps = Shape(pos)  i0 = Constant<value=int64 {0}>()
        rows = Gather<axis=0>(ps, i0)  ru = Unsqueeze(rows, ax)  mm = Constant<value=int64[1] {-1}>()  t = Concat<axis=0>(ru, mm)
        y = Reshape(pos, t) }"""
    model, _ = cleanup(text, [{"N": 2, "M": 3}, {"N": 1, "M": 8}])
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    np.testing.assert_array_equal(reshape.inputs[1].const_value.numpy(), [1, -1])


def test_cse_merges_equal_nodes_and_constants_by_value() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,4] x) => (float[N,4] y, float[N,4] r1, float[N,4] r2) {
        a = Constant<value=float {2}>()  b = Constant<value=float {2}>()  m1 = Mul(x, a)  m2 = Mul(x, b)
        y = Add(m1, m2)  r1 = RandomNormalLike(x)  r2 = RandomNormalLike(x) }"""
    model = from_text(text)
    data = feeds(model, spec=ShapeSpec(by_dim={"N": 3}))
    reference = outputs(model, data)
    result = get_pass("cse")()(model)
    assert result.stats["merged"] == 1 and ops(model).count("Mul") == 1 and ops(model).count("RandomNormalLike") == 2
    assert_valid(model)
    got = outputs(model, data)
    for ref, out in zip(reference, got):
        np.testing.assert_array_equal(ref["y"], out["y"])
    assert not get_pass("cse")()(model).modified


def test_cse_keeps_two_graph_outputs() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,4] x) => (float[N,4] y1, float[N,4] y2, float[N,4] y3) {
        y1 = Relu(x)  y2 = Relu(x)  r = Relu(x)  y3 = Neg(r) }"""
    model = from_text(text)
    get_pass("cse")()(model)
    assert_valid(model)
    assert [o.name for o in model.graph.outputs] == ["y1", "y2", "y3"]
    assert ops(model).count("Relu") == 2  # y1 and y2 both stay; r reads y1


@pytest.mark.parametrize("opset", [11, 17])
def test_unsqueeze_chain_merges(opset: int) -> None:
    if opset >= 13:
        un = "ax1 = Constant<value=int64[1] {1}>()  ax2 = Constant<value=int64[1] {-1}>()  ax3 = Constant<value=int64[2] {0, 2}>()\n"
        un += "u1 = Unsqueeze(x, ax1)  u2 = Unsqueeze(u1, ax2)  y = Unsqueeze(u2, ax3)"
    else:
        un = "u1 = Unsqueeze<axes=[1]>(x)  u2 = Unsqueeze<axes=[-1]>(u1)  y = Unsqueeze<axes=[0, 2]>(u2)"
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]> g (float[N,M] x) => (float[1,N,1,1,M,1] y) {{ {un} }}"""
    model, stats = cleanup(text, SIZES, ("merge-reshapes", "dce"))
    assert ops(model) == ["Unsqueeze"] and stats["merged_unsqueeze"] == 2


def test_reshape_chain_merges_unless_the_outer_copies_a_middle_dim() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,6] x) => (float[?,?] y, float[?,?,?] z) {
        s1 = Constant<value=int64[1] {-1}>()  s2 = Constant<value=int64[2] {-1, 3}>()  s3 = Constant<value=int64[3] {0, 3, -1}>()
        a = Reshape(x, s1)  y = Reshape(a, s2)  b = Reshape(x, s2)  z = Reshape(b, s3) }"""
    model, stats = cleanup(text, SIZES, ("merge-reshapes", "dce"))
    assert stats["merged_reshape"] == 1 and ops(model).count("Reshape") == 3


def test_two_dims_of_one_input_sharing_a_dim_param_are_not_trusted() -> None:
    """x[N,N]: a caller may feed [2,3]; Reshape(x, [dim1, -1]) must not become [0, -1]."""
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,N] x) => (float[?,?] z) {
        s = Shape(x)  st = Constant<value=int64[1] {1}>()  en = Constant<value=int64[1] {2}>()  d = Slice(s, st, en)
        m = Constant<value=int64[1] {-1}>()  t = Concat<axis=0>(d, m)  z = Reshape(x, t) }"""
    model, _ = cleanup(text, [{"N": 2}, {"N": 4}])
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value is None
    assert outputs(model, [{"x": np.ones((2, 3), np.float32)}])[0]["z"].shape == (3, 2)
