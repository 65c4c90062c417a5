"""Where the bytes of a (quantized) ONNX file go: each initializer and Constant is put in a role by
the node that reads it (quantized weight, scale, zero point, float weight of a covered op, bias,
norm parameter, embedding table, small/shape constant, other float), and the rest of the protobuf
is split into nodes, value_info, graph inputs/outputs and model metadata. Sizes are serialized
protobuf bytes (tag and length prefixes included), so the parts add up to the file.

    python -m benchmarks.qsize model.onnx [more.onnx ...]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import onnx
from onnx import TensorProto

COVERED = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}
NORMS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization"}
INT_QUANT = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4, TensorProto.INT16, TensorProto.UINT16}


def _field_bytes(size: int, field_number: int = 1) -> int:
    """A length-delimited protobuf field: tag + varint length + payload."""
    tag = 1 if field_number < 16 else 2
    return tag + _varint_len(size) + size


def _varint_len(n: int) -> int:
    length = 1
    while n >= 0x80:
        n >>= 7
        length += 1
    return length


def _role(name: str, dtype: int, numel: int, readers: list[tuple[onnx.NodeProto, int]]) -> str:
    for node, index in readers:
        op = node.op_type
        if op in ("DequantizeLinear", "QuantizeLinear"):
            return {0: "quantized weight" if dtype in INT_QUANT or dtype == TensorProto.INT32 else "float into Q", 1: "scale", 2: "zero point"}[index]
        if op in ("MatMulNBits",):
            return {1: "quantized weight", 2: "scale", 3: "zero point"}.get(index, "bias")
    floating = dtype in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    for node, index in readers:
        op = node.op_type
        if op in COVERED and floating:
            if index == COVERED[op] or (op == "MatMul" and index == 0):
                return "float weight (small)" if numel < 256 else "float weight"
            if index == 2:
                return "bias"
        if op in NORMS and floating:
            return "norm params"
        if op == "Gather" and index == 0 and floating:
            return "embedding table"
    if not floating or numel <= 16:
        return "small / shape constants"
    return "other float constants"


def breakdown(path: str | Path) -> dict[str, int]:
    """Bytes by role; the values add up to the file size."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                readers[name].append((node, i))
    out: Counter[str] = Counter()
    for t in graph.initializer:
        numel = 1
        for d in t.dims:
            numel *= d
        out[_role(t.name, t.data_type, numel, readers[t.name])] += _field_bytes(t.ByteSize(), 5)
    for node in graph.node:
        size = _field_bytes(node.ByteSize(), 1)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.ByteSize():
            t = node.attribute[0].t
            numel = 1
            for d in t.dims:
                numel *= d
            out[_role(node.output[0], t.data_type, numel, readers[node.output[0]])] += size
        else:
            out["nodes"] += size
    for field, key in (("value_info", "value_info"), ("input", "graph inputs/outputs"), ("output", "graph inputs/outputs")):
        out[key] += sum(_field_bytes(v.ByteSize()) for v in getattr(graph, field))
    graph_total = _field_bytes(graph.ByteSize(), 7)
    out["graph name/doc"] += graph_total - sum(out.values())
    out["model header/metadata"] += model.ByteSize() - graph_total
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    for p in args.paths:
        b = breakdown(p)
        total = sum(b.values())
        print(f"{p}: {total} bytes (file {Path(p).stat().st_size})")
        for k, v in sorted(b.items(), key=lambda kv: -kv[1]):
            print(f"  {k:28s} {v:10d}  {100 * v / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
