"""What ``graphopt inspect`` shows: opsets, signature, op histogram, parameters by dtype."""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx_ir as ir

from graphopt.edit import iter_tensors


def summarize(model: ir.Model) -> dict[str, Any]:
    ops: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ops[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    dtypes: dict[str, dict[str, int]] = {}
    for t in iter_tensors(model):
        d = dtypes.setdefault(str(t.dtype.name if hasattr(t.dtype, "name") else t.dtype), {"tensors": 0, "elements": 0, "bytes": 0})
        d["tensors"] += 1
        d["elements"] += t.size
        d["bytes"] += t.nbytes
    return {
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name or '?'} {model.producer_version or ''}".strip(),
        "opsets": dict(model.opset_imports),
        "inputs": [_value(v) for v in model.graph.inputs if not v.is_initializer()],
        "outputs": [_value(v) for v in model.graph.outputs],
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "params": sum(d["elements"] for d in dtypes.values()),
        "param_bytes": sum(d["bytes"] for d in dtypes.values()),
        "dtypes": dtypes,
        "metadata": dict(model.metadata_props),
    }


def _value(v: ir.Value) -> dict[str, str]:
    shape = "?" if v.shape is None else "[" + ", ".join(str(d) if isinstance(d, int) else str(d.value or "?") for d in v.shape) + "]"
    return {"name": v.name or "", "dtype": str(v.dtype.name if v.dtype is not None else "?"), "shape": shape}
