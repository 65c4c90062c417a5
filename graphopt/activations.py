"""Capture intermediate activations with onnxruntime, for data-aware passes and calibration."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ShapeInferencePass)

from graphopt.data import Sample
from graphopt.verify import run


def capture(model: ir.Model, samples: Sequence[Sample], names: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """Values named ``names`` (main-graph node outputs or inputs) for each sample, run at ORT's exact level.

    The model is not changed: a clone gets the values as extra graph outputs. Values without a
    known element type get one from onnx shape inference first.
    """
    if not names:
        return {}
    clone = model.clone()
    by_name = {v.name: v for v in clone.graph.inputs}
    for node in clone.graph:
        by_name.update({v.name: v for v in node.outputs if v.name})
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(f"no value named '{missing[0]}' in the main graph")
    if any(by_name[n].dtype is None for n in names):
        ir.passes.common.ShapeInferencePass()(clone)
    existing = {v.name for v in clone.graph.outputs}
    for n in names:
        if n not in existing and not by_name[n].is_graph_input():
            clone.graph.outputs.append(by_name[n])
    outputs = run(clone, samples, "exact")
    return {n: [sample[n] if n in sample else s_in[n] for sample, s_in in zip(outputs, samples)] for n in names}


def rows(arrays: Sequence[np.ndarray], features: int, axis: int = -1) -> np.ndarray:
    """Stack activations into ``[rows, features]`` with the feature axis last (float64)."""
    flat = [np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1).reshape(-1, features) for a in arrays]
    return np.concatenate(flat, axis=0)
