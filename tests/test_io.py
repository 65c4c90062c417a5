"""Load/save: external data round trip, atomic writes, the input and its data never overwritten."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphopt
from graphopt import io
from graphopt.errors import ModelError, UsageError

from conftest import feeds, outputs

BIG_W = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 64] x) => (float[N, 64] y) { y = MatMul(x, w) }"""


def _with_weight() -> ir.Model:
    proto = onnx.parser.parse_model(BIG_W)
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))  # raw_data, so it can go external
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _external_model(tmp_path: Path, location: str = "m.weights") -> Path:
    path = tmp_path / "src" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    proto = ir.to_proto(_with_weight())
    onnx.save(proto, path, save_as_external_data=True, location=location, size_threshold=0)
    return path


def test_external_data_round_trip(tmp_path: Path) -> None:
    src = _external_model(tmp_path)
    data_file = src.parent / "m.weights"
    before = data_file.read_bytes()
    model = io.load(src)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    optimized, report = graphopt.optimize(model, "dce")
    written = io.save(optimized, out, protect=(src,))
    assert written == [out, out.parent / "o.onnx.data"]
    assert data_file.read_bytes() == before  # the input's data is untouched
    onnx.checker.check_model(str(out), full_check=True)
    again = io.load(out)
    data = feeds(again)
    for a, b in zip(outputs(model, data), outputs(again, data)):
        np.testing.assert_array_equal(a["y"], b["y"])


def test_refuses_to_overwrite_input_or_its_data(tmp_path: Path) -> None:
    src = _external_model(tmp_path)
    model = io.load(src)
    with pytest.raises(UsageError, match="refusing to overwrite"):
        io.save(model, src, protect=(src,))
    # the input's data file is protected because the model reads from it
    with pytest.raises(UsageError, match="refusing to overwrite"):
        io.save(model, src.parent / "m.weights", protect=(src,))
    # an output whose data file would land on the input's data file
    model2 = io.load(_external_model(tmp_path, location="n.onnx.data"))
    with pytest.raises(UsageError, match="refusing to overwrite.*n.onnx.data"):
        io.save(model2, src.parent / "n.onnx", protect=(src,))


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.onnx"
    out.write_bytes(b"old")

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ir, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        io.save(_with_weight(), out)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["o.onnx"]  # no temp litter


def test_save_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        io.save(_with_weight(), tmp_path / "missing" / "o.onnx")
    with pytest.raises(UsageError, match="is a directory"):
        io.save(_with_weight(), tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="not writable"):
            io.save(_with_weight(), ro / "o.onnx")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"\x00\xff garbage \x13\x37" * 10, "not a readable ONNX model"),
        (onnx.TensorProto(name="t").SerializeToString() + b"\x08\x01", "not"),
    ],
)
def test_load_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        io.load(path)


def test_load_directory_and_missing_external(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is a directory"):
        io.load(tmp_path)
    src = _external_model(tmp_path)
    (src.parent / "m.weights").unlink()
    with pytest.raises(ModelError, match="external data file 'm.weights'"):
        io.load(src)


def test_signals_deferred_holds_a_signal_another_thread_receives() -> None:
    """A SIGINT taken by any thread (onnxruntime's pools exist while saving) is held until the
    deferred block ends, then raised once in the main thread."""
    import signal
    import threading
    import time

    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with io._signals_deferred():
            bystander = threading.Thread(target=time.sleep, args=(0.3,))  # a thread that doesn't block SIGINT: the kernel may pick it
            bystander.start()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs the handler between bytecodes: a KeyboardInterrupt here would skip the line below
            reached_end = True
    bystander.join()
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
