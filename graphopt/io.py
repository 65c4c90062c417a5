"""Load and save models: clear errors on bad files, external data, atomic writes, input never touched.

Saving writes into a temporary directory beside the target and then renames (``os.replace``)
the external-data file first and the ``.onnx`` last, so an interrupt or a failure leaves either
the old files or the complete new ones. Models whose tensors exceed 2 GB (protobuf's limit),
or that came with external data, are saved with external data next to the output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphopt import sparse
from graphopt.edit import iter_tensors
from graphopt.errors import ModelError, UsageError

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1_800_000_000
"""Above this many tensor bytes a model is saved with external data (headroom under 2 GB)."""


def load(path: str | os.PathLike[str], *, check: bool = True) -> ir.Model:
    """Read a model file, with its external data loaded lazily; one-line :class:`ModelError` otherwise."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file '{path}' does not exist")
    if path.is_dir():
        raise ModelError(f"'{path}' is a directory, not a model file")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"model file '{path}' is empty")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ModelError(f"'{path}' is not a readable ONNX model ({_short(e)})") from None
    except Exception as e:  # protobuf raises assorted types on random bytes
        raise ModelError(f"'{path}' is not a readable ONNX model ({type(e).__name__}: {_short(e)})") from None
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise ModelError(f"'{path}' parses as protobuf but is not an ONNX model (no graph or ir_version)")
    _check_external_files(proto, path)
    _check_proto(proto, path)
    if check:
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as e:
            raise ModelError(f"'{path}' fails onnx.checker: {_short(e)}") from None
        except Exception as e:
            raise ModelError(f"'{path}' fails onnx.checker: {type(e).__name__}: {_short(e)}") from None
    try:
        model = sparse.from_proto(proto)  # keeps sparse_initializer (onnx_ir drops it)
    except Exception as e:
        raise ModelError(f"'{path}' cannot be read into onnx_ir: {type(e).__name__}: {_short(e)}") from None
    ir.external_data.set_base_dir(model.graph, path.parent)
    _check_tensors(model, path)
    return model


_TYPED_FIELDS = {
    onnx.TensorProto.FLOAT: "float_data",
    onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.INT64: "int64_data",
    onnx.TensorProto.INT32: "int32_data",
    onnx.TensorProto.STRING: "string_data",
}
_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


def _check_proto(proto: onnx.ModelProto, path: Path) -> None:
    """What onnx.checker lets through but would break deep inside a pass: tensors whose data
    doesn't fill their shape exactly, graph inputs/outputs without an element type, Constant
    nodes without exactly one value."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor) or tensor.data_type in _PACKED_4BIT:
            continue
        need = math.prod(tensor.dims)
        if tensor.HasField("raw_data"):
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            except Exception:
                raise ModelError(f"'{path}': tensor '{tensor.name}' has an invalid data type {tensor.data_type}") from None
            have = len(tensor.raw_data) / itemsize
        elif (field := _TYPED_FIELDS.get(tensor.data_type)) is not None:
            have = len(getattr(tensor, field))
        else:
            continue
        if have != need:
            raise ModelError(f"'{path}': tensor '{tensor.name}' holds {have:g} values, its shape {list(tensor.dims)} needs {need}")
    for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for v in values:
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
                raise ModelError(f"'{path}': graph {kind} '{v.name}' has no element type")
    for graph in _all_graph_protos(proto.graph):
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) != 1:
                raise ModelError(f"'{path}': Constant node '{node.name or node.output[0] if node.output else '?'}' has {len(node.attribute)} attributes, needs exactly one value")


def _all_graph_protos(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                out += _all_graph_protos(attr.g)
            for sub in attr.graphs:
                out += _all_graph_protos(sub)
    return out


def _check_tensors(model: ir.Model, path: Path) -> None:
    """onnx_ir reads tensors lazily, so a bad data type or external data past the end of its file
    would only surface deep inside a pass; find them now (without reading any data)."""
    for tensor in iter_tensors(model):
        try:
            nbytes = tensor.nbytes  # needs a valid data type and shape
        except Exception as e:
            raise ModelError(f"'{path}': tensor '{tensor.name}' is malformed ({_short(e)})") from None
        if isinstance(tensor, ir.ExternalTensor):
            end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else nbytes)
            size = Path(tensor.path).stat().st_size
            if end > size:
                raise ModelError(f"external data of tensor '{tensor.name}' ends at byte {end}, past the end of '{tensor.location}' ({size} bytes)")


def _check_external_files(proto: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            target = (path.parent / location).resolve()
            if not target.is_file():
                raise ModelError(f"external data file '{location}' of tensor '{tensor.name}' not found next to '{path}'")


def external_files(model: ir.Model) -> set[Path]:
    """Files the model's lazily loaded tensors read from."""
    files = set()
    for tensor in iter_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(tensor.path).resolve())
    return files


def tensor_bytes(model: ir.Model) -> int:
    return sum(t.nbytes for t in iter_tensors(model))


def save(model: ir.Model, path: str | os.PathLike[str], *, protect: tuple[Path, ...] = (), external: bool | None = None) -> list[Path]:
    """Write ``model`` atomically; returns the files written.

    ``protect`` lists files that must not be overwritten (the input model and its data).
    ``external``: None decides by size (and keeps external data if the model came with it).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    check_output_path(path)
    protected = {p.resolve() for p in protect} | external_files(model)
    if external is None:
        external = tensor_bytes(model) > EXTERNAL_THRESHOLD or any(isinstance(t, ir.ExternalTensor) for t in iter_tensors(model))
    data_name = path.name + ".data"
    targets = [path] + ([parent / data_name] if external else [])
    for target in targets:
        if target.resolve() in protected:
            raise UsageError(f"refusing to overwrite '{target}': it is the input model or its data")
    tmp: Path | None = None
    try:
        with _signals_deferred():  # the temp dir exists only inside the try that removes it
            tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.tmp"))
        tmp_model = tmp / path.name
        try:
            if external:
                ir.save(model, tmp_model, external_data=data_name)
            else:
                sparse.save(model, tmp_model)  # marked initializers as sparse_initializer
        except ValueError as e:
            raise UsageError(f"cannot serialize the model to '{path}': {_short(e)}") from None
        with _signals_deferred():  # an interrupt between the two renames would pair new data with an old model
            if external:
                os.replace(tmp / data_name, parent / data_name)
            os.replace(tmp_model, path)
    except OSError as e:  # read-only or full file system, permissions root doesn't bypass
        raise UsageError(f"cannot write '{path}': {e.strerror or _short(e)}") from None
    finally:
        if tmp is not None:
            with _signals_deferred():  # an interrupt mid-removal would leave half a temp dir behind
                shutil.rmtree(tmp, ignore_errors=True)
    return targets


def check_output_path(path: Path) -> None:
    """Fail early (before any work) when ``path`` can't be an output file."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"output '{path}' is a directory")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"output directory '{parent}' is not a directory")
    if not parent.is_dir():
        raise UsageError(f"output directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output directory '{parent}' is not writable")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then act on the first one that came (main thread
    only; elsewhere a no-op). Python-level handlers, not the thread's signal mask: a process signal
    may land on another thread (onnxruntime's pools), and Python still raises in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda n, _frame: caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            handler = old[signal.Signals(caught[0])]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0])


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())  # checker messages span lines: keep them, on one
    return text[:300] if text else type(e).__name__
