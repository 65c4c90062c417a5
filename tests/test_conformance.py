"""The cleanup preset on onnx's node conformance cases: no crash, no changed output (benchmarks/conformance.py)."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder at the repo root, not an installed package
from benchmarks.conformance import pipeline_default, sweep  # noqa: E402


def _explain(summary: dict) -> str:
    return "\n".join(f"{f['case']}: {f['reason']}" for f in summary["failures"][:20])


def test_control_flow_and_cleanup_ops_smoke() -> None:
    """A few op families cleanup touches (Dropout, Identity, Constant, If, Loop, Scan, BatchNormalization)."""
    summary = sweep(pipeline_default(), op_types=["Dropout", "Identity", "Constant", "If", "Loop", "Scan", "BatchNormalization", "Reshape"])
    assert summary["failed"] == 0, _explain(summary)
    assert summary["ran"] >= 30 and summary["modified"] >= 5


@pytest.mark.slow
def test_every_node_case_onnxruntime_can_run() -> None:
    summary = sweep(pipeline_default(), workers=2)
    assert summary["failed"] == 0, f"{summary['failed']} of {summary['ran'] + summary['failed']} cases failed:\n" + _explain(summary)
    assert summary["ran"] > 1500 and summary["modified"] > 200
