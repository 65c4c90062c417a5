"""The ``graphopt`` command end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from conftest import MODELS

GRAPHOPT = str(Path(sys.executable).parent / "graphopt")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRAPHOPT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_optimize_end_to_end(tmp_path: Path) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    pipeline = tmp_path / "p.txt"
    pipeline.write_text("# a pipeline file\nlift-constants,\ndce\n")
    r = cli("optimize", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "-p", f"@{pipeline}",
            "--inputs", str(MODELS / "digits_cnn_test.npz"), "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert "lift-constants" in r.stdout and "verified" in r.stdout
    data = json.loads(report.read_text())
    assert [p["pass"] for p in data["passes"]] == ["lift-constants", "dce"]
    assert data["summary"]["verified"] is True
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["graphopt.pipeline"].startswith("lift-constants{min-elements=16,all-forms=false},dce")


def test_default_model_and_pipeline(tmp_path: Path) -> None:
    r = cli("optimize", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "digits_cnn.opt.onnx").exists()


def test_json_output(tmp_path: Path) -> None:
    r = cli("optimize", str(MODELS / "digits_cnn.onnx"), "-o", str(tmp_path / "o.onnx"), "-p", "dce", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passes"][0]["pass"] == "dce"


def test_passes_inspect_verify(tmp_path: Path) -> None:
    r = cli("passes")
    assert r.returncode == 0 and "dce" in r.stdout and "lift-constants" in r.stdout and "min-elements" in r.stdout
    listing = json.loads(cli("passes", "--json").stdout)
    assert listing["passes"]["lift-constants"]["options"][-1]["name"] == "all-forms"
    r = cli("inspect", str(MODELS / "digits_cnn.onnx"))
    assert r.returncode == 0 and "BatchNormalization" in r.stdout and "ai.onnx 17" in r.stdout and "FLOAT" in r.stdout
    info = json.loads(cli("inspect", str(MODELS / "digits_cnn.onnx"), "--json").stdout)
    assert info["ops"]["Conv"] == 2 and info["inputs"][0]["shape"] == "[batch, 1, 16, 16]"
    r = cli("verify", str(MODELS / "digits_cnn.onnx"), str(MODELS / "digits_cnn.onnx"))
    assert r.returncode == 0 and "logits" in r.stdout and "inf" in r.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["optimize", "missing.onnx", "-o", "o.onnx"], 3, "model file 'missing.onnx' does not exist"),
        (["optimize", "{cnn}", "-o", "o.onnx", "-p", "dce,svd-spilt"], 2, "unknown pass 'svd-spilt'"),
        (["optimize", "{cnn}", "-o", "{cnn}"], 2, "is the input model"),
        (["optimize", "{cnn}", "-o", "nodir/o.onnx"], 2, "output directory 'nodir' does not exist"),
        (["optimize", "{cnn}", "-o", "o.onnx", "--inputs", "nope.npz"], 3, "inputs file 'nope.npz' does not exist"),
        (["optimize", "{cnn}", "-o", "o.onnx", "--tolerance", "snr=3"], 2, "bad --tolerance key 'snr'"),
        (["optimize", "{cnn}", "-o", "o.onnx", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["inspect", "."], 3, "is a directory"),
    ],
)
def test_errors_one_line_and_exit_code(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    args = [a.replace("{cnn}", str(MODELS / "digits_cnn.onnx")) for a in args]
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_no_verify_warns(tmp_path: Path) -> None:
    r = cli("optimize", str(MODELS / "digits_cnn.onnx"), "-o", str(tmp_path / "o.onnx"), "-p", "dce", "--no-verify")
    assert r.returncode == 0 and "verification is off" in r.stderr
