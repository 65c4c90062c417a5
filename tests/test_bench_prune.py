"""Smoke test of benchmarks/prune.py in --quick mode (digits_skl_mlp, 50% / 25%; prints only, ~10 s)."""

from __future__ import annotations

import pytest

from benchmarks import prune as bench


def test_quick_mode_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxsim")
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| digits_skl_mlp | graphopt | structured data | 0.25 |" in out
    assert "| digits_skl_mlp | onnxsim | 2:4 magnitude | 0.5 |" in out
    assert "digits_skl_mlp: 50% magnitude + sparse-storage file" in out
    assert "verdict under the default budget: ok" in out  # 25% structured stays inside prune-structured's budget


def test_pipelines_parse() -> None:
    from graphopt.pipeline import parse_pipeline

    for tool, method, target in bench.plan(quick=False):
        if tool == "graphopt":
            assert parse_pipeline(bench.pipeline_for(method, target))
