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
    split = (x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1), y_train, y_test)  # [N, 256]
    return C.build_torch_digits(
        NAME,
        DigitsWideMLP(),
        split,
        epochs=EPOCHS,
        batch=BATCH,
        lr=LR,
        opset=OPSET,
        expect_ops={"Dropout": 3},
        start_time=start,
        meta={
            "description": f"MLP 256-{WIDTH}-{WIDTH}-{WIDTH}-10 (Linear-ReLU-Dropout({DROPOUT}) x3, Linear) on sklearn "
            "digits bilinearly upsampled from 8x8 to 16x16 and flattened, pixel values scaled to [0, 1].",
            "task": "10-class image classification, input float32 [batch, 256] (16x16 row-major) in [0, 1]",
            "notes": "Dropout kept by a custom aten::dropout symbolic that emits the ONNX inference form "
            f"Dropout(x, ratio={DROPOUT}, training_mode=false); no node was inserted after export.",
        },
    )

if __name__ == "__main__":
    main()
