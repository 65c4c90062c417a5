"""remove-dropout and remove-identity on hand-built edge cases: structure, ORT numbers, idempotence, negatives."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.passes.simplify import RemoveDropout, RemoveIdentity
from graphopt.metrics import Tolerance
from tests.conftest import assert_valid, assert_within, feeds, from_text, outputs

EXACT = Tolerance.exact()


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]


def check_removes(text: str, pass_, gone: str, *, remaining: int | None = None) -> ir.Model:
    """The pass modifies, keeps the model valid and bit-exact, and a second run is a no-op."""
    model = from_text(text)
    data = feeds(model)
    reference = outputs(model, data)
    signature = [(v.name, v.dtype) for v in [*model.graph.inputs, *model.graph.outputs]]
    result = pass_(model)
    assert result.modified, result.stats
    assert_valid(model)
    assert [(v.name, v.dtype) for v in [*model.graph.inputs, *model.graph.outputs]] == signature
    assert_within(model, data, reference, EXACT)
    if remaining is not None:
        assert ops(model).count(gone) == remaining, ops(model)
    assert not pass_(model).modified  # idempotent
    return model


DROPOUT = {
    "opset6-is-test": """<ir_version: 7, opset_import: ["" : 6]>
        g (float[2,3] x) => (float[2,3] y) { d = Dropout<is_test=1>(x)  y = Relu(d) }""",
    "opset9-ratio-attr": """<ir_version: 7, opset_import: ["" : 9]>
        g (float[2,3] x) => (float[2,3] y) { d, m = Dropout<ratio=0.3>(x)  y = Relu(d) }""",
    "opset11-attr": """<ir_version: 7, opset_import: ["" : 11]>
        g (float[2,3] x) => (float[2,3] y) { d = Dropout<ratio=0.5>(x)  y = Relu(d) }""",
    "opset13-ratio-input": """<ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y) { r = Constant<value=float {0.5}>()  d = Dropout(x, r)  y = Relu(d) }""",
    "opset13-training-false": """<ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y) {
            r = Constant<value=float {0.5}>()  t = Constant<value=bool {0}>()  d = Dropout(x, r, t)  y = Relu(d) }""",
    "opset13-training-false-initializer": """<ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y) <bool t = {0}> { d = Dropout(x, , t)  y = Relu(d) }""",
    "opset13-output-is-graph-output": """<ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y) { h = Relu(x)  y = Dropout(h) }""",
    "opset13-mask-consumed": """<ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y, float[2,3] z) { d, m = Dropout(x)  y = Relu(d)  z = Cast<to=1>(m) }""",
    "opset22-chain": """<ir_version: 10, opset_import: ["" : 22]>
        g (float[N,3] x) => (float[N,3] y) { a = Dropout(x)  b = Dropout(a)  y = Relu(b) }""",
}


@pytest.mark.parametrize("case", sorted(DROPOUT))
def test_remove_dropout(case: str) -> None:
    if case.startswith("opset6"):  # onnxruntime has no Dropout-6 kernel: structure only
        model = from_text(DROPOUT[case])
        assert RemoveDropout()(model).modified
        assert_valid(model)
        assert "Dropout" not in ops(model)
        assert not RemoveDropout()(model).modified
        return
    model = check_removes(DROPOUT[case], RemoveDropout(), "Dropout", remaining=0)
    assert model.graph.outputs[0].name == "y"


def test_consumed_mask_becomes_all_true() -> None:
    model = check_removes(DROPOUT["opset13-mask-consumed"], RemoveDropout(), "Dropout", remaining=0)
    cast = next(n for n in model.graph if n.op_type == "Cast")
    mask = cast.inputs[0].const_value.numpy()
    assert mask.dtype == np.bool_ and mask.shape == (2, 3) and mask.all()


KEPT = {
    "training-true": ("""<ir_version: 8, opset_import: ["" : 13]> g (float[2,3] x) => (float[2,3] y)
        { r = Constant<value=float {0.5}>()  t = Constant<value=bool {1}>()  y = Dropout(x, r, t) }""", "training_mode_true"),
    "training-is-input": ("""<ir_version: 8, opset_import: ["" : 13]> g (float[2,3] x, bool t) => (float[2,3] y)
        { y = Dropout(x, , t) }""", "training_mode_not_constant"),
    "opset6-training": ("""<ir_version: 7, opset_import: ["" : 6]> g (float[2,3] x) => (float[2,3] y)
        { y = Dropout(x) }""", "is_test_unset"),
    "mask-is-output": ("""<ir_version: 8, opset_import: ["" : 13]> g (float[2,3] x) => (float[2,3] y, bool[2,3] m)
        { y, m = Dropout(x) }""", "mask_is_graph_output"),
    "mask-consumed-opset11": ("""<ir_version: 7, opset_import: ["" : 11]> g (float[2,3] x) => (float[2,3] y, float[2,3] z)
        { d, m = Dropout(x)  y = Relu(d)  z = Cast<to=1>(m) }""", "mask_undefined_before_12"),
    "mask-shape-unknown": ("""<ir_version: 8, opset_import: ["" : 13]> g (float[N,M] x) => (float[N,M] y, float[N,M] z)
        { d, m = Dropout(x)  y = Relu(d)  z = Cast<to=1>(m) }""", "mask_shape_unknown"),
}


@pytest.mark.parametrize("case", sorted(KEPT))
def test_remove_dropout_leaves_alone(case: str) -> None:
    text, why = KEPT[case]
    model = from_text(text)
    result = RemoveDropout()(model)
    assert not result.modified
    assert result.stats == {why: 1}
    assert "Dropout" in ops(model)


def test_dropout_from_graph_input_to_output_becomes_identity() -> None:
    text = """<ir_version: 8, opset_import: ["" : 13]> g (float[2,3] x) => (float[2,3] y) { y = Dropout(x) }"""
    model = check_removes(text, RemoveDropout(), "Dropout", remaining=0)
    assert ops(model) == ["Identity"] and model.graph.outputs[0].name == "y"


def test_dropout_in_if_and_loop_bodies_with_outer_values() -> None:
    text = """<ir_version: 8, opset_import: ["" : 13]>
    g (float[2,3] x, bool c) => (float[2,3] y, float[2,3] z) {
        h = Relu(x)
        y = If(c) <
            then_branch = t () => (float[2,3] a) { d = Dropout(h)  a = Relu(d) },
            else_branch = e () => (float[2,3] b) { b = Dropout(h) }>
        n = Constant<value=int64 {2}>()
        z = Loop(n, , x) <body = body (int64 i, bool cond, float[2,3] acc) => (bool co, float[2,3] out) {
            co = Identity(cond)  d = Dropout(h)  out = Add(acc, d) }>
    }"""
    model = check_removes(text, RemoveDropout(), "Dropout")
    # the else branch returns an outer-scope value: its Dropout becomes an Identity, it can't vanish
    assert ops(model).count("Dropout") == 0 and ops(model).count("Identity") == 2


# ---------------------------------------------------------------------------------------------
# remove-identity

NOOPS = {
    "identity-chain": "{ a = Identity(x)  b = Identity(a)  y = Relu(b) }",
    "identity-to-output": "{ a = Relu(x)  y = Identity(a) }",
    "cast-same-type": "{ a = Cast<to=1>(x)  y = Relu(a) }",
    "castlike-same-type": "{ a = CastLike(x, x)  y = Relu(a) }",
    "transpose-identity-perm": "{ a = Transpose<perm=[0,1,2]>(x)  y = Relu(a) }",
    "reshape-same-static": "{ s = Constant<value=int64[3] {2,3,4}>()  a = Reshape(x, s)  y = Relu(a) }",
    "reshape-zero-copies": "{ s = Constant<value=int64[3] {0,-1,4}>()  a = Reshape(x, s)  y = Relu(a) }",
    "pad-zero": "{ p = Constant<value=int64[6] {0,0,0,0,0,0}>()  a = Pad(x, p)  y = Relu(a) }",
    "concat-one-input": "{ a = Concat<axis=1>(x)  y = Relu(a) }",
    "unsqueeze-squeeze": "{ k = Constant<value=int64[1] {1}>()  a = Unsqueeze(x, k)  b = Squeeze(a, k)  y = Relu(b) }",
    "squeeze-unsqueeze-negative": "{ k = Constant<value=int64[1] {-1}>()  a = Unsqueeze(x, k)  b = Squeeze(a, k)  y = Relu(b) }",
    "mul-one": "{ k = Constant<value=float[4] {1,1,1,1}>()  a = Mul(k, x)  y = Relu(a) }",
    "div-one": "{ k = Constant<value=float {1}>()  a = Div(x, k)  y = Relu(a) }",
    "add-negative-zero": "{ k = Constant<value=float[1,1,1] {-0.0}>()  a = Add(x, k)  y = Relu(a) }",
    "sub-zero": "{ k = Constant<value=float {0}>()  a = Sub(x, k)  y = Relu(a) }",
}


@pytest.mark.parametrize("case", sorted(NOOPS))
def test_remove_identity(case: str) -> None:
    text = f"""<ir_version: 8, opset_import: ["" : 15]> g (float[2,3,4] x) => (float[2,3,4] y) {NOOPS[case]}"""
    model = check_removes(text, RemoveIdentity(), "Identity", remaining=0)
    assert [n.op_type for n in model.graph if n.op_type != "Constant"] == ["Relu"] or case == "identity-to-output"
    assert model.graph.outputs[0].name == "y"


NOT_NOOPS = {
    "input-to-output": "{ y = Identity(x) }",
    "cast-other-type": "{ a = Cast<to=11>(x)  y = Cast<to=1>(a) }",
    "transpose-real": "{ a = Transpose<perm=[0,2,1]>(x)  y = Transpose<perm=[0,2,1]>(a) }",
    "mul-broadcasts-up": "{ k = Constant<value=float[5,1,1,1] {1,1,1,1,1}>()  a = Mul(x, k)  z = Constant<value=int64[1] {0}>()  y = ReduceSum<keepdims=0>(a, z) }",
    "mul-two": "{ k = Constant<value=float {2}>()  y = Mul(x, k) }",
    "add-positive-zero": "{ k = Constant<value=float {0}>()  y = Add(x, k) }",
    "squeeze-other-axes": "{ k = Constant<value=int64[1] {1}>()  j = Constant<value=int64[1] {2}>()  a = Unsqueeze(x, k)  b = Unsqueeze(a, j) s = Squeeze(b, j)  y = Squeeze(s, k) }",
}


@pytest.mark.parametrize("case", sorted(NOT_NOOPS))
def test_remove_identity_leaves_alone(case: str) -> None:
    text = f"""<ir_version: 8, opset_import: ["" : 13]> g (float[2,3,4] x) => (float[2,3,4] y) {NOT_NOOPS[case]}"""
    model = from_text(text)
    before = ops(model)
    if case == "squeeze-other-axes":  # the inner pair cancels; the outer one then too: all four go
        assert RemoveIdentity()(model).modified
        return
    assert not RemoveIdentity()(model).modified
    assert ops(model) == before


def test_identity_between_two_graph_outputs_is_kept() -> None:
    text = """<ir_version: 8, opset_import: ["" : 13]> g (float[2] x) => (float[2] a, float[2] b) { a = Relu(x)  b = Identity(a) }"""
    model = from_text(text)
    assert not RemoveIdentity()(model).modified
    assert [v.name for v in model.graph.outputs] == ["a", "b"]


def test_identity_of_initializer_to_output_is_kept() -> None:
    text = """<ir_version: 8, opset_import: ["" : 13]> g (float[2] x) => (float[2] y, float[2] w2) <float[2] w = {1, 2}>
        { y = Add(x, w)  w2 = Identity(w) }"""
    model = from_text(text)
    assert not RemoveIdentity()(model).modified


def test_identity_in_subgraph_of_outer_value_is_kept() -> None:
    text = """<ir_version: 8, opset_import: ["" : 13]>
    g (float[2] x, bool c) => (float[2] y) {
        h = Relu(x)
        y = If(c) < then_branch = t () => (float[2] a) { a = Identity(h) },
                    else_branch = e () => (float[2] b) { i = Identity(h)  b = Neg(i) } >
    }"""
    check_removes(text, RemoveIdentity(), "Identity", remaining=1)


def test_cast_from_graph_input_to_output_becomes_identity() -> None:
    text = """<ir_version: 8, opset_import: ["" : 13]> g (float[2] x) => (float[2] y) { y = Cast<to=1>(x) }"""
    model = check_removes(text, RemoveIdentity(), "Cast", remaining=0)
    assert ops(model) == ["Identity"]


def test_add_zero_signed_option() -> None:
    text = """<ir_version: 8, opset_import: ["" : 13]> g (float[2] x) => (float[2] y) { k = Constant<value=float {0}>()  a = Add(x, k)  y = Neg(a) }"""
    model = from_text(text)
    assert RemoveIdentity(keep_signed_zero=False)(model).modified
    assert ops(model) == ["Constant", "Neg"]
    ints = """<ir_version: 8, opset_import: ["" : 13]> g (int64[2] x) => (int64[2] y) { k = Constant<value=int64 {0}>()  a = Add(x, k)  y = Neg(a) }"""
    check_removes(ints, RemoveIdentity(), "Add", remaining=0)  # integers have no signed zero
