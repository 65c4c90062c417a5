"""The `cleanup` preset on real models: onnx's light model zoo and the trained models in models/."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest

import graphopt
from graphopt.data import load_npz
from graphopt.passes import DEFAULT_PIPELINE, PRESETS
from graphopt.passes.simplify import RemoveIdentity
from tests.conftest import LIGHT_MODELS, MODELS, assert_valid

TRAINED = sorted(MODELS.glob("*.onnx"))


def _cleanup(path: Path) -> tuple[ir.Model, object]:
    npz = path.with_name(path.stem + "_test.npz")
    inputs = None
    if npz.exists():
        samples, _ = load_npz(npz, ir.load(path))
        inputs = [{k: v[:8] for k, v in s.items()} for s in samples[:1]]  # a few real rows keep it quick
    model, report = graphopt.optimize(str(path), "cleanup", inputs=inputs, samples=1)
    return model, report


def _check(model: ir.Model, report) -> None:
    assert report.verified, [(r.name, r.verdict, r.violations, r.unverified) for r in report.records]
    kinds = [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]
    assert "Dropout" not in kinds
    assert not RemoveIdentity()(model.clone()).modified  # no removable Identity (or no-op) left
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Identity":  # what stays joins a graph input/initializer/outer value to an output
            assert node.outputs[0].is_graph_output()
    assert_valid(model)
    assert report.final.nodes <= report.original.nodes


def test_cleanup_is_the_default_pipeline() -> None:
    assert DEFAULT_PIPELINE == "cleanup" and "fold-batchnorm" in PRESETS["cleanup"]


@pytest.mark.parametrize("path", TRAINED, ids=lambda p: p.stem)
def test_cleanup_trained_models(path: Path) -> None:
    model, report = _cleanup(path)
    _check(model, report)
    lossless = [r for r in report.records if r.modified and r.lossless]
    assert all(r.verdict == "ok" for r in lossless)
    again, second = graphopt.optimize(model, "cleanup", samples=1)
    assert not any(r.modified for r in second.records), [(r.name, r.stats) for r in second.records if r.modified]


def test_cleanup_digits_cnn_structure() -> None:
    model, report = _cleanup(MODELS / "digits_cnn.onnx")
    kinds = sorted(n.op_type for n in model.graph)
    assert kinds == sorted(["Conv", "Conv", "Relu", "Relu", "Relu", "MaxPool", "MaxPool", "Flatten", "Gemm", "Gemm"])
    fold = [r for r in report.records if r.name == "fold-batchnorm" and r.modified]
    assert fold and fold[0].stats == {"folded": 2}


LIGHT = [pytest.param(p, marks=pytest.mark.slow) if "vgg19" in p.stem else p for p in LIGHT_MODELS]  # vgg19: 11 s


@pytest.mark.parametrize("path", LIGHT, ids=lambda p: p.stem)
def test_cleanup_light_models(path: Path) -> None:
    model, report = _cleanup(path)
    _check(model, report)
    assert [v.name for v in model.graph.inputs] == [v.name for v in ir.load(path).graph.inputs]
