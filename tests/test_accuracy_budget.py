"""Task-accuracy budgets: labels in the verification inputs, accuracy measured after every lossy pass."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.cli import parse_tolerance
from graphopt.errors import UsageError, VerificationError
from graphopt.metrics import Tolerance, task_accuracy
from graphopt.passes.prune import PruneMagnitude

from conftest import MODELS

CNN, CNN_DATA = MODELS / "digits_cnn.onnx", MODELS / "digits_cnn_test.npz"


def test_task_accuracy_reads_labels_or_scores_and_skips_what_does_not_fit() -> None:
    labels = np.array([0, 2, 1, 1])
    scores = np.eye(3, dtype=np.float32)[[0, 2, 0, 1]]
    shape = np.array([2, 3, 5])  # an int output, but not one row per sample row
    samples = [{"shape": shape, "label": np.array([0, 2]), "scores": scores[:2]}, {"shape": shape, "label": np.array([0, 1]), "scores": scores[2:]}]
    got = task_accuracy(samples, labels, rows=[2, 2])
    assert got is not None and (got.output, got.accuracy) == ("label", 0.75)
    got = task_accuracy([{k: v for k, v in s.items() if k != "label"} for s in samples], labels, rows=[2, 2])
    assert got is not None and (got.output, got.accuracy) == ("scores", 0.75)
    assert task_accuracy([{"score": np.zeros(4, np.float32), "mask": np.zeros((4, 1), np.int64)}], labels, rows=[4]) is None
    assert task_accuracy([{"embedding": scores}], np.array([0, 2, -1, 1]), rows=[4]) is None  # -1: not class indices
    assert task_accuracy([{"embedding": scores}], np.array([0, 2, 3, 1]), rows=[4]) is None  # 3 classes only


def test_accuracy_budget_replaces_the_default_output_budget_unless_stated() -> None:
    prune = PruneMagnitude(budget_max_accuracy_drop=0.5)
    assert prune.budget() == Tolerance(max_accuracy_drop=0.5)
    assert PruneMagnitude(budget_max_accuracy_drop=0.5, budget_min_sqnr=3.0).budget() == Tolerance(min_sqnr_db=3.0, max_accuracy_drop=0.5)
    assert PruneMagnitude().budget(Tolerance(max_accuracy_drop=1.0)) == Tolerance(max_accuracy_drop=1.0)  # --tolerance accuracy-drop=1
    assert PruneMagnitude().budget().min_sqnr_db == PruneMagnitude.tolerance.min_sqnr_db  # no task budget: unchanged
    assert parse_tolerance("accuracy-drop=0.5,sqnr=10") == Tolerance(min_sqnr_db=10.0, max_accuracy_drop=0.5)


def test_pass_over_the_accuracy_budget_fails_naming_the_drop() -> None:
    with pytest.raises(VerificationError, match=r"prune-magnitude.*task accuracy .* drop of [0-9.]+ points > 0.1"):
        graphopt.optimize(CNN, "prune-magnitude{sparsity=0.8,budget-max-accuracy-drop=0.1}", inputs=CNN_DATA)


def test_generous_accuracy_budget_accepts_what_the_default_sqnr_budget_rejects() -> None:
    pipeline = "prune-magnitude{sparsity=0.6}"
    with pytest.raises(VerificationError, match="SQNR"):
        graphopt.optimize(CNN, pipeline, inputs=CNN_DATA)
    _, report = graphopt.optimize(CNN, "prune-magnitude{sparsity=0.6,budget-max-accuracy-drop=5}", inputs=CNN_DATA)
    (record,) = report.records
    assert record.verdict == "ok" and record.accuracy is not None
    reference, after = record.accuracy
    assert reference == pytest.approx(0.9861, abs=1e-3) and reference - after <= 0.05
    assert record.to_json()["accuracy"] == {"reference": reference, "after": after}


def test_accuracy_budget_without_labels_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="needs labels"):
        graphopt.optimize(CNN, "prune-magnitude{budget-max-accuracy-drop=1}")
