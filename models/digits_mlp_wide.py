"""digits_mlp_wide: a wide MLP (256 -> 512 -> 512 -> 512 -> 10, ReLU, Dropout) on sklearn digits at 16x16.

Big Gemm weights (512x512) for the low-rank / quantization passes; Dropout kept in inference form.

    python -m models.digits_mlp_wide     (from the repo root)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python models/digits_mlp_wide.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "models"

import torch
from torch import nn

from . import _common as C

NAME = "digits_mlp_wide"
SIDE = 16
OPSET = 17
EPOCHS = 40
BATCH = 64
LR = 1e-3
WIDTH = 512
DROPOUT = 0.2


class DigitsWideMLP(nn.Module):
    def __init__(self, inputs: int = SIDE * SIDE, width: int = WIDTH, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(inputs if i == 0 else width, width), nn.ReLU(), nn.Dropout(DROPOUT)]
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> dict:
    start = time.time()
    C.seed_everything()
    x_train, x_test, y_train, y_test = C.digits_split(SIDE)
    x_train = x_train.reshape(len(x_train), -1)  # [N, 256]
    x_test = x_test.reshape(len(x_test), -1)

    model = DigitsWideMLP()
    C.train_classifier(model, torch.from_numpy(x_train), torch.from_numpy(y_train), epochs=EPOCHS, batch=BATCH, lr=LR)
    model.eval()
    with torch.no_grad():
        torch_acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    print(f"torch eval test accuracy {torch_acc:.4f}")

    onnx_path = C.staged(NAME, ".onnx")
    model_proto = C.export_torch(
        model,
        (torch.from_numpy(x_test[:2]),),
        onnx_path,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset=OPSET,
    )
    hist = C.op_histogram(model_proto)
    print("op histogram:", hist)
    assert hist.get("Dropout", 0) == 3, hist
    feeds = {"input": x_test}
    diff = C.torch_ort_max_abs_diff(model, onnx_path, feeds, "logits")
    print(f"max |torch - ORT| on the test split: {diff:.3g}")
    assert diff < 1e-4, diff

    return C.finish(
        NAME,
        test_feeds=feeds,
        test_labels=y_test,
        prediction={"output": "logits", "decode": C.ARGMAX},
        start_time=start,
        meta={
            "description": f"MLP 256-{WIDTH}-{WIDTH}-{WIDTH}-10 (Linear-ReLU-Dropout({DROPOUT}) x3, Linear) on sklearn "
            "digits bilinearly upsampled from 8x8 to 16x16 and flattened, pixel values scaled to [0, 1].",
            "source": "sklearn.datasets.load_digits (bundled, offline); 80/20 stratified split, random_state=0; "
            "trained from scratch by models/digits_mlp_wide.py",
            "framework": C.versions("torch", "onnx", "onnxruntime"),
            "exporter": C.EXPORTER_TORCHSCRIPT,
            "task": "10-class image classification, input float32 [batch, 256] (16x16 row-major) in [0, 1]",
            "metric": "top-1 accuracy of argmax(logits) on the 360-image test split",
            "torch_test_accuracy": round(torch_acc, 6),
            "max_abs_diff_torch_vs_ort": diff,
            "num_parameters": C.torch_num_parameters(model),
            "training": f"AdamW lr {LR} one-cycle, {EPOCHS} epochs, batch {BATCH}, seed {C.SEED}, 2 threads",
            "notes": "Dropout kept by a custom aten::dropout symbolic that emits the ONNX inference form "
            f"Dropout(x, ratio={DROPOUT}, training_mode=false); no node was inserted after export.",
        },
    )


if __name__ == "__main__":
    main()
