"""fuse-gemm: MatMul + bias -> Gemm; structure, numbers at both ORT levels, idempotence, what stays."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt.passes  # noqa: F401
from graphopt.data import ShapeSpec
from graphopt.passes.gemm import FuseGemm
from tests.conftest import assert_valid, assert_within, feeds, from_text, outputs


def _text(k: int, n: int, a_shape: str = "B,{k}", bias: str = "float[{n}]", y_shape: str = "B,{n}") -> str:
    rng = np.random.default_rng(k * 1000 + n)
    w = ", ".join(f"{v:.6f}" for v in rng.standard_normal(k * n))
    b_shape = bias.format(n=n)
    count = int(np.prod([int(d) for d in b_shape[b_shape.index("[") + 1 : -1].split(",")]))
    b = ", ".join(f"{v:.6f}" for v in rng.standard_normal(count))
    return f"""<ir_version: 8, opset_import: ["" : 17]> g (float[{a_shape.format(k=k)}] x) => (float[{y_shape.format(n=n)}] y) {{
        w = Constant<value=float[{k},{n}] {{{w}}}>()  b = Constant<value={b_shape} {{{b}}}>()
        m = MatMul(x, w)  y = Add(m, b) }}"""


@pytest.mark.parametrize("k,n", [(200, 2), (16, 8), (300, 4)])
def test_fuses_and_matches_deploy_level_exactly(k: int, n: int) -> None:
    model = from_text(_text(k, n))
    data = [s for size in (1, 5, 33) for s in feeds(model, samples=1, spec=ShapeSpec(by_dim={"B": size}))]
    exact, deploy = outputs(model, data), outputs(model, data, "deploy")
    result = FuseGemm()(model)
    assert result.stats == {"fused": 1} and [n.op_type for n in model.graph if n.op_type != "Constant"] == ["Gemm"]
    assert_valid(model)
    assert_within(model, data, exact, FuseGemm.tolerance)
    for ref, got in zip(deploy, outputs(model, data, "deploy")):  # ORT fuses MatMul+Add itself at its default level
        np.testing.assert_array_equal(ref["y"], got["y"])
    assert not FuseGemm()(model).modified


@pytest.mark.parametrize(
    "a_shape,bias,y_shape,why",
    [("B,3,{k}", "float[{n}]", "B,3,{n}", "a_not_2d"), ("5,{k}", "float[5,{n}]", "5,{n}", "bias_not_per_column")],
)
def test_leaves_alone(a_shape: str, bias: str, y_shape: str, why: str) -> None:
    model = from_text(_text(4, 3, a_shape, bias, y_shape))
    assert FuseGemm()(model).stats == {why: 1}


def test_shared_matmul_output_stays() -> None:
    model = from_text("""<ir_version: 8, opset_import: ["" : 17]> g (float[B,2] x, float[2,3] w) => (float[B,3] y, float[B,3] z) {
        b = Constant<value=float[3] {1, 2, 3}>()  m = MatMul(x, w)  y = Add(m, b)  z = Relu(m) }""")
    assert FuseGemm()(model).stats == {"matmul_output_shared": 1}
