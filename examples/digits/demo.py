"""`make demo`: palettize the shipped digits CNN to 4 bits and show what it cost."""

from __future__ import annotations

import tempfile
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


def run(*argv: str) -> None:
    print("$ lowbit " + " ".join(argv))
    code = lowbit(list(argv))
    if code:
        raise SystemExit(code)
    print()


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="lowbit-demo-")) / "digits_cnn_4bit.onnx"
    run(
        "palettize",
        str(MODEL),
        str(out),
        "--n-bits",
        "4",
        "--granularity",
        "per-grouped-channel",
        "--group-size",
        "16",
        "--workers",
        "1",
    )
    run("inspect", str(out))
    dense, small = MODEL.stat().st_size, out.stat().st_size
    print(f"{'model':<28}{'bytes':>10}{'test accuracy':>16}")
    print(f"{MODEL.name:<28}{dense:>10}{accuracy(MODEL):>16.4f}")
    print(f"{out.name:<28}{small:>10}{accuracy(out):>16.4f}")
    print(
        f"{dense / small:.2f}x smaller; accuracy on the {len(np.load(HERE / 'test_split.npz')['labels'])} held-out "
        f"digits computed with ONNX Runtime {ort.__version__}; output in {out}"
    )


if __name__ == "__main__":
    main()
