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
    split = C.digits_split(SIDE)  # [N, 16, 16]: 16 steps of 16 pixels
    return C.build_torch_digits(
        NAME,
        DigitsLSTM(),
        split,
        epochs=EPOCHS,
        batch=BATCH,
        lr=LR,
        opset=OPSET,
        expect_ops={"LSTM": 2},
        start_time=start,
        meta={
            "description": f"2-layer LSTM (hidden {HIDDEN}, batch-first) over the 16 rows of sklearn digits bilinearly "
            "upsampled from 8x8 to 16x16 (16 steps of 16 pixels in [0, 1]), Linear head on the last step.",
            "task": "10-class image classification read as a sequence, input float32 [batch, 16, 16] in [0, 1]",
            "notes": "Exported without constant folding: each LSTM's W, R and B come from Slices of the torch "
            "weights concatenated in ONNX's gate order (iofc), as the TorchScript exporter writes them.",
        },
    )

if __name__ == "__main__":
    main()
