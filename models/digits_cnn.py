"""digits_cnn: graphopt's default model. A small CNN on sklearn digits upsampled to 16x16.

Conv-BN-ReLU blocks, a Dropout and two Linear layers; exported so that the ONNX graph keeps its
BatchNormalization and (inference-mode) Dropout nodes, which graphopt's cleanup passes remove.

    python -m models.digits_cnn          (from the repo root)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python models/digits_cnn.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "models"

import torch
from torch import nn

from . import _common as C

NAME = "digits_cnn"
SIDE = 16
OPSET = 17
EPOCHS = 40
BATCH = 64
LR = 3e-3


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def main() -> dict:
    start = time.time()
    C.seed_everything()
    x_train, x_test, y_train, y_test = C.digits_split(SIDE)
    split = (x_train[:, None], x_test[:, None], y_train, y_test)  # [N, 1, 16, 16]
    return C.build_torch_digits(
        NAME,
        DigitsCNN(),
        split,
        epochs=EPOCHS,
        batch=BATCH,
        lr=LR,
        opset=OPSET,
        expect_ops={"BatchNormalization": 2, "Dropout": 1},
        start_time=start,
        meta={
            "description": "Default graphopt model: CNN (2x Conv-BatchNorm-ReLU-MaxPool, Linear-ReLU-Dropout-Linear) "
            "on sklearn digits bilinearly upsampled from 8x8 to 16x16, pixel values scaled to [0, 1].",
            "task": "10-class image classification, input float32 [batch, 1, 16, 16] in [0, 1]",
            "notes": "BatchNormalization kept by do_constant_folding=False (folding would merge it into Conv). "
            "Dropout kept by a custom aten::dropout symbolic that emits the ONNX inference form "
            "Dropout(x, ratio=0.3, training_mode=false); the stock exporters drop eval-mode dropout "
            "(TorchScript symbolic returns its input; dynamo decomposes it before translation). "
            "No node was inserted after export.",
        },
    )

if __name__ == "__main__":
    main()
