"""Fuzzing ``graphopt optimize`` with mutated models: every run ends in success or one clear error line.

Seeds × cases: each case takes a base model (real and odd ones), applies one mutation chosen by
``np.random.default_rng([seed, case])`` (bit flips or truncation of the serialized bytes, a deleted
or duplicated node, a renamed edge, a wrong dtype, a wrong shape, a bad attribute, an odd opset),
and runs the CLI on it. Allowed: exit 0 or 6 with a loadable output, or a documented error code
(2, 3, 4, 5) with exactly one ``graphopt: error:`` line and no output. Never: a traceback, an
internal error (exit 1), a crash (signal), a hang, a changed input or temp litter. A failure
prints the seed, the case and the mutation; ``mutated(seed, case)`` rebuilds that model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from clirun import run_batch
from conftest import MODELS
from oddmodels import if_branches, ints_and_bools, local_function, loop_body, scan_body, small_cnn, strings

SEEDS = [0, 1, 2, 3, 4, 5]
CASES_PER_SEED = 90  # 540 runs
PIPELINES = ["cleanup", "cleanup", "lift-constants,dce", "cleanup,quantize-weights"]


def _bases() -> dict[str, bytes]:
    protos = {
        "digits_cnn": onnx.load(MODELS / "digits_cnn.onnx"),
        "cnn-opset7": small_cnn(7),
        "cnn-opset13": small_cnn(13),
        "if": if_branches(),
        "loop": loop_body(),
        "scan": scan_body(),
        "local-function": local_function(),
        "strings": strings(),
        "ints-bools": ints_and_bools(),
    }
    return {k: v.SerializeToString() for k, v in protos.items()}


BASES = _bases()
DTYPES = [1, 2, 3, 5, 6, 7, 9, 10, 11, 16, 0, 99]  # float, uint8, int8, int16, int32, int64, bool, fp16, double, bf16, undefined, invalid


def _all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += _all_graphs(attr.g)
            out += [g for sub in attr.graphs for g in _all_graphs(sub)]
    return out


def _pick(rng: np.random.Generator, items: list) -> object:
    return items[int(rng.integers(len(items)))]


def _mutate_proto(model: onnx.ModelProto, rng: np.random.Generator) -> str:
    """Apply one structural mutation in place; returns its description."""
    graphs = [g for g in _all_graphs(model.graph) if len(g.node)] or [model.graph]
    graph = _pick(rng, graphs)
    kind = _pick(rng, ["delete-node", "duplicate-node", "rename-input", "rename-output", "dtype-io", "dtype-init", "shape-io", "shape-init", "attribute", "opset", "swap-nodes", "drop-output"])
    if not graph.node:
        graph.node.add(op_type="Relu", input=["x"], output=["y"])
    i = int(rng.integers(len(graph.node)))
    node = graph.node[i]
    names = sorted({n for g in graphs for nd in g.node for n in [*nd.input, *nd.output]} | {v.name for v in graph.input})
    if kind == "delete-node":
        del graph.node[i]
    elif kind == "duplicate-node":
        graph.node.insert(int(rng.integers(len(graph.node) + 1)), copy.deepcopy(node))
    elif kind == "rename-input" and node.input:
        j = int(rng.integers(len(node.input)))
        node.input[j] = _pick(rng, names + ["", "nowhere"])
    elif kind == "rename-output" and node.output:
        node.output[int(rng.integers(len(node.output)))] = _pick(rng, names + ["fresh"])
    elif kind == "dtype-io":
        values = [*graph.input, *graph.output] or [None]
        if (v := _pick(rng, values)) is not None:
            v.type.tensor_type.elem_type = int(_pick(rng, DTYPES))
    elif kind == "dtype-init" and graph.initializer:
        _pick(rng, list(graph.initializer)).data_type = int(_pick(rng, DTYPES))
    elif kind == "shape-io" and graph.input:
        v = _pick(rng, list(graph.input))
        if v.type.tensor_type.shape.dim:
            d = _pick(rng, list(v.type.tensor_type.shape.dim))
            d.dim_value = int(rng.integers(0, 5))
        else:
            v.type.tensor_type.shape.dim.add().dim_value = 3
    elif kind == "shape-init" and graph.initializer:
        t = _pick(rng, list(graph.initializer))
        if t.dims:
            t.dims[int(rng.integers(len(t.dims)))] = int(rng.integers(0, 9))
        else:
            t.dims.append(2)
    elif kind == "attribute" and node.attribute:
        a = _pick(rng, list(node.attribute))
        if a.type == onnx.AttributeProto.INT:
            a.i = int(_pick(rng, [-5, -1, 0, 2, 99, 2**40]))
        elif a.type == onnx.AttributeProto.INTS and a.ints:
            a.ints[int(rng.integers(len(a.ints)))] = int(_pick(rng, [-1, 0, 7, 1000]))
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = float(_pick(rng, [-1.0, float("nan"), 1e30]))
        else:
            node.attribute.remove(a)
    elif kind == "opset":
        model.opset_import[0].version = int(_pick(rng, [1, 5, 6, 9, 12, 16, 22, 29, 40]))
    elif kind == "swap-nodes" and len(graph.node) > 1:
        j = int(rng.integers(len(graph.node)))
        a, b = copy.deepcopy(graph.node[i]), copy.deepcopy(graph.node[j])
        graph.node[i].CopyFrom(b)
        graph.node[j].CopyFrom(a)
    elif kind == "drop-output" and graph.output:
        del graph.output[int(rng.integers(len(graph.output)))]
    return f"{kind} in graph '{graph.name}' at node {i} ({node.op_type})"


def mutated(seed: int, case: int) -> tuple[str, bytes, str]:
    """(base name, mutated model bytes, description) for one case, deterministically."""
    rng = np.random.default_rng([seed, case])
    base = str(_pick(rng, sorted(BASES)))
    data = BASES[base]
    how = _pick(rng, ["bitflip", "bitflip", "truncate", "proto", "proto", "proto", "proto", "proto2"])
    if how == "bitflip":
        buf = bytearray(data)
        flips = int(rng.integers(1, 9))
        for _ in range(flips):
            k = int(rng.integers(len(buf) * 8))
            buf[k // 8] ^= 1 << (k % 8)
        return base, bytes(buf), f"{flips} bit flips"
    if how == "truncate":
        cut = int(rng.integers(1, len(data)))
        return base, data[:cut], f"truncated to {cut} of {len(data)} bytes"
    model = onnx.ModelProto.FromString(data)
    what = [_mutate_proto(model, rng) for _ in range(2 if how == "proto2" else 1)]
    return base, model.SerializeToString(), "; ".join(what)


@dataclasses.dataclass
class Prepared:
    seed: int
    case: int
    base: str
    what: str
    pipeline: str
    dir: Path
    digest: str


def _prepare(root: Path, seed: int, case: int) -> Prepared:
    base, data, what = mutated(seed, case)
    d = root / f"s{seed}c{case}"
    (d / "out").mkdir(parents=True)
    (d / "m.onnx").write_bytes(data)
    pipeline = PIPELINES[(seed * 7 + case) % len(PIPELINES)]
    return Prepared(seed, case, base, what, pipeline, d, hashlib.sha256(data).hexdigest())


def _problems(p: Prepared, code: int, stderr: str) -> list[str]:
    out, problems = p.dir / "out", []
    lines = stderr.strip().splitlines()
    if code == -999:
        problems.append("hung")
    elif code < 0:
        problems.append(f"killed by signal {-code}")
    elif code not in (0, 2, 3, 4, 5, 6):
        problems.append(f"exit {code} is not a documented outcome")
    if "Traceback" in stderr or "internal error" in stderr:
        problems.append("traceback / internal error")
    if code in (2, 3, 4, 5, 6) and (not lines or not lines[-1].startswith("graphopt: error: ")):
        problems.append("does not end with one 'graphopt: error:' line")
    if any(not line.startswith(("graphopt: warning: ", "graphopt: error: ")) for line in lines) or sum(line.startswith("graphopt: error: ") for line in lines) > 1:
        problems.append("stray stderr output")
    if hashlib.sha256((p.dir / "m.onnx").read_bytes()).hexdigest() != p.digest:
        problems.append("input modified")
    written = sorted(f.name for f in out.iterdir())
    if code in (0, 6):
        if written != ["o.onnx"]:
            problems.append(f"output files {written}")
        else:
            try:
                onnx.checker.check_model(str(out / "o.onnx"))
            except Exception as e:  # noqa: BLE001
                problems.append(f"written output fails the checker: {str(e)[:120]}")
    elif written:
        problems.append(f"failed run left files {written}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_mutated_models_never_crash(seed: int, tmp_path: Path) -> None:
    prepared = [_prepare(tmp_path, seed, case) for case in range(CASES_PER_SEED)]
    calls = [(["optimize", str(p.dir / "m.onnx"), "-o", str(p.dir / "out" / "o.onnx"), "-p", p.pipeline, "-q", "--ort-timeout", "10"], p.dir) for p in prepared]
    results = run_batch(calls, timeout=60, workers=2)
    failures, codes = [], {}
    for p, r in zip(prepared, results):
        codes[r.code] = codes.get(r.code, 0) + 1
        if problems := _problems(p, r.code, r.stderr):
            failures.append(f"seed={p.seed} case={p.case} base={p.base} mutation=[{p.what}] pipeline={p.pipeline} exit={r.code}: {', '.join(problems)}\n    {r.stderr.strip()[-600:]}")
        else:
            shutil.rmtree(p.dir)
    print(f"seed {seed}: exit codes {dict(sorted(codes.items()))}")
    assert not failures, f"{len(failures)} of {len(prepared)} runs misbehaved (rebuild one with tests/test_fuzz.py mutated(seed, case)):\n" + "\n".join(failures[:15])
