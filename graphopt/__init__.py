"""graphopt: a verified ONNX graph optimizer.

Every pass in a pipeline is checked with onnxruntime against the input model's outputs:
bit-exact for lossless passes, within a stated budget for lossy ones.

    import graphopt
    model, report = graphopt.optimize("model.onnx", "cleanup,svd-split{energy=0.98}")
    graphopt.save(model, "model.opt.onnx")
"""

__version__ = "0.1.0"

from graphopt.api import optimize, save, verify  # noqa: E402
from graphopt.errors import (  # noqa: E402
    GraphoptError,
    ModelError,
    PassFailed,
    PipelineError,
    UsageError,
    VerificationError,
)
from graphopt.io import load  # noqa: E402
from graphopt.metrics import Tolerance  # noqa: E402
from graphopt.passbase import GraphPass, PassResult, option  # noqa: E402
from graphopt.pipeline import format_pipeline, parse_pipeline  # noqa: E402
from graphopt.registry import register  # noqa: E402

__all__ = [
    "GraphPass",
    "GraphoptError",
    "ModelError",
    "PassFailed",
    "PassResult",
    "PipelineError",
    "Tolerance",
    "UsageError",
    "VerificationError",
    "format_pipeline",
    "load",
    "optimize",
    "option",
    "parse_pipeline",
    "register",
    "save",
    "verify",
]
