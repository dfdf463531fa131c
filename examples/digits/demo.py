"""`make demo`: show what lowbit does to the shipped digits CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from lowbit.cli import main as lowbit

HERE = Path(__file__).resolve().parent
MODEL = HERE / "digits_cnn.onnx"


def accuracy(model: Path) -> float:
    """Top-1 accuracy of ``model`` on the fixed test split, computed with ONNX Runtime."""
    split = np.load(HERE / "test_split.npz")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": split["images"]})[0]
    return float((logits.argmax(axis=1) == split["labels"]).mean())


def main() -> None:
    print(f"$ lowbit inspect {MODEL.relative_to(Path.cwd()) if MODEL.is_relative_to(Path.cwd()) else MODEL}")
    lowbit(["inspect", str(MODEL)])
    print(f"\n{MODEL.name}: {MODEL.stat().st_size} bytes, test accuracy {accuracy(MODEL):.4f} (ONNX Runtime)")


if __name__ == "__main__":
    main()
