"""fold-constants and fold-batchnorm: structure, ORT numbers, idempotence, caps, shared weights, negatives."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt.data import ShapeSpec
from graphopt.metrics import Tolerance
from graphopt.passes.batchnorm import FoldBatchnorm
from graphopt.passes.folding import FoldConstants
from tests.conftest import assert_valid, assert_within, feeds, from_text, outputs

EXACT = Tolerance.exact()


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]


def run_pass(text: str, pass_, tol: Tolerance = EXACT) -> tuple[ir.Model, dict[str, int]]:
    model = from_text(text)
    data = feeds(model)
    reference = outputs(model, data)
    result = pass_(model)
    assert_valid(model)
    assert_within(model, data, reference, tol)
    assert not pass_(model).modified  # idempotent
    return model, result.stats


def test_folds_constant_chain_bit_exact() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[3] x) => (float[3] y) {
        a = Constant<value=float[3] {1, 2, 3}>()  b = Constant<value=float[3] {7, 0.1, 3}>()
        s = Sqrt(a)  d = Div(s, b)  e = Exp(d)  y = Mul(x, e) }"""
    model, stats = run_pass(text, FoldConstants())
    assert ops(model) == ["Mul"] and stats["folded"] == 3
    folded = model.graph.node(0).inputs[1].const_value.numpy()
    a, b = np.float32([1, 2, 3]), np.float32([7, 0.1, 3])
    np.testing.assert_array_equal(folded, outputs(from_text(text), [{"x": np.ones(3, np.float32)}])[0]["y"])
    assert folded.dtype == np.float32 and np.allclose(folded, np.exp(np.sqrt(a) / b))


def test_scalar_results_stay_scalar() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[2] x) => (float[2] y) {
        a = Constant<value=float {2}>()  b = Mul(a, a)  y = Mul(x, b) }"""
    model, _ = run_pass(text, FoldConstants())
    assert model.graph.node(0).inputs[1].const_value.shape == ir.Shape([])


def test_shape_gather_unsqueeze_concat_chain() -> None:
    """The static part of a dynamic shape folds: Reshape gets a constant [-1, 12]."""
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,3,4] x) => (float[N,12] y) {
        s = Shape(x)
        i1 = Constant<value=int64 {1}>()  i2 = Constant<value=int64 {2}>()
        d1 = Gather<axis=0>(s, i1)  d2 = Gather<axis=0>(s, i2)  p = Mul(d1, d2)
        ax = Constant<value=int64[1] {0}>()  u = Unsqueeze(p, ax)
        m = Constant<value=int64[1] {-1}>()  t = Concat<axis=0>(m, u)
        y = Reshape(x, t) }"""
    model, stats = run_pass(text, FoldConstants())
    assert ops(model) == ["Shape", "Reshape"] or ops(model) == ["Reshape"]
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    np.testing.assert_array_equal(reshape.inputs[1].const_value.numpy(), [-1, 12])


def test_shape_slice_of_static_dims() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,3,4] x) => (float[N,12] y) {
        s = Shape(x)  st = Constant<value=int64[1] {1}>()  en = Constant<value=int64[1] {3}>()
        tail = Slice(s, st, en)  k = Constant<value=int64 {0}>()
        prod = ReduceProd<keepdims=1>(tail)  m = Constant<value=int64[1] {-1}>()  t = Concat<axis=0>(m, prod)
        y = Reshape(x, t) }"""
    model, _ = run_pass(text, FoldConstants())
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    np.testing.assert_array_equal(reshape.inputs[1].const_value.numpy(), [-1, 12])


def test_dynamic_dims_are_not_folded() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,3] x) => (int64[1] y) {
        s = Shape(x)  i = Constant<value=int64[1] {0}>()  y = Gather<axis=0>(s, i) }"""
    model = from_text(text)
    FoldConstants()(model)
    assert ops(model) == ["Shape", "Gather"]


def test_qdq_and_random_are_never_folded() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[4] x) => (float[4] y, float[4] r) {
        w = Constant<value=float[4] {0.1, 0.2, 0.3, 0.4}>()  s = Constant<value=float {0.01}>()  z = Constant<value=int8 {0}>()
        q = QuantizeLinear(w, s, z)  d = DequantizeLinear(q, s, z)  y = Add(x, d)
        r = RandomUniformLike<seed=1.0>(w) }"""
    model = from_text(text)
    FoldConstants()(model)
    assert {"QuantizeLinear", "DequantizeLinear", "RandomUniformLike"} <= set(ops(model))


def test_caps_big_fill_and_big_shared_weight() -> None:
    """ConstantOfShape stays compact; a Transpose of a single-use big weight folds (no growth),
    of a shared one does not (it would store the weight twice)."""
    values = ", ".join(str(i % 7) for i in range(100 * 100))
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,100] x) => (float[2,100] y, float[2,100] z, float[2,100] f) <float[100,100] w = {{{values}}}, float[100,100] v = {{{values}}}> {{
        wt = Transpose<perm=[1,0]>(w)  y = MatMul(x, wt)
        vt = Transpose<perm=[1,0]>(v)  z1 = MatMul(x, vt)  z = MatMul(z1, v)
        shp = Constant<value=int64[2] {{2, 100}}>()  c = ConstantOfShape<value=float[1] {{0.5}}>(shp)  f = Add(x, c) }}"""
    model, stats = run_pass(text, FoldConstants(max_fill_elements=100))
    assert ops(model).count("Transpose") == 1 and "ConstantOfShape" in ops(model), stats
    assert stats["input_too_large"] == 1 and stats["kept_fill"] == 1
    assert sum(v.const_value.size for v in model.graph.initializers.values()) <= 2 * 100 * 100 + 2


def test_if_branch_folds_with_outer_constant() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[2] x, bool c) => (float[2] y) <float[2] w = {1, 4}> {
        y = If(c) < then_branch = t () => (float[2] a) { s = Sqrt(w)  a = Mul(x, s) },
                    else_branch = e () => (float[2] b) { b = Neg(x) } > }"""
    model, stats = run_pass(text, FoldConstants())
    assert "Sqrt" not in ops(model) and stats["folded"] == 1


def test_constant_graph_output_is_kept() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[2] x) => (float[2] y, float[2] k) {
        a = Constant<value=float[2] {1, 2}>()  k = Sqrt(a)  y = Add(x, k) }"""
    model, stats = run_pass(text, FoldConstants())
    assert [v.name for v in model.graph.outputs] == ["y", "k"] and "Sqrt" in ops(model)


def test_ir3_legacy_initializer_inputs_fold_into_constant_nodes() -> None:
    """IR<4: initializers are graph inputs, yet constants for onnxruntime; new ones must be nodes."""
    text = """<ir_version: 3, opset_import: ["" : 9]> g (float[2,3] x, float[3] b) => (float[2,3] y) <float[3] b = {1, 2, 3}> {
        u = Unsqueeze<axes=[0]>(b)  y = Add(x, u) }"""
    model, stats = run_pass(text, FoldConstants())
    assert ops(model) == ["Constant", "Add"] and [v.name for v in model.graph.inputs] == ["x", "b"]


# ---------------------------------------------------------------------------------------------
# fold-batchnorm

BN_TOL = Tolerance(max_abs=1e-5, max_rel=1e-4)  # tighter than the pass's own 80 dB: small nets stay within a few ulp
RNG = np.random.default_rng(0)


def _arr(shape: tuple[int, ...], lo: float = -1.0, hi: float = 1.0) -> str:
    values = RNG.uniform(lo, hi, size=shape).astype(np.float32).reshape(-1)
    return ", ".join(f"{v:.6g}" for v in values)


def _bn_params(c: int) -> str:
    return (
        f"float[{c}] sc = {{{_arr((c,), 0.5, 2)}}}, float[{c}] sh = {{{_arr((c,))}}}, "
        f"float[{c}] mu = {{{_arr((c,))}}}, float[{c}] var = {{{_arr((c,), 0.1, 3)}}}"
    )


BN = "y = BatchNormalization<epsilon=0.001>(h, sc, sh, mu, var)"
CASES = {
    "conv-bias": (f"float[4,2,3,3] w = {{{_arr((4, 2, 3, 3))}}}, float[4] b = {{{_arr((4,))}}}, {_bn_params(4)}", "float[1,2,6,6] x", "h = Conv(x, w, b)", "float[1,4,4,4] y"),
    "conv-no-bias": (f"float[4,2,3,3] w = {{{_arr((4, 2, 3, 3))}}}, {_bn_params(4)}", "float[1,2,6,6] x", "h = Conv(x, w)", "float[1,4,4,4] y"),
    "conv-groups": (f"float[4,1,3,3] w = {{{_arr((4, 1, 3, 3))}}}, {_bn_params(4)}", "float[1,2,6,6] x", "h = Conv<group=2>(x, w)", "float[1,4,4,4] y"),
    "convtranspose": (f"float[2,3,3,3] w = {{{_arr((2, 3, 3, 3))}}}, {_bn_params(3)}", "float[1,2,4,4] x", "h = ConvTranspose(x, w)", "float[1,3,6,6] y"),
    "convtranspose-groups": (f"float[4,3,3,3] w = {{{_arr((4, 3, 3, 3))}}}, float[6] b = {{{_arr((6,))}}}, {_bn_params(6)}", "float[1,4,4,4] x", "h = ConvTranspose<group=2>(x, w, b)", "float[1,6,6,6] y"),
    "gemm": (f"float[5,3] w = {{{_arr((5, 3))}}}, float[3] b = {{{_arr((3,))}}}, {_bn_params(3)}", "float[2,5] x", "h = Gemm<beta=0.5>(x, w, b)", "float[2,3] y"),
    "gemm-transb-no-c": (f"float[3,5] w = {{{_arr((3, 5))}}}, {_bn_params(3)}", "float[2,5] x", "h = Gemm<transB=1, alpha=2.0>(x, w)", "float[2,3] y"),
    "matmul": (f"float[5,3] w = {{{_arr((5, 3))}}}, {_bn_params(3)}", "float[2,5] x", "h = MatMul(x, w)", "float[2,3] y"),
}


def _bn_text(case: str) -> str:
    inits, x, producer, y = CASES[case]
    return f"""<ir_version: 8, opset_import: ["" : 17]> g ({x}) => ({y}) <{inits}> {{ {producer}  {BN} }}"""


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_batchnorm(case: str) -> None:
    model, stats = run_pass(_bn_text(case), FoldBatchnorm(), BN_TOL)
    assert stats == {"folded": 1}
    assert "BatchNormalization" not in ops(model) and model.graph.outputs[0].name == "y"
    assert ops(model) == (["Gemm"] if case == "matmul" else [CASES[case][2].split("=")[1].split("(")[0].split("<")[0].strip()])


def test_fold_batchnorm_error_is_float_rounding() -> None:
    """The measured error, what the stated tolerance rests on: a few float32 ulps of the output."""
    model = from_text(_bn_text("conv-bias"))
    data = feeds(model, samples=4)
    reference = outputs(model, data)
    FoldBatchnorm()(model)
    got = outputs(model, data)
    for r, g in zip(reference, got):
        scale = np.abs(r["y"]).max()
        assert np.abs(r["y"] - g["y"]).max() <= 8 * np.finfo(np.float32).eps * scale


def test_fold_batchnorm_never_writes_a_shared_weight() -> None:
    inits, *_ = CASES["conv-bias"]
    text = f"""<ir_version: 8, opset_import: ["" : 17]> g (float[1,2,6,6] x) => (float[1,4,4,4] y, float[1,4,4,4] z) <{inits}> {{
        h = Conv(x, w, b)  {BN}  z = Conv(x, w, b) }}"""
    model = from_text(text)
    w_before = model.graph.initializers["w"].const_value.numpy().copy()
    model2, stats = run_pass(text, FoldBatchnorm(), BN_TOL)
    assert stats == {"folded": 1}
    second = [n for n in model2.graph if n.op_type == "Conv"][1]
    assert second.inputs[1].name == "w"
    np.testing.assert_array_equal(second.inputs[1].const_value.numpy(), w_before)
    assert [n for n in model2.graph if n.op_type == "Conv"][0].inputs[1].name != "w"


BN_KEPT = {
    "producer-output-shared": ("h = Conv(x, w, b)  y = BatchNormalization(h, sc, sh, mu, var)  z = Relu(h)", "producer_output_shared"),
    "training-mode": ("h = Conv(x, w, b)  y, rm, rv = BatchNormalization<training_mode=1>(h, sc, sh, mu, var)  z = Relu(y)", "training_or_per_element"),
    "no-producer": ("y = BatchNormalization(x2, sc, sh, mu, var)  z = Relu(y)", "no_producer"),
}


@pytest.mark.parametrize("case", sorted(BN_KEPT))
def test_fold_batchnorm_leaves_alone(case: str) -> None:
    body, why = BN_KEPT[case]
    inits, *_ = CASES["conv-bias"]
    text = f"""<ir_version: 8, opset_import: ["" : 17]> g (float[1,2,6,6] x, float[1,4,4,4] x2) => (float[1,4,4,4] y, float[1,4,4,4] z) <{inits}> {{ {body} }}"""
    model = from_text(text)
    result = FoldBatchnorm()(model)
    assert not result.modified and result.stats == {why: 1}


def test_fold_batchnorm_weight_from_graph_input_is_left_alone() -> None:
    text = f"""<ir_version: 8, opset_import: ["" : 17]> g (float[1,2,6,6] x, float[4,2,3,3] w) => (float[1,4,4,4] y) <{_bn_params(4)}> {{
        h = Conv(x, w)  {BN} }}"""
    result = FoldBatchnorm()(from_text(text))
    assert not result.modified and result.stats == {"weight_not_constant": 1}


RESHAPE = """<ir_version: 8, opset_import: ["" : 17]> g (float[N,M,12] x) => (float[N,M,3,4] y, float[Z,4] z) {
    s = Shape(x)  i0 = Constant<value=int64 {0}>()  i1 = Constant<value=int64 {1}>()  ax = Constant<value=int64[1] {0}>()
    n = Gather<axis=0>(s, i0)  m = Gather<axis=0>(s, i1)  un = Unsqueeze(n, ax)  um = Unsqueeze(m, ax)
    c34 = Constant<value=int64[2] {3, 4}>()  t = Concat<axis=0>(un, um, c34)  y = Reshape(x, t)
    nm = Mul(n, m)  k = Constant<value=int64 {3}>()  nm3 = Mul(nm, k)  u3 = Unsqueeze(nm3, ax)  c4 = Constant<value=int64[1] {4}>()
    t2 = Concat<axis=0>(u3, c4)  z = Reshape(x, t2) }"""


def test_reshape_targets_from_shape_chains_become_constant() -> None:
    """Same-index symbolic dims copy (0); one computed entry with positive ints around it is -1."""
    model = from_text(RESHAPE)
    data = feeds(model, spec=ShapeSpec.parse(["N=2", "M=5"]))
    reference = outputs(model, data)
    stats = FoldConstants()(model).stats
    assert stats["reshape_shape"] == 2
    targets = [n.inputs[1].const_value.numpy().tolist() for n in model.graph if n.op_type == "Reshape"]
    assert targets == [[0, 0, 3, 4], [-1, 4]]
    assert_valid(model)
    assert_within(model, data, reference, EXACT)
    assert not FoldConstants()(model).modified


def test_reshape_target_with_two_unknowns_is_left_alone() -> None:
    text = RESHAPE.replace("c4 = Constant<value=int64[1] {4}>()", "c4 = Unsqueeze(m, ax)").replace("float[Z,4] z", "float[Z,W] z")
    model = from_text(text)
    FoldConstants()(model)
    reshapes = [n for n in model.graph if n.op_type == "Reshape"]
    assert reshapes[1].inputs[1].const_value is None


def test_loop_body_folds_with_outer_constant() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[2] x) => (float[2] y) <float[2] w = {1, 4}> {
        n = Constant<value=int64 {3}>()
        y = Loop(n, , x) <body = body (int64 i, bool c, float[2] acc) => (bool co, float[2] out) {
            co = Identity(c)  s = Sqrt(w)  out = Mul(acc, s) }> }"""
    model, stats = run_pass(text, FoldConstants())
    assert "Sqrt" not in ops(model) and stats["folded"] == 1


def test_fold_batchnorm_ir3_fill_parameters() -> None:
    """IR 3 (onnx's light models): weights are initializer-inputs and ConstantOfShape fills; the
    folded tensors become Constant nodes (IR 3 initializers must be graph inputs)."""
    text = """<ir_version: 3, opset_import: ["" : 9]>
    g (float[1,2,5,5] x, float[3,2,3,3] w, int64[1] cs) => (float[1,3,3,3] y) <float[3,2,3,3] w = {""" + _arr((3, 2, 3, 3)) + """}, int64[1] cs = {3}> {
        sc = ConstantOfShape<value=float[1] {1.5}>(cs)  sh = ConstantOfShape<value=float[1] {0.25}>(cs)
        mu = ConstantOfShape<value=float[1] {0.1}>(cs)  var = ConstantOfShape<value=float[1] {2}>(cs)
        h = Conv(x, w)  """ + BN + """ }"""
    model, stats = run_pass(text, FoldBatchnorm(), BN_TOL)
    assert stats == {"folded": 1}
    assert "BatchNormalization" not in ops(model) and ops(model).count("Constant") == 2  # new weight and bias
    assert [v.name for v in model.graph.inputs] == ["x", "w", "cs"]


def test_float16_arithmetic_is_not_folded_but_moves_are() -> None:
    """ORT computes float16 in float32 behind Casts it drops between nodes: folding one node rounds."""
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float16[2] x) => (float16[2] y) {
        a = Constant<value=float16[2] {2, 3}>()  s = Sqrt(a)  t = Identity(a)  u = Mul(s, t)  y = Mul(x, u) }"""
    model = from_text(text)
    stats = FoldConstants()(model).stats
    assert "Sqrt" in ops(model) and "Identity" not in ops(model) and stats["skipped_float16"] >= 1


def test_if_condition_decided_by_shapes_stays_computed() -> None:
    """Made constant, ORT would inline the branch at load and re-check (and reject) its lax shapes."""
    text = """<ir_version: 8, opset_import: ["" : 17]> g (float[2,3] x) => (float[2,3] y) {
        n = Size(x)  six = Constant<value=int64 {6}>()  c = Equal(n, six)
        y = If(c) < then_branch = t () => (float[2,3] a) { a = Relu(x) }, else_branch = e () => (float[2,3] b) { b = Neg(x) } > }"""
    model, stats = run_pass(text, FoldConstants())
    assert {"Size", "Equal", "If"} <= set(ops(model)) and stats.get("kept_if_condition")


def test_fold_batchnorm_leaves_malformed_parameters_alone() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y)
    <float[3, 2, 1, 1] w = {1, 2, 3, 4, 5, 6}, float[3] s = {1, 1, 1}, float[2] b = {0, 0}, float[3] m = {0, 0, 0}, float[3] v = {1, 1, 1}> {
        c = Conv(x, w)
        y = BatchNormalization(c, s, b, m, v)
    }"""
    model = ir.from_proto(onnx.parser.parse_model(text))  # invalid on purpose: no checker here
    result = FoldBatchnorm()(model)
    assert not result.modified and result.stats.get("shape_mismatch") == 1


@pytest.mark.parametrize(("ends", "folds"), [((25, 50, 75, 100), True), ((75, 100, 100, 100), False)])
def test_weight_sliced_several_ways_folds_when_the_pieces_are_no_bigger(ends: tuple[int, ...], folds: bool) -> None:
    """torch's LSTM export: one big weight, four Slices, a Concat in another gate order. Folding them all
    frees the weight (pieces of a partition: folded); overlapping pieces would store more (left alone)."""
    values = ", ".join(str(i % 7) for i in range(100 * 100))
    starts = (0, 25, 50, 75) if folds else (0, 0, 25, 50)
    slices = "  ".join(
        f"s{k} = Constant<value=int64[1] {{{b}}}>()  e{k} = Constant<value=int64[1] {{{e}}}>()  p{k} = Slice(w, s{k}, e{k})" for k, (b, e) in enumerate(zip(starts, ends))
    )
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,100] x) => (float[2,{ends[0] + sum(e - b for b, e in zip(starts[1:], ends[1:]))}] y) <float[100,100] w = {{{values}}}> {{
        {slices}  wt = Concat<axis=0>(p0, p3, p2, p1)  tt = Transpose<perm=[1,0]>(wt)  y = MatMul(x, tt) }}"""
    model, stats = run_pass(text, FoldConstants())
    assert ("Slice" not in ops(model)) == folds and ("Concat" not in ops(model)) == folds, stats
    assert sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT) == 100 * 100  # never grows
