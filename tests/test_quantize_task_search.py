"""The quantization searches with a task budget: labelled calibration data holds every candidate to it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.errors import UsageError
from graphopt.metrics import task_accuracy
from graphopt.verify import run

from conftest import assert_valid

ROWS = 400


def _fragile_classifier(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A 3-layer MLP with random weights and its inputs: many rows have near-tied logits, so int8
    noise flips some top-1 classes; labels are the float model's own top-1 (agreement as the task)."""
    rng = np.random.default_rng(seed)
    sizes = [24, 64, 64, 10]
    nodes, inits, x = [], [], "x"
    for k, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        inits.append(numpy_helper.from_array((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32), f"w{k}"))
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(n_out)).astype(np.float32), f"b{k}"))
        y = "logits" if k == len(sizes) - 2 else f"h{k}"
        nodes.append(helper.make_node("Gemm", [x, f"w{k}", f"b{k}"], [y + ("_pre" if y != "logits" else "")]))
        if y != "logits":
            nodes.append(helper.make_node("Relu", [y + "_pre"], [y]))
        x = y
    graph = helper.make_graph(
        nodes, "fragile", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", sizes[0]])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", sizes[-1]])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = rng.standard_normal((ROWS, sizes[0])).astype(np.float32)
    import onnx_ir as ir

    labels = run(ir.from_proto(model), [{"x": data}], "exact")[0]["logits"].argmax(-1)
    return model, data, labels


def _drop(model, data: np.ndarray, labels: np.ndarray) -> float:  # noqa: ANN001
    got = task_accuracy(run(model, [{"x": data}], "deploy"), labels, [len(data)])
    assert got is not None
    return 100.0 * (1.0 - got.accuracy)


@pytest.mark.parametrize(
    "pass_name, options, budget",  # budget: points of accuracy, 1.0 = 4 of the 400 rows (weight-only int8 flips fewer rows)
    [("quantize-static", "", 1.0), ("quantize-weights", "", 0.5), ("quantize-dynamic", "min-elements=0,", 1.0)],
)
def test_search_keeps_layers_float_until_task_accuracy_holds_on_labelled_calibration(pass_name: str, options: str, budget: float) -> None:
    model, data, labels = _fragile_classifier()
    feed = {"x": data, "labels": labels}
    unsearched, _ = graphopt.optimize(model, f"{pass_name}{{{options}search=false}}", inputs=feed, on_violation="rollback")
    assert _drop(unsearched, data, labels) > budget + 0.2  # all-int8 flips a row more than the budget allows: the search has work to do

    out, report = graphopt.optimize(model, f"{pass_name}{{{options}budget-max-accuracy-drop={budget}}}", inputs=feed)
    (record,) = report.records
    assert record.verdict == "ok" and record.accuracy is not None and 100 * (1.0 - record.accuracy[1]) <= budget
    assert record.stats["search_task_samples"] == 1 and record.stats["reached_accuracy_drop_centi_points"] <= 100 * budget
    kept = [r for r in record.layers if r.get("choice") == "float"]
    assert kept and len(kept) < len(record.layers)  # some layers still quantized
    assert _drop(out, data, labels) <= budget
    assert_valid(out)


def test_task_budget_without_labelled_calibration_falls_back_to_the_output_budget() -> None:
    model, data, labels = _fragile_classifier()
    out, report = graphopt.optimize(model, "quantize-static{budget-max-accuracy-drop=50}", inputs={"x": data, "labels": labels}, calibration={"x": data})
    (record,) = report.records
    assert record.stats["search_task_unchecked"] == 1 and "search_task_samples" not in record.stats
    assert record.verdict == "ok"  # the runner still judged the task budget, on the labelled verification data


def test_calibration_labels_that_fit_no_output_are_a_usage_error() -> None:
    model, data, _ = _fragile_classifier()
    with pytest.raises(UsageError, match="calibration labels"):
        graphopt.optimize(model, "quantize-static{budget-max-accuracy-drop=0,search=true}", inputs={"x": data, "labels": np.zeros(ROWS, np.int64)},
                          calibration={"x": data, "labels": np.full(ROWS, 99)})  # fmt: skip


def test_labels_must_come_with_every_sample_or_none() -> None:
    model, data, labels = _fragile_classifier()
    with pytest.raises(UsageError, match="some input samples only"):
        graphopt.optimize(model, "dce", inputs=[{"x": data, "labels": labels}, {"x": data}])
