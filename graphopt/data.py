"""Inputs for verification and calibration: from the user's ``.npz`` or generated from the signature.

Generated data uses a fixed seed. Dynamic dimensions take ``--input-shape`` values
(``x:1x3x224x224`` for one input, ``batch=4`` for a named dimension everywhere); a leading
dimension with no value given counts as a batch of 1; any other unknown dimension is an error
naming the input and the dimension. Integer inputs that index a ``Gather`` (token ids) are drawn
below that table's size; others from ``int_range``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.edit import constant_tensor, is_onnx_op
from graphopt.errors import InputDataError, UsageError

Sample = dict[str, np.ndarray]
LABELS_KEY = "labels"


def batch_rows(samples: Sequence[Sample]) -> list[int]:
    """Each sample's batch size (its first array's leading dim; 1 for scalars): how labels, one per
    row of all samples concatenated, split over the samples."""
    return [next((len(a) for a in s.values() if np.ndim(a)), 1) for s in samples]


def dynamic_batch(model: ir.Model) -> bool:
    """Every graph input (initializers listed as inputs aside) has a symbolic first dim: samples may
    be cut along it."""
    return all(v.shape is not None and len(v.shape) > 0 and not isinstance(v.shape[0], int) for v in model.graph.inputs if not v.is_initializer())


def sample_rows(sample: Sample) -> int | None:
    """The first dim all of the sample's arrays share, or None (a scalar, or arrays that disagree)."""
    firsts = {np.shape(v)[0] if np.ndim(v) else None for v in sample.values()}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """Parsed ``--input-shape`` values: whole shapes per input name and values per dimension name."""

    by_input: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    by_dim: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, items: Sequence[str]) -> ShapeSpec:
        by_input: dict[str, tuple[int, ...]] = {}
        by_dim: dict[str, int] = {}
        for item in items:
            for part in item.split(","):
                part = part.strip()
                if m := re.fullmatch(r"(.+):(\d+(?:x\d+)*)", part):
                    by_input[m.group(1)] = tuple(int(d) for d in m.group(2).split("x"))
                elif m := re.fullmatch(r"([^=]+)=(\d+)", part):
                    by_dim[m.group(1)] = int(m.group(2))
                elif part:
                    raise UsageError(f"bad --input-shape '{part}': use NAME:1x3x224x224 or DIM=VALUE")
        return cls(by_input, by_dim)


def resolve_shape(value: ir.Value, spec: ShapeSpec) -> tuple[int, ...]:
    """Concrete shape for a graph input, or an error naming the unknown dimension."""
    name = value.name or "?"
    if name in spec.by_input:
        shape = spec.by_input[name]
        if value.shape is not None and len(value.shape) != len(shape):
            raise InputDataError(f"--input-shape for '{name}' has rank {len(shape)}, the model expects rank {len(value.shape)}")
        return shape
    if value.shape is None:
        raise InputDataError(f"input '{name}' has no shape in the model: give it with --input-shape {name}:DxDx...")
    dims = []
    for i, dim in enumerate(value.shape):
        if isinstance(dim, int) and dim >= 0:
            dims.append(dim)
            continue
        symbol = None if isinstance(dim, int) or dim is None else dim.value  # -1: paddle2onnx's "dynamic"
        if symbol is not None and str(symbol) in spec.by_dim:
            dims.append(spec.by_dim[str(symbol)])
        elif i == 0:
            dims.append(1)  # batch-like: one sample is always a valid batch
        else:
            raise InputDataError(
                f"input '{name}' dimension {i} {f'{symbol!r}' if symbol else '(unnamed)'} is dynamic: set it with --input-shape {name}:"
                + "x".join(str(d) if isinstance(d, int) and d >= 0 else "N" for d in value.shape)
                + (f" or --input-shape {symbol}=N" if symbol else "")
            )
    return tuple(dims)


def _gather_table_size(value: ir.Value) -> int | None:
    """Rows of the smallest constant table this input indexes with Gather, if any."""
    sizes = []
    for node, index in value.uses():
        if is_onnx_op(node, "Gather") and index == 1:
            table = constant_tensor(node.inputs[0])
            axis = node.attributes.get_int("axis", 0)
            if table is not None and len(table.shape) > 0:
                sizes.append(int(table.shape[axis]))
    return min(sizes) if sizes else None


def generate(
    model: ir.Model, *, spec: ShapeSpec | None = None, samples: int = 2, seed: int = 0, int_range: tuple[int, int] = (0, 10)
) -> list[Sample]:
    """Deterministic random inputs: floats ~ N(0, 1), ints in range, bools fair coin."""
    spec = spec or ShapeSpec()
    rng = np.random.default_rng(seed)
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    shapes = {v.name: resolve_shape(v, spec) for v in inputs}
    out = []
    for _ in range(samples):
        sample: Sample = {}
        for v in inputs:
            sample[v.name] = np.asarray(_random_array(v, shapes[v.name], rng, int_range))  # 0-d too
        out.append(sample)
    return out


def _random_array(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator, int_range: tuple[int, int]) -> np.ndarray:
    if value.dtype is None:
        raise InputDataError(f"input '{value.name}' has no element type")
    dtype = value.dtype
    if dtype.is_floating_point():
        return rng.standard_normal(shape).astype(dtype.numpy())
    if dtype == ir.DataType.BOOL:
        return rng.random(shape) < 0.5
    if dtype.is_integer():
        lo, hi = int_range
        if (rows := _gather_table_size(value)) is not None:
            lo, hi = 0, rows
        info = np.iinfo(dtype.numpy())
        lo, hi = max(lo, int(info.min)), min(hi, int(info.max) + 1)
        return rng.integers(lo, hi, size=shape).astype(dtype.numpy())
    if dtype == ir.DataType.STRING:
        return rng.choice(np.array(["a", "b", "c"], dtype=object), size=shape)
    raise InputDataError(f"cannot generate data for input '{value.name}' of type {dtype}")


def load_npz(path: str | Path, model: ir.Model) -> tuple[list[Sample], np.ndarray | None]:
    """Samples and (optional) labels from an ``.npz`` keyed by input name.

    An array with one more dimension than its input holds several samples along axis 0.
    A ``labels`` key holds task labels (one row per sample row). Other keys are errors.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise InputDataError(f"inputs file '{path}' does not exist") from None
    except (OSError, ValueError) as e:
        raise InputDataError(f"inputs file '{path}' is not a readable .npz ({e})") from None
    labels = arrays.pop(LABELS_KEY, None)
    inputs = {v.name: v for v in model.graph.inputs if not v.is_initializer()}
    extra = sorted(set(arrays) - set(inputs))
    if extra:
        raise InputDataError(f"inputs file '{path}' has '{extra[0]}', which is not a model input (inputs: {', '.join(inputs)})")
    missing = [n for n in inputs if n not in arrays]
    if missing:
        raise InputDataError(f"inputs file '{path}' lacks model input '{missing[0]}'")
    per_input: dict[str, list[np.ndarray]] = {}
    for name, value in inputs.items():
        array = arrays[name]
        rank = len(value.shape) if value.shape is not None else array.ndim
        if array.ndim == rank + 1:
            per_input[name] = list(array)
        elif array.ndim == rank:
            per_input[name] = [array]
        else:
            raise InputDataError(f"input '{name}' in '{path}' has rank {array.ndim}, the model expects {rank} (or {rank + 1} for several samples)")
        check_array(value, per_input[name][0], source=str(path))
    counts = {len(v) for v in per_input.values()}
    if len(counts) != 1:
        raise InputDataError(f"inputs in '{path}' hold different numbers of samples: {sorted(counts)}")
    n = counts.pop()
    return [{name: per_input[name][i] for name in inputs} for i in range(n)], labels


def check_array(value: ir.Value, array: np.ndarray, *, source: str) -> None:
    """An input array must have the input's dtype and agree with its static dims."""
    if value.dtype is not None and value.dtype != ir.DataType.STRING and array.dtype != value.dtype.numpy():
        raise InputDataError(f"input '{value.name}' in {source} is {array.dtype}, the model expects {value.dtype.numpy()}")
    if value.shape is not None:
        for i, (want, got) in enumerate(zip(value.shape, array.shape)):
            if isinstance(want, int) and want >= 0 and want != got:
                raise InputDataError(f"input '{value.name}' in {source} has shape {list(array.shape)}, dimension {i} must be {want}")

