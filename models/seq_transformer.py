"""seq_transformer: a 2-layer Transformer encoder that sorts token sequences, per-position classification.

Task (synthetic, generated from a seeded torch.Generator): a sequence of 8-12 tokens drawn from a
vocabulary of 16 (ids 0-15), right-padded with PAD=16 to length 12; the target at each position is
the sorted (ascending) sequence, PAD at the padding positions. Input int64 tokens [batch, 12],
output logits float32 [batch, 12, 17].

Model: token Embedding + learned positional embedding -> nn.TransformerEncoder(2 x
nn.TransformerEncoderLayer(d_model 256, nhead 4, ff 384, dropout 0.1, GELU, post-norm))
-> LayerNorm -> Linear(256, 17).

    python -m models.seq_transformer     (from the repo root)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python models/seq_transformer.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "models"

import numpy as np
import torch
from torch import nn

from . import _common as C

NAME = "seq_transformer"
OPSET = 17
VOCAB = 16
PAD = VOCAB  # 16; the model has VOCAB + 1 classes
MIN_LEN, MAX_LEN = 8, 12
D_MODEL, NHEAD, FF, LAYERS, DROPOUT = 256, 4, 384, 2, 0.1
STEPS = 500
BATCH = 128
LR = 1e-3
TEST_SEQUENCES = 2000


class SortTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB + 1, D_MODEL)
        self.pos = nn.Parameter(torch.randn(MAX_LEN, D_MODEL) * 0.02)
        layer = nn.TransformerEncoderLayer(
            D_MODEL, NHEAD, FF, DROPOUT, activation="gelu", batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB + 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos  # tokens are always padded to MAX_LEN
        return self.head(self.norm(self.encoder(h)))


def make_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random sequences (lengths MIN_LEN..MAX_LEN, PAD-padded to MAX_LEN) and their sorted targets."""
    tokens = torch.randint(0, VOCAB, (n, MAX_LEN), generator=generator)
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (n, 1), generator=generator)
    tokens[torch.arange(MAX_LEN)[None, :] >= lengths] = PAD
    labels = tokens.sort(dim=1).values  # PAD (16) is the largest id, so padding stays at the end
    return tokens, labels


def train(model: nn.Module) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    generator = torch.Generator().manual_seed(C.SEED + 1)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    running = 0.0
    for step in range(1, STEPS + 1):
        tokens, labels = make_batch(BATCH, generator)
        optimizer.zero_grad()
        loss = loss_fn(model(tokens).reshape(-1, VOCAB + 1), labels.reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if step % 200 == 0:
            print(f"step {step}/{STEPS}: train loss {running / 200:.4f}", flush=True)
            running = 0.0
    model.eval()


def seq_metrics(pred: np.ndarray, tokens: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    real = tokens != PAD
    return {
        "all_positions": float((pred == labels).mean()),
        "non_pad_positions": float((pred == labels)[real].mean()),
        "sequence_exact_match": float((pred == labels).all(axis=1).mean()),
    }


def main() -> dict:
    start = time.time()
    C.seed_everything()
    model = SortTransformer()
    train(model)
    print(f"trained in {time.time() - start:.0f} s")

    test_tokens, test_labels = make_batch(TEST_SEQUENCES, torch.Generator().manual_seed(C.SEED + 2))
    test_tokens_np, test_labels_np = test_tokens.numpy(), test_labels.numpy()
    with torch.no_grad():
        torch_pred = model(test_tokens).argmax(-1).numpy()
    torch_metrics = seq_metrics(torch_pred, test_tokens_np, test_labels_np)
    print("torch eval test metrics:", torch_metrics)

    onnx_path = C.staged(NAME, ".onnx")
    model_proto = C.export_torch(
        model,
        (test_tokens[:2],),
        onnx_path,
        input_names=["tokens"],
        output_names=["logits"],
        dynamic_axes={"tokens": {0: "batch"}, "logits": {0: "batch"}},
        opset=OPSET,
    )
    hist = C.op_histogram(model_proto)
    print("op histogram:", hist)
    assert hist.get("Dropout", 0) >= 1 and hist.get("LayerNormalization", 0) >= 1, hist
    diff = C.torch_ort_max_abs_diff(model, onnx_path, {"tokens": test_tokens_np}, "logits")
    print(f"max |torch - ORT| on the test split: {diff:.3g}")
    assert diff < 1e-4, diff

    ort_pred = C.run_ort(onnx_path, {"tokens": test_tokens_np})["logits"].argmax(-1)
    ort_metrics = seq_metrics(ort_pred, test_tokens_np, test_labels_np)
    return C.finish(
        NAME,
        test_feeds={"tokens": test_tokens_np},
        test_labels=test_labels_np,
        prediction={"output": "logits", "decode": C.ARGMAX},
        start_time=start,
        meta={
            "description": f"Transformer encoder ({LAYERS} x nn.TransformerEncoderLayer, d_model {D_MODEL}, nhead "
            f"{NHEAD}, dim_feedforward {FF}, dropout {DROPOUT}, GELU, post-norm; token + learned positional "
            "embedding; final LayerNorm; Linear head) that sorts token sequences.",
            "source": f"synthetic: {MIN_LEN}-{MAX_LEN} tokens uniform from ids 0-{VOCAB - 1}, right-padded with "
            f"PAD={PAD} to {MAX_LEN}; target = the ascending sort (PAD at padding positions). Training batches "
            f"drawn fresh from torch.Generator seed {C.SEED + 1}; test split of {TEST_SEQUENCES} sequences "
            f"from seed {C.SEED + 2}",
            "framework": C.versions("torch", "onnx", "onnxruntime"),
            "exporter": C.EXPORTER_TORCHSCRIPT,
            "task": f"per-position classification into {VOCAB + 1} classes (16 tokens + PAD), input int64 "
            f"tokens [batch, {MAX_LEN}], output logits [batch, {MAX_LEN}, {VOCAB + 1}]",
            "metric": "per-token accuracy of argmax(logits) over all 12 positions of the test split "
            "(labels [N, 12], PAD=16 at padding positions); see `metrics` for non-pad and exact-match",
            "metrics": {k: round(v, 6) for k, v in ort_metrics.items()},
            "torch_metrics": {k: round(v, 6) for k, v in torch_metrics.items()},
            "max_abs_diff_torch_vs_ort": diff,
            "num_parameters": C.torch_num_parameters(model),
            "training": f"AdamW lr {LR} one-cycle (10% warm-up), {STEPS} steps of batch {BATCH}, grad clip 1.0, "
            f"seed {C.SEED}, 2 threads",
            "notes": "Dropout (3 per encoder layer) kept by a custom aten::dropout symbolic that emits the ONNX "
            "inference form Dropout(x, ratio, training_mode=false); attention dropout is an argument of "
            "scaled_dot_product_attention and leaves no node. GELU is exported as its Erf formula (no Gelu op "
            "before opset 20). Only the batch dim is dynamic: the TorchScript tracer bakes the sequence length "
            f"into nn.MultiheadAttention's Reshape shapes, so inputs are always padded to {MAX_LEN}.",
        },
    )


if __name__ == "__main__":
    main()
