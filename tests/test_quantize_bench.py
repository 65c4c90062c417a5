"""Smoke test of benchmarks/quantize.py --quick (smallest model, a few variants; writes nothing)."""

from __future__ import annotations

from benchmarks import quantize


def test_quick_benchmark_runs(capsys) -> None:  # noqa: ANN001
    assert quantize.main(["--quick"]) == 0
    table = capsys.readouterr().out
    assert "graphopt static int8" in table and "ort static int8 (per-tensor)" in table
    assert "failed" not in table and "cannot run" not in table
