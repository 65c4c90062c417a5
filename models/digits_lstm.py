"""digits_lstm: a 2-layer LSTM reading sklearn digits (upsampled to 16x16) one pixel row per step.

The recurrent model of the set: its ONNX graph holds LSTM nodes as torch's TorchScript exporter
writes them (each weight cut into gate slices and concatenated in ONNX's gate order, the sequence
transposed from batch-first), for fold-constants and the quantizers' LSTM paths.

    python -m models.digits_lstm         (from the repo root)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python models/digits_lstm.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "models"

import torch
from torch import nn

from . import _common as C

NAME = "digits_lstm"
SIDE = 16
OPSET = 17
HIDDEN = 128
EPOCHS = 30
BATCH = 64
LR = 3e-3


class DigitsLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(SIDE, HIDDEN, num_layers=2, batch_first=True)
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)  # [batch, rows, hidden]
        return self.head(y[:, -1])


def main() -> dict:
    start = time.time()
    C.seed_everything()
    x_train, x_test, y_train, y_test = C.digits_split(SIDE)  # [N, 16, 16]: 16 steps of 16 pixels

    model = DigitsLSTM()
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
    assert hist.get("LSTM", 0) == 2, hist
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
            "description": f"2-layer LSTM (hidden {HIDDEN}, batch-first) over the 16 rows of sklearn digits bilinearly "
            "upsampled from 8x8 to 16x16 (16 steps of 16 pixels in [0, 1]), Linear head on the last step.",
            "source": "sklearn.datasets.load_digits (bundled, offline); 80/20 stratified split, random_state=0; "
            "trained from scratch by models/digits_lstm.py",
            "framework": C.versions("torch", "onnx", "onnxruntime"),
            "exporter": C.EXPORTER_TORCHSCRIPT,
            "task": "10-class image classification read as a sequence, input float32 [batch, 16, 16] in [0, 1]",
            "metric": "top-1 accuracy of argmax(logits) on the 360-image test split",
            "torch_test_accuracy": round(torch_acc, 6),
            "max_abs_diff_torch_vs_ort": diff,
            "num_parameters": C.torch_num_parameters(model),
            "training": f"AdamW lr {LR} one-cycle, {EPOCHS} epochs, batch {BATCH}, seed {C.SEED}, 2 threads",
            "notes": "Exported without constant folding: each LSTM's W, R and B come from Slices of the torch "
            "weights concatenated in ONNX's gate order (iofc), as the TorchScript exporter writes them.",
        },
    )


if __name__ == "__main__":
    main()
