"""digits_skl_mlp: scikit-learn MLPClassifier (64 -> 128 -> 64 -> 10) on sklearn digits, converted by skl2onnx.

The graph is what skl2onnx writes for a classifier: MatMul/Add/Relu layers, a Softmax, and an
ArgMax-based label path. zipmap=False, so both outputs are plain tensors:
``label`` int64 [N] (the predicted class) and ``probabilities`` float32 [N, 10].

    python -m models.digits_skl_mlp      (from the repo root)
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python models/digits_skl_mlp.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "models"

import numpy as np
import onnx
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from . import _common as C

NAME = "digits_skl_mlp"
OPSET = 17
ML_OPSET = 3
HIDDEN = (128, 64)


def main() -> dict:
    start = time.time()
    C.seed_everything()
    x_train, x_test, y_train, y_test = C.digits_split(8)
    x_train = x_train.reshape(len(x_train), -1)  # [N, 64], values in [0, 1]
    x_test = x_test.reshape(len(x_test), -1)

    clf = MLPClassifier(hidden_layer_sizes=HIDDEN, alpha=1e-4, max_iter=300, random_state=C.SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    skl_acc = float((clf.predict(x_test) == y_test).mean())
    print(f"sklearn test accuracy {skl_acc:.4f} after {clf.n_iter_} iterations")

    model_proto = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, x_train.shape[1]]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    onnx_path = C.staged(NAME, ".onnx")
    onnx.save(model_proto, str(onnx_path))
    model_proto = C.check_onnx(onnx_path)
    print("op histogram:", C.op_histogram(model_proto))

    outputs = C.run_ort(onnx_path, {"input": x_test})
    prob_diff = float(np.abs(outputs["probabilities"] - clf.predict_proba(x_test)).max())
    label_agree = float((outputs["label"] == clf.predict(x_test)).mean())
    print(f"max |sklearn proba - ORT proba| {prob_diff:.3g}; label agreement {label_agree:.4f}")
    assert prob_diff < 1e-4 and label_agree == 1.0, (prob_diff, label_agree)

    num_parameters = int(sum(w.size for w in clf.coefs_) + sum(b.size for b in clf.intercepts_))
    return C.finish(
        NAME,
        test_feeds={"input": x_test},
        test_labels=y_test,
        prediction={"output": "label", "decode": C.LABEL},
        start_time=start,
        meta={
            "description": f"scikit-learn MLPClassifier(hidden_layer_sizes={HIDDEN}, relu, adam) on the raw 8x8 "
            "sklearn digits, flattened to 64 features scaled to [0, 1].",
            "source": "sklearn.datasets.load_digits (bundled, offline); 80/20 stratified split, random_state=0; "
            "trained from scratch by models/digits_skl_mlp.py",
            "framework": C.versions("scikit-learn", "skl2onnx", "onnx", "onnxruntime"),
            "exporter": f"skl2onnx.to_onnx(options={{'zipmap': False}}, target_opset={{'': {OPSET}, "
            f"'ai.onnx.ml': {ML_OPSET}}})",
            "task": "10-class image classification, input float32 [N, 64] in [0, 1]",
            "metric": "top-1 accuracy of the `label` output on the 360-image test split",
            "sklearn_test_accuracy": round(skl_acc, 6),
            "max_abs_diff_sklearn_vs_ort_probabilities": prob_diff,
            "num_parameters": num_parameters,
            "training": f"MLPClassifier defaults (adam, lr 1e-3, batch 200), alpha 1e-4, max_iter 300, "
            f"random_state {C.SEED}; stopped after {clf.n_iter_} iterations",
            "notes": "Outputs: `label` int64 [N] (class id; compare directly with npz labels) and "
            "`probabilities` float32 [N, 10] (softmax). zipmap disabled, so no ai.onnx.ml ZipMap/sequence "
            "output. The batch dimension is unnamed (skl2onnx writes it as a dynamic dim without a name).",
        },
    )


if __name__ == "__main__":
    main()
