"""Per-pass records, model statistics, and the report's JSON and table forms."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt import sparse
from graphopt.edit import count_nodes, iter_tensors
from graphopt.io import tensor_bytes
from graphopt.metrics import OutputError, worst

EXACT_BYTES_LIMIT = 512 * 2**20
"""Above this many tensor bytes, model bytes are tensor bytes plus the graph's own proto size,
estimated without serializing the tensors (saves a copy of a big model per pass)."""


@dataclasses.dataclass(frozen=True)
class ModelStats:
    nodes: int
    params: int
    bytes: int

    @classmethod
    def of(cls, model: ir.Model) -> ModelStats:
        params = sum(t.size for t in iter_tensors(model))
        return cls(count_nodes(model), params, model_bytes(model))


def model_bytes(model: ir.Model) -> int:
    """Bytes of the saved model: the serialized proto plus any external data."""
    weights = tensor_bytes(model)
    if weights > EXACT_BYTES_LIMIT:
        return weights + count_nodes(model) * 64  # nodes cost tens of bytes each; tensors dominate
    external = sum(t.nbytes for t in iter_tensors(model) if isinstance(t, ir.ExternalTensor))
    return sparse.to_proto(model).ByteSize() + external


def figures(errors: Sequence[OutputError] | None) -> dict[str, Any]:
    """Worst-case figures over the outputs, JSON-safe (inf -> None; ``bit_exact`` says why)."""
    w = worst(errors or [])
    if w is None:
        return {"max_abs_error": None, "max_rel_error": None, "sqnr_db": None, "cosine": None, "bit_exact": None}
    return {
        "max_abs_error": _finite(w.max_abs),
        "max_rel_error": _finite(w.max_rel),
        "sqnr_db": _finite(w.sqnr_db),
        "cosine": _finite(w.cosine),
        "bit_exact": w.max_abs == 0.0 and not w.mismatch,
    }


def _finite(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else x


@dataclasses.dataclass
class PassRecord:
    """One pass as it ran: sizes before and after, time, error figures and the verdict."""

    name: str
    options: dict[str, Any]
    lossless: bool
    before: ModelStats
    after: ModelStats
    seconds: float
    verify_seconds: float = 0.0
    modified: bool = False
    verdict: str = "unchanged"  # ok | unchanged | unverified | violation | rolled-back | not-verified
    budget: str = ""
    exact: list[OutputError] = dataclasses.field(default_factory=list)
    deploy: list[OutputError] | None = None
    vs_previous: list[OutputError] = dataclasses.field(default_factory=list)
    violations: list[str] = dataclasses.field(default_factory=list)
    unverified: str = ""
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    iteration: int | None = None  # round inside a repeat{...}
    accuracy: tuple[float, float] | None = None  # task accuracy (input model, this step) when labels were given
    source: object = dataclasses.field(default=None, repr=False, compare=False)  # the pass object that ran

    @property
    def verified(self) -> bool:
        return self.verdict in ("ok", "unchanged")

    def to_json(self) -> dict[str, Any]:
        exact = figures(self.exact)
        return {
            "pass": self.name,
            "options": {k.replace("_", "-"): v for k, v in self.options.items()},
            "lossless": self.lossless,
            "modified": self.modified,
            "nodes_before": self.before.nodes,
            "nodes_after": self.after.nodes,
            "params_before": self.before.params,
            "params_after": self.after.params,
            "bytes_before": self.before.bytes,
            "bytes_after": self.after.bytes,
            "seconds": round(self.seconds, 4),
            "verify_seconds": round(self.verify_seconds, 4),
            **{k: v for k, v in exact.items()},
            "deploy": figures(self.deploy) if self.deploy is not None else None,
            "vs_previous": figures(self.vs_previous) if self.vs_previous else None,
            "outputs": [_output_json(e) for e in self.exact],
            "budget": self.budget,
            "verified": self.verified,
            "verdict": self.verdict,
            "rolled_back": self.verdict == "rolled-back",
            "violations": self.violations,
            "unverified_reason": self.unverified or None,
            "accuracy": {"reference": self.accuracy[0], "after": self.accuracy[1]} if self.accuracy else None,
            "stats": self.stats,
            "layers": self.layers,
            **({"iteration": self.iteration} if self.iteration is not None else {}),
        }


def _output_json(e: OutputError) -> dict[str, Any]:
    return {"output": e.output, **figures([e])}


@dataclasses.dataclass
class Report:
    model: str
    pipeline: str
    records: list[PassRecord]
    original: ModelStats
    final: ModelStats
    reference_samples: int
    verification: str  # "on" | "off" | the reason it could not run
    baseline_deploy: list[OutputError] | None = None

    @property
    def verified(self) -> bool:
        return self.verification == "on" and all(r.verified for r in self.records)

    def summary(self) -> dict[str, Any]:
        import onnxruntime

        from graphopt import __version__

        return {
            "model": self.model,
            "pipeline": self.pipeline,
            "nodes": [self.original.nodes, self.final.nodes],
            "params": [self.original.params, self.final.params],
            "bytes": [self.original.bytes, self.final.bytes],
            "bytes_ratio": round(self.final.bytes / self.original.bytes, 4) if self.original.bytes else None,
            "seconds": round(sum(r.seconds + r.verify_seconds for r in self.records), 3),
            "verified": self.verified,
            "verification": self.verification,
            "samples": self.reference_samples,
            "final_error": figures(self.records[-1].exact) if self.records and self.records[-1].exact else None,
            "input_model_deploy_error": figures(self.baseline_deploy) if self.baseline_deploy else None,
            "rolled_back": [r.name for r in self.records if r.verdict == "rolled-back"],
            "graphopt": __version__,
            "onnxruntime": onnxruntime.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        }

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "passes": [r.to_json() for r in self.records]}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
