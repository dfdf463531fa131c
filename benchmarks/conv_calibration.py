"""Convolutional networks through the graph door, data-free and with ``calibration_data`` (error feedback over each
convolution's (input channel, kernel position) pairs, from ``X^T X`` over the windows its weight multiplies).

    .venv-bench/bin/python benchmarks/conv_calibration.py [--only KEY,KEY,...]     (1 min on 2 cores)

Two real ONNX CNNs, each at its own opset:

- rapidocr's PP-OCRv4 text detector (MobileNetV3-style: 1 x 1 and 3 x 3 convolutions of one group and depthwise
  5 x 5 ones, whose statistics are kept per channel; a 2 x 2 stride-2 transposed convolution in its
  head). Calibration: 8 crops (192 x 192) of scikit-learn's ``china.jpg``
  with random words drawn on them; evaluation: 24 crops of ``flower.jpg`` with other words. Measured: the relative
  error of the detector's probability map to fp32's, and the IoU of the two maps' text pixels (> 0.3).
- lowbit's digits CNN (``examples/digits``): calibration on 256 training images, evaluation on the fixed test split
  (360 images). Measured: top-1 accuracy, agreement with fp32's top-1, the logits' relative error.
- A convolutional autoencoder of the same digits, trained here (a few seconds, seeded): three convolutions down to
  2 x 2, two 2 x 2 stride-2 transposed convolutions and a 3 x 3 convolution back up, most of its weights in the
  transposed ones. Same calibration and evaluation images. Measured: the reconstructions' relative error to fp32's,
  and their mean squared error to the images.

Bits per weight count every compressed weight's stored bytes (codes, LUTs, scales, masks) over its elements. Each
row is ``lowbit.palettize_weights`` / ``quantize_weights`` / ``sparsify_weights`` (50 % or 2:4, non-zeros int8) on
the fp32 file with the defaults (``weight_num_threshold``
2048 on the detector, 1000 on the digits CNN's small convs). No peer tool here compresses an ONNX convolution's
weights weight-only: ONNX Runtime's ``MatMulNBitsQuantizer`` reads MatMul, llmcompressor's GPTQ and HQQ torch
Linear modules; coremltools and coreai-opt take torch or Core ML models, not ONNX files.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from _common import chosen_rows, table, text_crops

import lowbit

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
DIGITS = HERE.parent / "examples" / "digits"


def detector_path() -> Path:
    spec = find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise SystemExit("needs rapidocr-onnxruntime (make .venv-bench/.ready installs it without its deps)")
    return Path(spec.origin).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"


def outputs(model: lowbit.Program, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    data = ir.serde.serialize_model(model.model).SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return [session.run(None, {name: x})[0] for x in inputs]


class Case:
    """A model, its calibration feeds and evaluation inputs, and how a compressed copy is scored against fp32."""

    def __init__(self, path: Path, input_name: str, calibration: list[np.ndarray], evaluation: list[np.ndarray]):
        self.path, self.input_name, self.evaluation = path, input_name, evaluation
        self.feeds = [{input_name: x} for x in calibration]
        self.dense = outputs(lowbit.load(path), input_name, evaluation)

    def score(self, model: lowbit.Program) -> list[str]:
        raise NotImplementedError


class Detector(Case):
    headers = ("map rel. error", "text IoU")

    def score(self, model: lowbit.Program) -> list[str]:
        maps = outputs(model, self.input_name, self.evaluation)
        error = sum(float(np.sum((m - d) ** 2)) for m, d in zip(maps, self.dense, strict=True))
        energy = sum(float(np.sum(d**2)) for d in self.dense)
        ious = [
            ((m > 0.3) & (d > 0.3)).sum() / max(((m > 0.3) | (d > 0.3)).sum(), 1)
            for m, d in zip(maps, self.dense, strict=True)
        ]
        return [f"{np.sqrt(error / energy):.4f}", f"{np.mean(ious):.4f}"]


class Digits(Case):
    headers = ("accuracy", "top-1 = fp32", "logits rel. error")

    def __init__(self, labels: np.ndarray, *args) -> None:
        super().__init__(*args)
        self.labels = labels

    def score(self, model: lowbit.Program) -> list[str]:
        logits, dense = outputs(model, self.input_name, self.evaluation)[0], self.dense[0]
        error = np.linalg.norm(logits - dense) / np.linalg.norm(dense)
        top1 = logits.argmax(1)
        return [f"{(top1 == self.labels).mean():.4f}", f"{(top1 == dense.argmax(1)).mean():.4f}", f"{error:.4f}"]


class Reconstruction(Case):
    headers = ("rel. error to fp32", "MSE to images")

    def score(self, model: lowbit.Program) -> list[str]:
        images, dense = outputs(model, self.input_name, self.evaluation)[0], self.dense[0]
        error = np.linalg.norm(images - dense) / np.linalg.norm(dense)
        return [f"{error:.4f}", f"{np.mean((images - self.evaluation[0]) ** 2):.5f}"]


def digits_autoencoder(x_train: np.ndarray, path: Path) -> Path:
    """A convolutional autoencoder of the digits (conv down, transposed conv up), 60 epochs of Adam on
    ``x_train``, torch seeded, exported to ``path`` (opset 17)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),  # 2 x 2
        nn.ConvTranspose2d(128, 64, 2, stride=2), nn.ReLU(), nn.ConvTranspose2d(64, 32, 2, stride=2), nn.ReLU(),
        nn.Conv2d(32, 1, 3, padding=1),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = torch.from_numpy(x_train)
    for _ in range(60):
        for start in range(0, len(x), 64):
            batch = x[start : start + 64]
            optimizer.zero_grad()
            nn.functional.mse_loss(model(batch), batch).backward()
            optimizer.step()
    model.eval()
    torch.onnx.export(model, (x[:1],), str(path), dynamo=False, opset_version=17, input_names=["image"],
                      dynamic_axes={"image": {0: "n"}})  # fmt: skip
    return path


def bits_per_weight(model: lowbit.Program) -> float:
    compressed = model.report.compressed
    return 8 * sum(r.bytes_after for r in compressed) / max(sum(int(np.prod(r.shape)) for r in compressed), 1)


CONFIGS: dict[str, tuple[Callable, dict]] = {
    "pal8": (lowbit.palettize_weights, {"n_bits": 8}),
    "pal6": (lowbit.palettize_weights, {"n_bits": 6}),
    "pal4c": (lowbit.palettize_weights, {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 1}),
    "pal3c": (lowbit.palettize_weights, {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 1}),
    "mix6": (lowbit.palettize_weights, {"bits_per_weight": 6.0}),
    "mix4.5": (lowbit.palettize_weights, {"bits_per_weight": 4.5}),
    "int8": (lowbit.quantize_weights, {"dtype": "INT8"}),
    "int4": (lowbit.quantize_weights, {"dtype": "INT4"}),
    "int4b16": (lowbit.quantize_weights, {"dtype": "INT4", "granularity": "PER_BLOCK", "block_size": 16}),
    "sp50i8": (lowbit.sparsify_weights, {"target_sparsity": 0.5, "quantize_dtype": "int8"}),
    "sp24i8": (lowbit.sparsify_weights, {"target_sparsity": 0.0, "n_m_ratio": (2, 4), "quantize_dtype": "int8"}),
}


def rows_of(case: Case, keys: list[str], threshold: int) -> list[list[str]]:
    rows = [["fp32", "32", "-", "-", *case.score(lowbit.load(case.path))]]
    for key in keys:
        compress, params = CONFIGS[key]
        for calibrated in (False, True):
            start = time.perf_counter()
            small = compress(
                lowbit.load(case.path),
                weight_num_threshold=threshold,
                calibration_data=case.feeds if calibrated else None,
                **params,
            )
            seconds = time.perf_counter() - start
            label = "calibrated" if calibrated else "data-free"
            rows.append([key, f"{bits_per_weight(small):.2f}", label, f"{seconds:.1f}", *case.score(small)])
    return rows


def main() -> None:
    from sklearn.datasets import load_sample_images

    sys.path.insert(0, str(DIGITS))
    from train import load_split

    keys = chosen_rows(CONFIGS)
    china, flower = load_sample_images().images
    detector = Detector(detector_path(), "x", text_crops(china, 8, seed=0), text_crops(flower, 24, seed=1))
    x_train, _, x_test, y_test = load_split()
    digits = Digits(
        y_test, DIGITS / "digits_cnn.onnx", "image", [x_train[i : i + 32] for i in range(0, 256, 32)], [x_test]
    )
    head = ["config", "b/w", "calibration", "s"]
    print("PP-OCRv4 text detector (rapidocr 1.4.4), 24 evaluation crops")
    print(table(head + list(Detector.headers), rows_of(detector, keys, 2048)))
    print("\ndigits CNN (examples/digits), 360 test images")
    print(table(head + list(Digits.headers), rows_of(digits, keys, 1000)))
    with tempfile.TemporaryDirectory() as folder:
        autoencoder = digits_autoencoder(x_train, Path(folder) / "autoencoder.onnx")
        calibration = [x_train[i : i + 32] for i in range(0, 256, 32)]
        reconstruction = Reconstruction(autoencoder, "image", calibration, [x_test])
        print("\ndigits autoencoder (transposed convolutions up), 360 test images")
        print(table(head + list(Reconstruction.headers), rows_of(reconstruction, keys, 1000)))


if __name__ == "__main__":
    main()
