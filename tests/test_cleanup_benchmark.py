"""Smoke test of benchmarks/cleanup.py's quick mode (two small models, every tool that is installed)."""

from __future__ import annotations

import pytest

from benchmarks import cleanup


def test_quick_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    rows = cleanup.main(["--quick"])
    printed = capsys.readouterr().out
    assert "| digits_cnn |" in printed and "### All figures" in printed
    ours = {r["model"]: r for r in rows if r["tool"] == "graphopt"}
    assert set(ours) == set(cleanup.QUICK) and all(r["status"] == "ok" for r in ours.values())
    for r in rows:  # fewer or equal nodes than every tool whose output is a drop-in replacement
        if r["tool"] not in ("graphopt", "original") and r["status"] == "ok":
            assert ours[r["model"]]["nodes"] <= r["nodes"], r
