"""Odd models through every registered pass: each pass either works (verified) or leaves the model alone.

Models (``oddmodels.py``): local functions, If/Loop/Scan bodies capturing outer values, a sparse
initializer, string tensors, float16, bfloat16 and int/bool tensors, and a small CNN at every opset
from 7 to the latest. Each is written to disk and read back with ``graphopt.io.load`` (so sparse
initializers go through graphopt's reader), optimized by one default-constructed pass, verified,
saved, loaded again and run: the saved model must give the verified outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphopt
from graphopt import io
from graphopt.data import generate
from graphopt.registry import all_passes, presets
from graphopt.verify import run

from oddmodels import LATEST_OPSET, ODD, OPSETS, small_cnn

PASSES = sorted(all_passes())
QUICK_OPSETS = sorted({7, 8, 11, 13, 18, LATEST_OPSET})
NO_FULL_CHECK = {"sparse-initializer"}  # onnx's shape inference types a sparse initializer as sparse_tensor


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    files = {}
    for kind, build in ODD.items():
        files[kind] = root / f"{kind}.onnx"
        onnx.save(build(), files[kind])
    for opset in OPSETS:
        files[f"opset{opset}"] = root / f"opset{opset}.onnx"
        onnx.save(small_cnn(opset), files[f"opset{opset}"])
    return files


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == object:
            assert a[k].tolist() == b[k].tolist(), k
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def check_pass(path: Path, kind: str, name: str, tmp_path: Path) -> None:
    original = io.load(path, check=kind not in NO_FULL_CHECK)
    result, report = graphopt.optimize(original, [all_passes()[name]()], on_violation="rollback")
    (record,) = report.records
    assert report.verification == "on", report.verification  # every odd model is runnable by ORT
    assert record.verdict in ("ok", "unchanged", "rolled-back"), (record.verdict, record.unverified, record.violations)
    out = tmp_path / "o.onnx"
    io.save(result, out)
    onnx.checker.check_model(str(out), full_check=kind not in NO_FULL_CHECK)
    again = io.load(out, check=False)
    data = generate(original, samples=2, seed=3)
    if record.verdict == "ok" and all_passes()[name].lossless:
        for want, got in zip(run(original, data, "exact"), run(again, data, "exact")):
            _equal(want, got)
    else:  # what was saved is what was verified (or the untouched model)
        for want, got in zip(run(result, data, "exact"), run(again, data, "exact")):
            _equal(want, got)


@pytest.mark.parametrize("name", PASSES)
@pytest.mark.parametrize("kind", list(ODD))
def test_pass_on_odd_model(model_files: dict[str, Path], kind: str, name: str, tmp_path: Path) -> None:
    check_pass(model_files[kind], kind, name, tmp_path)


@pytest.mark.parametrize("name", PASSES)
@pytest.mark.parametrize("opset", QUICK_OPSETS)
def test_pass_at_opset(model_files: dict[str, Path], opset: int, name: str, tmp_path: Path) -> None:
    check_pass(model_files[f"opset{opset}"], f"opset{opset}", name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", PASSES)
@pytest.mark.parametrize("opset", [o for o in OPSETS if o not in QUICK_OPSETS])
def test_pass_at_every_other_opset(model_files: dict[str, Path], opset: int, name: str, tmp_path: Path) -> None:
    check_pass(model_files[f"opset{opset}"], f"opset{opset}", name, tmp_path)


CLEANUP = "cleanup" if "cleanup" in presets() else "lift-constants,dce"


@pytest.mark.parametrize("kind", list(ODD) + [f"opset{o}" for o in QUICK_OPSETS])
def test_cleanup_removes_the_dead_code_and_verifies(model_files: dict[str, Path], kind: str) -> None:
    """The whole cleanup pipeline: verified, and the dead node (or Dropout) each model carries is gone."""
    original = io.load(model_files[kind], check=kind not in NO_FULL_CHECK)
    result, report = graphopt.optimize(original, CLEANUP)
    assert report.verified, [(r.name, r.verdict, r.unverified, r.violations) for r in report.records]
    assert report.final.nodes < report.original.nodes
    if kind == "local-function":
        assert ("local.fn", "Block", "") in result.functions or not any(n.domain == "local.fn" for n in result.graph)


def test_sparse_initializer_survives_load_and_save(model_files: dict[str, Path], tmp_path: Path) -> None:
    model = io.load(model_files["sparse-initializer"], check=False)
    assert "w" in model.graph.initializers  # onnx_ir alone drops sparse_initializer; graphopt's reader keeps it
    io.save(model, tmp_path / "o.onnx")
    saved = onnx.load(tmp_path / "o.onnx")
    stored = [t.values.name for t in saved.graph.sparse_initializer] + [t.name for t in saved.graph.initializer]
    assert stored == ["w"]
    dense = onnx.numpy_helper.to_array(onnx.load(model_files["sparse-initializer"]).graph.sparse_initializer[0].values)
    np.testing.assert_array_equal(np.sort(model.graph.initializers["w"].const_value.numpy()[model.graph.initializers["w"].const_value.numpy() != 0]), np.sort(dense))


def test_bfloat16_outputs_are_verified_not_skipped(model_files: dict[str, Path]) -> None:
    """ORT's Python API has no bfloat16 arrays; the verifier widens exactly (Cast to float32) and checks them."""
    original = io.load(model_files["bfloat16"])
    assert original.graph.outputs[0].dtype == ir.DataType.BFLOAT16
    _, report = graphopt.optimize(original, "dce")
    (record,) = report.records
    assert record.verdict == "ok" and [e.output for e in record.exact] == ["y"] and record.exact[0].max_abs == 0
