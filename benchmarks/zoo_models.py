"""The model zoo of benchmarks/zoo.py: where each model, its data and its task metric come from.

Calibration samples never overlap the scored ones:
- digits models: 512 images of the training split (rebuilt as benchmarks/svd.py does, checked to give
  exactly the stored test split); all 360 test images scored;
- seq_transformer: the first 500 test sequences calibrate, the other 1500 are scored;
- pretrained (models/pretrained.py) and light (models/light.py) models: their ``_calib.npz`` holds
  other sentences / text lines / pages / images than their ``_test.npz``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
TRAINED = ("digits_skl_mlp", "digits_cnn", "digits_mlp_wide", "seq_transformer", "digits_lstm")
PRETRAINED = ("minilm", "ocr_rec", "ocr_cls", "ocr_det", "effnet_lite0")
LIGHT = tuple(f"light_{n}" for n in ("squeezenet", "shufflenet", "inception_v1", "densenet121", "inception_v2", "resnet50", "bvlc_alexnet", "zfnet512", "vgg19"))
DEFAULT = (*TRAINED, *PRETRAINED, "light_squeezenet", "light_shufflenet", "light_resnet50")
"""The full run (about 20 minutes on 2 busy cores); Inception v1/v2, DenseNet121, AlexNet, ZFNet and
VGG19 (250-570 MB) are there with ``--models``."""
QUICK = ("digits_skl_mlp",)
LATENCY_BATCH = {"trained": 32, "minilm": 32, "ocr_rec": 8, "ocr_cls": 16, "ocr_det": 1, "effnet_lite0": 4, "light": 1}


@dataclass
class Entry:
    name: str
    group: str  # trained | pretrained | light
    path: Path
    calib: list[dict[str, np.ndarray]]
    scored: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    metric: str  # headline task metric
    higher_is_better: bool
    score: Callable[[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]], dict[str, float]]
    latency_feed: dict[str, np.ndarray]
    notes: dict[str, Any] = field(default_factory=dict)


class Missing(RuntimeError):
    """A model isn't built and can't be (reason in the message)."""


def _trained(name: str) -> Entry:
    import onnx_ir as ir

    from benchmarks import svd

    path = MODELS / f"{name}.onnx"
    calib, feed, labels, how = svd.dataset(name, ir.load(path))

    def score(outs: list[dict], ref: list[dict]) -> dict[str, float]:
        return {"accuracy": svd.accuracy(outs[0], labels, name)}

    batch = LATENCY_BATCH["trained"]
    return Entry(name, "trained", path, [calib], [feed], labels, "accuracy", True, score, {k: v[:batch] for k, v in feed.items()}, {"calibration": how})


def _pretrained(name: str) -> Entry:
    from models import pretrained

    try:
        files = pretrained.load(name)
    except pretrained.Unavailable as e:
        raise Missing(str(e)) from None
    test, labels = pretrained.npz(files["test"])
    calib, _ = pretrained.npz(files["calib"])
    metric, higher = pretrained.HEADLINE[name]

    def score(outs: list[dict], ref: list[dict]) -> dict[str, float]:
        return pretrained.score(name, outs[0], labels, ref[0])

    batch = LATENCY_BATCH.get(name, 8)
    info = json.loads(files["json"].read_text())
    return Entry(name, "pretrained", files["onnx"], [calib], [test], labels, metric, higher, score, {k: v[:batch] for k, v in test.items()},
                 {"calibration": "models/pretrained.py _calib.npz (disjoint inputs)", "task": info.get("task"), "metric_definition": info.get("metric")})  # fmt: skip


def _light(name: str) -> Entry:
    from models import light

    short = name.removeprefix("light_")
    if not light.available(short):
        raise Missing(f"{name} is not built (python -m models.light {short})")
    files = light.paths(short)
    test, _ = _npz(files["test"])
    calib, _ = _npz(files["calib"])
    (key,) = test
    scored = [{key: test[key][i : i + 1]} for i in range(len(test[key]))]  # batch 1: some Reshapes hard-code it

    def score(outs: list[dict], ref: list[dict]) -> dict[str, float]:
        got = np.concatenate([next(iter(o.values())).reshape(1, -1) for o in outs])
        want = np.concatenate([next(iter(r.values())).reshape(1, -1) for r in ref])
        return {"top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1)))}

    return Entry(name, "light", files["onnx"], [{key: calib[key][i : i + 1]} for i in range(len(calib[key]))], scored, None,
                 "sqnr_db", True, score, scored[0], {"calibration": "4 N(0,1) images, other than the 2 scored", "weights": "random (models/light.py): no task"})  # fmt: skip


def _npz(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, arrays.pop("labels", None)


def entry(name: str) -> Entry:
    if name in TRAINED:
        return _trained(name)
    if name in PRETRAINED:
        return _pretrained(name)
    if name in LIGHT:
        return _light(name)
    raise KeyError(f"unknown model {name!r}")


def expand(names: list[str] | None, quick: bool) -> list[str]:
    """Model names from flags: names, or the groups trained / pretrained / light / all."""
    if not names:
        return list(QUICK if quick else DEFAULT)
    groups = {"trained": TRAINED, "pretrained": PRETRAINED, "light": LIGHT, "all": (*TRAINED, *PRETRAINED, *LIGHT), "default": DEFAULT}
    out: list[str] = []
    for n in names:
        for m in groups.get(n, (n if n.startswith("light_") or n not in [x.removeprefix("light_") for x in LIGHT] else f"light_{n}",)):
            if m not in (*TRAINED, *PRETRAINED, *LIGHT):
                raise SystemExit(f"unknown model {m!r}; known: {', '.join((*TRAINED, *PRETRAINED, *LIGHT))} or trained/pretrained/light/all")
            if m not in out:
                out.append(m)
    return out
