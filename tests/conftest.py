"""Shared test helpers: models from ONNX text, onnxruntime runs, structural checks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt.data import Sample, generate
from graphopt.metrics import Tolerance, compare_outputs
from graphopt.passbase import Calibration, GraphPass, PassResult
from graphopt.verify import run

ir.DEBUG = True  # the IR's own invariant checks
ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(LIGHT.glob("*.onnx"))


def from_text(text: str) -> ir.Model:
    """An ``ir.Model`` from ONNX text (``onnx.parser`` syntax), checked first."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def feeds(model: ir.Model, samples: int = 2, **kwargs: object) -> list[Sample]:
    return generate(model, samples=samples, **kwargs)  # type: ignore[arg-type]


def outputs(model: ir.Model, data: Sequence[Sample], level: str = "exact") -> list[dict[str, np.ndarray]]:
    return run(model, data, level)  # type: ignore[arg-type]


def assert_valid(model: ir.Model) -> None:
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def calibrated_run(p: GraphPass, model: ir.Model, data: Sequence[Sample]) -> PassResult:
    """Run a data-aware pass on ``model`` with ``data`` as its calibration, as the runner would."""
    p.calibration = Calibration(tuple(data))
    return p(model)


def deploy_sqnr(model: ir.Model, data: Sequence[Sample], reference: Sequence[dict[str, np.ndarray]]) -> float:
    """The worst output's SQNR (dB) against ``reference`` at ORT's deploy level, where lossy budgets apply."""
    return min(e.sqnr_db for e in compare_outputs(reference, outputs(model, data, "deploy")))


def assert_within(model: ir.Model, data: Sequence[Sample], reference: Sequence[dict[str, np.ndarray]], tol: Tolerance) -> None:
    """The model's outputs on ``data`` meet ``tol`` against ``reference`` at ORT's exact level."""
    errors = compare_outputs(reference, outputs(model, data), tol)
    bad = [f"{e.output}: {v}" for e in errors for v in e.violations(tol)]
    assert not bad, bad


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
