"""Every committed model loads, passes the full checker, runs in onnxruntime and meets its recorded accuracy."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from graphopt import io
from graphopt.data import load_npz
from graphopt.verify import run

from conftest import MODELS

COMMITTED = sorted(p.stem for p in MODELS.glob("*.onnx"))


def test_the_zoo_is_there() -> None:
    assert {"digits_cnn", "digits_mlp_wide", "digits_skl_mlp", "seq_transformer"} <= set(COMMITTED)


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_model_meets_recorded_accuracy(name: str) -> None:
    path = MODELS / f"{name}.onnx"
    info = json.loads((MODELS / f"{name}.json").read_text())
    assert path.stat().st_size < 5_000_000, "committed models stay small"
    onnx.checker.check_model(str(path), full_check=True)
    model = io.load(path)
    samples, labels = load_npz(MODELS / f"{name}_test.npz", model)
    assert labels is not None
    outputs = run(model, samples, "exact")
    pred = info["prediction"]
    got = np.concatenate([o[pred["output"]] for o in outputs])
    if pred["decode"] == "argmax":
        got = got.argmax(-1)
    accuracy = float(np.mean(got.reshape(-1) == np.asarray(labels).reshape(-1)))
    assert accuracy == pytest.approx(info["test_accuracy"], abs=1e-4)
    assert accuracy > 0.95, "a trained model, not a random one"
