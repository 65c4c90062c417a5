"""Every bad input through the real ``graphopt`` command: one line on stderr, a documented exit code,
no traceback, the input (and its external data) byte-identical, and no output or temp litter.

The cases run as subprocesses a few at a time (one module-scoped fixture), then each is asserted
in its own test. Failure paths (a pass raising or breaking its budget, ``--keep-partial``) and
interrupts (SIGINT/SIGTERM mid-pipeline and mid-save) run a small driver that registers a test pass
and then calls the CLI's ``main``, so they stay deterministic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

from clirun import CliResult, run_batch
from conftest import MODELS

GRAPHOPT = str(Path(sys.executable).parent / "graphopt")
CNN = MODELS / "digits_cnn.onnx"
CNN_NPZ = MODELS / "digits_cnn_test.npz"


# ---------------------------------------------------------------- model files


def mlp_proto(opset: int = 17, custom: bool = False, dead: bool = True) -> onnx.ModelProto:
    """y = Relu(x @ w); with ``custom``, z = com.acme::Foo(x @ w) as a second output; a dead Identity."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Relu", ["h"], ["y"])]
    outputs = [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]
    opsets = [oh.make_opsetid("", opset)]
    if custom:
        nodes.append(oh.make_node("Foo", ["h"], ["z"], domain="com.acme"))
        outputs.append(oh.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4]))
        opsets.append(oh.make_opsetid("com.acme", 1))
    if dead:
        nodes.append(oh.make_node("Identity", ["h"], ["unused"]))
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])], outputs, [w])
    return oh.make_model(graph, opset_imports=opsets, ir_version=10)


def write_external(path: Path, location: str) -> None:
    onnx.save(mlp_proto(), path, save_as_external_data=True, location=location, size_threshold=0)


def only_custom_proto() -> onnx.ModelProto:
    graph = oh.make_graph(
        [oh.make_node("Foo", ["x"], ["z"], domain="com.acme")],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [oh.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8])],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.acme", 1)], ir_version=10)


def checker_failing_proto() -> onnx.ModelProto:
    graph = oh.make_graph(
        [oh.make_node("Relu", ["nope"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)


# ---------------------------------------------------------------- the cases


@dataclasses.dataclass
class Case:
    setup: Callable[[Path, Path], list[str]]  # (in dir, out dir) -> CLI args after "graphopt"
    code: int
    message: str  # a substring of the single stderr line
    output: bool = False  # whether an output model must exist afterwards
    full_check: bool = True  # whether that output passes onnx.checker's full check (not when the input doesn't)


def _cnn(d: Path) -> Path:
    shutil.copy(CNN, d / "cnn.onnx")
    return d / "cnn.onnx"


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, path)
    return path


def _bytes(d: Path, name: str, data: bytes) -> Path:
    (d / name).write_bytes(data)
    return d / name


def _npz(d: Path, **arrays: np.ndarray) -> str:
    np.savez(d / "inputs.npz", **arrays)
    return str(d / "inputs.npz")


def _opt(model: Path | str, out: Path, *extra: str) -> list[str]:
    return ["optimize", str(model), "-o", str(out / "o.onnx"), "-q", *extra]


def _ext(i: Path, location: str = "ext.weights") -> Path:
    write_external(i / "ext.onnx", location)
    return i / "ext.onnx"


def _missing_external(i: Path, o: Path) -> list[str]:
    path = _ext(i)
    (i / "ext.weights").rename(i / "elsewhere.weights")
    return _opt(path, o, "-p", "dce")


def _immutable_dir(i: Path, o: Path) -> list[str]:
    locked = o / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o500)
    elif subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: no directory is unwritable for root")
    return ["optimize", str(_cnn(i)), "-o", str(locked / "o.onnx"), "-p", "dce", "-q"]


def endless_loop_proto() -> onnx.ModelProto:
    """A Loop whose trip count is 2**48: onnxruntime would run it for days."""
    body = oh.make_graph(
        [oh.make_node("Identity", ["c"], ["c_out"]), oh.make_node("Relu", ["h"], ["h_out"])],
        "body",
        [oh.make_tensor_value_info("i", TensorProto.INT64, []), oh.make_tensor_value_info("c", TensorProto.BOOL, []), oh.make_tensor_value_info("h", TensorProto.FLOAT, [4])],
        [oh.make_tensor_value_info("c_out", TensorProto.BOOL, []), oh.make_tensor_value_info("h_out", TensorProto.FLOAT, [4])],
    )
    graph = oh.make_graph(
        [oh.make_node("Loop", ["n", "t", "x"], ["y"], body=body), oh.make_node("Identity", ["x"], ["dead"])],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [onnx.numpy_helper.from_array(np.array(2**48, np.int64), "n"), onnx.numpy_helper.from_array(np.array(True), "t")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


def oversized_tensor_proto() -> onnx.ModelProto:
    proto = mlp_proto()
    proto.graph.initializer[0].dims[0] = 4  # 8x4 values, shape says 4x4
    return proto


def untyped_output_proto() -> onnx.ModelProto:
    proto = mlp_proto()
    proto.graph.output[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
    return proto


def wrong_input_dtype_proto() -> onnx.ModelProto:
    """The checker passes; onnx_ir's shape inference warns (with a traceback) and ORT refuses it."""
    proto = mlp_proto()
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    return proto


_X = np.zeros((1, 1, 16, 16), np.float32)
_RAND = np.random.default_rng(1).bytes(4096)

CASES: dict[str, Case] = {
    "missing-path": Case(lambda i, o: _opt(i / "missing.onnx", o), 3, "missing.onnx' does not exist"),
    "directory": Case(lambda i, o: _opt(i, o), 3, "is a directory, not a model file"),
    "empty-file": Case(lambda i, o: _opt(_bytes(i, "e.onnx", b""), o), 3, "e.onnx' is empty"),
    "truncated": Case(lambda i, o: _opt(_bytes(i, "t.onnx", CNN.read_bytes()[:40_000]), o), 3, "t.onnx' is not a readable ONNX model"),
    "random-bytes": Case(lambda i, o: _opt(_bytes(i, "r.onnx", _RAND), o), 3, "r.onnx' is not a readable ONNX model"),
    "tensor-proto": Case(
        lambda i, o: _opt(_bytes(i, "t.onnx", onnx.numpy_helper.from_array(np.ones(64, np.float32), "t").SerializeToString()), o),
        3,
        "t.onnx' is not a readable ONNX model",
    ),
    "graph-proto": Case(lambda i, o: _opt(_bytes(i, "g.onnx", onnx.GraphProto(name="g").SerializeToString()), o), 3, "parses as protobuf but is not an ONNX model"),
    "checker-fails": Case(lambda i, o: _opt(_save(checker_failing_proto(), i / "c.onnx"), o), 3, "fails onnx.checker: Nodes in a graph must be topologically sorted, however input 'nope'"),
    "opset-too-new": Case(
        lambda i, o: _opt(_save(mlp_proto(opset=99), i / "m.onnx"), o, "-p", "dce"), 6, "the model's ai.onnx opset 99 is newer than onnxruntime", output=True
    ),
    "opset-too-new-allowed": Case(
        lambda i, o: _opt(_save(mlp_proto(opset=99), i / "m.onnx"), o, "-p", "dce", "--allow-unverified"), 0, "warning: unverified: ", output=True
    ),
    "custom-op": Case(
        lambda i, o: _opt(_save(mlp_proto(custom=True), i / "m.onnx"), o, "-p", "dce", "--report", str(o / "r.json")),
        6,
        "output written, but not fully verified: output 'z' not checked: onnxruntime has no kernel for com.acme::Foo (pass --allow-unverified",
        output=True,
    ),
    "custom-op-allowed": Case(
        lambda i, o: _opt(_save(mlp_proto(custom=True), i / "m.onnx"), o, "-p", "dce", "--allow-unverified"), 0, "output 'z' not checked", output=True
    ),
    "custom-op-every-output": Case(
        lambda i, o: _opt(_save(only_custom_proto(), i / "m.onnx"), o, "-p", "dce"), 6, "cannot run the input model: onnxruntime has no kernel for com.acme::Foo", output=True
    ),
    "endless-loop": Case(
        lambda i, o: _opt(_save(endless_loop_proto(), i / "m.onnx"), o, "-p", "dce", "--ort-timeout", "1"),
        6,
        "onnxruntime cannot run the input model: onnxruntime did not finish one run within 1 s",
        output=True,
    ),
    "tensor-size-mismatch": Case(lambda i, o: _opt(_save(oversized_tensor_proto(), i / "m.onnx"), o), 3, "tensor 'w' holds 32 values, its shape [4, 4] needs 16"),
    "untyped-output": Case(lambda i, o: _opt(_save(untyped_output_proto(), i / "m.onnx"), o), 3, "graph output 'y' has no element type"),
    "no-library-log-noise": Case(
        lambda i, o: _opt(_save(wrong_input_dtype_proto(), i / "m.onnx"), o, "-p", "lift-constants,dce"),
        6,
        "onnxruntime cannot run the input model: This is an invalid model. Type Error: Type 'tensor(uint8)' of input parameter (x) of operator (MatMul)",
        output=True,
        full_check=False,
    ),
    "missing-external-data": Case(_missing_external, 3, "external data file 'ext.weights' of tensor 'w' not found"),
    "inputs-missing-file": Case(lambda i, o: _opt(_cnn(i), o, "--inputs", str(i / "no.npz")), 3, "no.npz' does not exist"),
    "inputs-not-npz": Case(lambda i, o: _opt(_cnn(i), o, "--inputs", str(_bytes(i, "x.npz", b"junk"))), 3, "x.npz' is not a readable .npz"),
    "inputs-wrong-name": Case(lambda i, o: _opt(_cnn(i), o, "--inputs", _npz(i, image=_X)), 3, "has 'image', which is not a model input (inputs: input)"),
    "inputs-lacks-input": Case(lambda i, o: _opt(_cnn(i), o, "--inputs", _npz(i, labels=np.zeros(1))), 3, "lacks model input 'input'"),
    "inputs-wrong-shape": Case(lambda i, o: _opt(_cnn(i), o, "--inputs", _npz(i, input=np.zeros((1, 1, 8, 8), np.float32))), 3, "has shape [1, 1, 8, 8], dimension 2 must be 16"),
    "inputs-wrong-rank": Case(lambda i, o: _opt(_cnn(i), o, "--inputs", _npz(i, input=np.zeros((16, 16), np.float32))), 3, "has rank 2, the model expects 4"),
    "inputs-wrong-dtype": Case(lambda i, o: _opt(_cnn(i), o, "--inputs", _npz(i, input=_X.astype(np.float64))), 3, "is float64, the model expects float32"),
    "input-shape-syntax": Case(lambda i, o: _opt(_cnn(i), o, "--input-shape", "input=1x1"), 2, "bad --input-shape 'input=1x1'"),
    "input-shape-rank": Case(lambda i, o: _opt(_cnn(i), o, "--input-shape", "input:1x16x16"), 3, "has rank 3, the model expects rank 4"),
    "unknown-pass": Case(lambda i, o: _opt(_cnn(i), o, "-p", "dce,svd-spilt"), 2, "unknown pass 'svd-spilt' at column 5"),
    "unknown-option": Case(lambda i, o: _opt(_cnn(i), o, "-p", "lift-constants{min-element=3}"), 2, "unknown lift-constants option 'min-element'"),
    "bad-option-value": Case(lambda i, o: _opt(_cnn(i), o, "-p", "lift-constants{min-elements=x}"), 2, "bad value for lift-constants option 'min-elements'"),
    "pipeline-file-missing": Case(lambda i, o: _opt(_cnn(i), o, "-p", f"@{i}/p.txt"), 2, "cannot read pipeline file"),
    "output-is-input": Case(lambda i, o: ["optimize", str(_cnn(i)), "-o", str(i / "cnn.onnx"), "-q"], 2, "is the input model: choose another path"),
    "output-is-input-other-spelling": Case(
        lambda i, o: ["optimize", str(_cnn(i)), "-o", f"{i}/../{i.name}/./cnn.onnx", "-q"], 2, "is the input model: choose another path"
    ),
    "output-onto-input-data": Case(
        lambda i, o: ["optimize", str(_ext(i)), "-o", str(i / "ext.weights"), "-p", "dce", "-q"], 2, "refusing to overwrite"
    ),
    "output-data-onto-input-data": Case(
        lambda i, o: ["optimize", str(_ext(i, "o.onnx.data")), "-o", str(i / "o.onnx"), "-p", "dce", "-q"], 2, "refusing to overwrite"
    ),
    "output-dir-missing": Case(lambda i, o: ["optimize", str(_cnn(i)), "-o", str(o / "no" / "o.onnx"), "-q"], 2, "/no' does not exist"),
    "output-under-file": Case(lambda i, o: ["optimize", str(_cnn(i)), "-o", str(_bytes(o, "f", b"x") / "o.onnx"), "-q"], 2, "/f' is not a directory"),
    "output-is-directory": Case(lambda i, o: ["optimize", str(_cnn(i)), "-o", str(o), "-q"], 2, "is a directory"),
    "output-dir-not-writable": Case(_immutable_dir, 2, "is not writable"),
    "unknown-flag": Case(lambda i, o: _opt(_cnn(i), o, "--bogus"), 2, "unrecognized arguments: --bogus"),
    "bad-tolerance": Case(lambda i, o: _opt(_cnn(i), o, "--tolerance", "sqnr=abc"), 2, "bad --tolerance value 'abc'"),
    "verify-missing-candidate": Case(lambda i, o: ["verify", str(_cnn(i)), str(i / "nope.onnx")], 3, "nope.onnx' does not exist"),
    "inspect-random-bytes": Case(lambda i, o: ["inspect", str(_bytes(i, "r.onnx", _RAND))], 3, "is not a readable ONNX model"),
}


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@dataclasses.dataclass
class Outcome:
    proc: CliResult | None
    inputs_before: dict[str, str]
    inp: Path
    out: Path
    skip: str = ""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    root = tmp_path_factory.mktemp("errors")
    results: dict[str, Outcome] = {}
    calls: list[tuple[str, list[str]]] = []
    for name, case in CASES.items():
        inp, out = root / name / "in", root / name / "out"
        inp.mkdir(parents=True)
        out.mkdir()
        try:
            args = case.setup(inp, out)
        except pytest.skip.Exception as e:
            results[name] = Outcome(None, {}, inp, out, skip=str(e))
            continue
        results[name] = Outcome(None, _digest(inp), inp, out)
        calls.append((name, args))
    for (name, _), result in zip(calls, run_batch([(args, results[name].out) for name, args in calls], timeout=120)):
        results[name].proc = result
    yield results
    for outcome in results.values():  # an immutable directory would stop pytest from cleaning up
        subprocess.run(["chattr", "-R", "-i", str(outcome.out)], capture_output=True)


def assert_clean_error(proc: CliResult, code: int, message: str) -> None:
    assert proc.code == code, (proc.code, proc.stderr)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0], lines[0]
    assert lines[0].startswith("graphopt: "), lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(outcomes: dict[str, Outcome], name: str) -> None:
    case, outcome = CASES[name], outcomes[name]
    if outcome.skip:
        pytest.skip(outcome.skip)
    assert outcome.proc is not None
    assert_clean_error(outcome.proc, case.code, case.message)
    assert _digest(outcome.inp) == outcome.inputs_before, "the input model or its data changed"
    written = sorted(p.name for p in outcome.out.iterdir() if p.name not in ("inputs.npz", "r.json", "f", "locked"))
    assert written == (["o.onnx"] if case.output else []), written  # no output, no temp litter
    if case.output:
        onnx.checker.check_model(str(outcome.out / "o.onnx"), full_check=case.full_check)


def test_custom_op_checks_the_other_outputs(outcomes: dict[str, Outcome]) -> None:
    """The dead node goes, the output ORT can run is verified bit-exact, the other is named as unchecked."""
    outcome = outcomes["custom-op"]
    report = json.loads((outcome.out / "r.json").read_text())
    assert report["summary"]["verified"] is False
    assert report["summary"]["verification"] == "output 'z' not checked: onnxruntime has no kernel for com.acme::Foo"
    (dce,) = report["passes"]
    assert dce["verdict"] == "ok" and dce["stats"]["nodes"] == 1
    assert [o["output"] for o in dce["outputs"]] == ["y"] and dce["outputs"][0]["bit_exact"] is True
    meta = {p.key: p.value for p in onnx.load(outcome.out / "o.onnx").metadata_props}
    assert meta["graphopt.verified"] == "false"
    assert [n.op_type for n in onnx.load(outcome.out / "o.onnx").graph.node] == ["MatMul", "Relu", "Foo"]


@pytest.mark.parametrize("name", ["missing-path", "checker-fails", "custom-op-allowed"])
def test_console_script_says_the_same(outcomes: dict[str, Outcome], name: str, tmp_path: Path) -> None:
    """The batch runner forks from one process; the installed ``graphopt`` command behaves identically."""
    outcome = outcomes[name]
    assert outcome.proc is not None
    argv = [a.replace(str(outcome.out / "o.onnx"), str(tmp_path / "o.onnx")) for a in outcome.proc.argv]
    real = subprocess.run([GRAPHOPT, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (real.returncode, real.stderr.replace(str(tmp_path), "OUT")) == (outcome.proc.code, outcome.proc.stderr.replace(str(outcome.out), "OUT"))


def test_debug_prints_the_traceback(tmp_path: Path) -> None:
    r = subprocess.run([GRAPHOPT, "optimize", str(tmp_path / "x.onnx"), "-o", str(tmp_path / "o.onnx"), "--debug"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "Traceback" in r.stderr and r.stderr.strip().endswith("x.onnx' does not exist")


# ---------------------------------------------------------------- failing passes, --keep-partial, interrupts

TEST_PASSES = textwrap.dedent(
    """
    import dataclasses, os, sys, time
    import numpy as np
    import onnx_ir as ir
    from graphopt.passbase import GraphPass, PassResult, option
    from graphopt.registry import register

    @register
    @dataclasses.dataclass
    class TestNudge(GraphPass):
        '''Claims to be lossless but scales the first float initializer.'''
        name = "test-nudge"
        def call(self, model):
            for value in model.graph.initializers.values():
                if value.const_value is not None and value.dtype == ir.DataType.FLOAT:
                    value.const_value = ir.tensor(value.const_value.numpy() * np.float32(1.5))
                    return PassResult(model, modified=True)
            return PassResult(model, modified=False)

    @register
    @dataclasses.dataclass
    class TestRaise(GraphPass):
        '''Raises halfway through an edit.'''
        name = "test-raise"
        def call(self, model):
            model.graph.outputs[0].name = "half-done"
            raise RuntimeError("boom")

    @register
    @dataclasses.dataclass
    class TestSleep(GraphPass):
        '''Announces itself, then sleeps (to be interrupted).'''
        name = "test-sleep"
        def call(self, model):
            print("SLEEPING", flush=True)
            time.sleep(60)
            return PassResult(model, modified=False)

    """
)

DRIVER = TEST_PASSES + textwrap.dedent(
    """
    import os, signal, sys
    from graphopt import cli

    # Ctrl-C as in a terminal: a shell starts background jobs with SIGINT ignored, which python keeps
    # (a suite launched with `&` would see the driver sleep through the signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    if os.environ.get("SLOW_SAVE"):  # stall after the temp files are written, before the renames
        real_save = ir.save
        def slow_save(*args, **kwargs):
            real_save(*args, **kwargs)
            print("SAVED-TEMP", flush=True)
            time.sleep(60)
        ir.save = slow_save

    sys.exit(cli.main(sys.argv[1:]))
    """
)


def driver(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    return subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )


def _setup(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    model = _cnn(inp)
    return model, out, _digest(inp)


FAILING = {
    "budget": ("dce,test-nudge", 5, "pass 'test-nudge' broke its budget"),
    "raises": ("dce,test-raise", 4, "pass 'test-raise' raised RuntimeError: boom"),
}


@pytest.fixture(scope="module")
def failing_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], tuple[CliResult, Path, dict[str, str]]]:
    root = tmp_path_factory.mktemp("failing")
    runs, calls = {}, []
    for kind, (pipeline, _, _) in FAILING.items():
        for keep in (False, True):
            d = root / f"{kind}-{keep}"
            d.mkdir()
            model, out, before = _setup(d)
            calls.append(["optimize", str(model), "-o", str(out / "o.onnx"), "-p", pipeline, "-q"] + (["--keep-partial"] if keep else []))
            runs[(kind, keep)] = (d, before)
    results = run_batch([(argv, root) for argv in calls], prelude=TEST_PASSES)
    return {key: (result, d, before) for (key, (d, before)), result in zip(runs.items(), results)}


@pytest.mark.parametrize("kind", list(FAILING))
@pytest.mark.parametrize("keep", [False, True], ids=["no-keep", "keep-partial"])
def test_failed_pipeline_writes_nothing_unless_keep_partial(failing_runs: dict, kind: str, keep: bool) -> None:
    _, code, message = FAILING[kind]
    result, d, before = failing_runs[(kind, keep)]
    out = d / "out"
    assert result.code == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("graphopt: error: ")
    assert _digest(d / "in") == before
    if not keep:
        assert len(lines) == 1 and list(out.iterdir()) == []
        return
    assert len(lines) == 2 and "kept the model from before the failing pass" in lines[0]
    assert [p.name for p in out.iterdir()] == ["o.onnx"]
    kept = onnx.load(out / "o.onnx")
    onnx.checker.check_model(kept, full_check=True)
    assert kept.graph.output[0].name == "logits"  # the half-done edit of test-raise is not in it
    meta = {p.key: p.value for p in kept.metadata_props}
    assert message in meta["graphopt.partial"]
    original = onnx.load(CNN)
    for x, y in zip(original.graph.initializer, kept.graph.initializer):  # test-nudge's change is not in it
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))


def _wait_for(proc: subprocess.Popen[str], marker: str) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if marker in line:
            return
        assert time.monotonic() < deadline
    raise AssertionError(f"the driver exited before printing {marker}: {proc.wait()} {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("when", ["mid-pipeline", "mid-save"])
def test_interrupt_leaves_no_partial_output(tmp_path: Path, sig: signal.Signals, when: str) -> None:
    model, out, before = _setup(tmp_path)
    (out / "o.onnx").write_bytes(b"the old output")  # must survive intact
    pipeline = "dce,test-sleep" if when == "mid-pipeline" else "dce"
    proc = driver(tmp_path, "optimize", str(model), "-o", str(out / "o.onnx"), "-p", pipeline, "-q", env={"SLOW_SAVE": "1"} if when == "mid-save" else None)
    _wait_for(proc, "SLEEPING" if when == "mid-pipeline" else "SAVED-TEMP")
    if when == "mid-save":
        assert any(p.name.startswith(".o.onnx.tmp") for p in out.iterdir())  # the temp copy exists now
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "graphopt: interrupted; no output was written"
    assert [p.name for p in out.iterdir()] == ["o.onnx"] and (out / "o.onnx").read_bytes() == b"the old output"
    assert _digest(tmp_path / "in") == before
