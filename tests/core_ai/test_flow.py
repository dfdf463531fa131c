"""The Core AI flow end to end, as a user runs it: a PyTorch model -> ``.aimodel`` with coreai-torch -> compressed
with lowbit -> saved -> loaded -> run on the Core AI runtime (the digits CNN, all-MiniLM-L6-v2); the reference
documentation's example with only the import changed; atomic saves; a second pass."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coreai.authoring", reason="needs lowbit[coreai] (coreai-core, Python >= 3.11)")
pytest.importorskip("coreai_torch", reason="needs coreai-torch (Python >= 3.11)")

import onnx
import torch
from coreai.authoring import AIModelAsset, AIProgram
from coreai_support import convert, run_asset

import lowbit.coreai as lc
from lowbit.coreai import DType, quantize_weights

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "digits"))
from train import DigitsCNN, load_split  # noqa: E402


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """(the shipped digits CNN converted to Core AI and saved, 128 test images, their labels)."""
    model = DigitsCNN()
    initializers = onnx.load(ROOT / "examples" / "digits" / "digits_cnn.onnx").graph.initializer
    model.load_state_dict({i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in initializers})
    _, _, x_test, y_test = load_split()
    images = x_test[:128]
    path = tmp_path_factory.mktemp("digits") / "digits.aimodel"
    convert(model.eval(), (torch.from_numpy(images),)).save_asset(path)
    return path, images, y_test[:128]


def _accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    (logits,) = run_asset(path, {"x": images})
    return float((logits.argmax(1) == labels).mean())


def test_digits_palettized_to_4_bits_keeps_its_accuracy_on_the_runtime(digits, tmp_path):
    path, images, labels = digits
    dense = _accuracy(path, images, labels)
    small = lc.palettize_weights(lc.load(path), n_bits=4, granularity="per_grouped_channel", group_size=16)
    saved = small.save(tmp_path / "digits_4bit.aimodel")
    assert sum(f.stat().st_size for f in saved.iterdir()) < 0.3 * sum(f.stat().st_size for f in path.iterdir())
    skipped = [r.skipped for r in small.report.rows]
    assert skipped == ["144 elements <= weight_num_threshold 1024", None, None, None, None]  # the first conv
    assert dense >= 0.95 and _accuracy(saved, images, labels) >= dense - 0.02
    # the runtime's output of the compressed program equals that of the same program holding the decoded weights
    decoded = lc.decompress_weights(lc.load(saved)).save(tmp_path / "decoded.aimodel")
    assert [w.compression for w in lc.load(decoded).weights()] == [None] * 5
    (a,), (b,) = run_asset(saved, {"x": images}), run_asset(decoded, {"x": images})
    np.testing.assert_array_equal(a, b)


def test_the_reference_documentation_example_runs_with_only_the_import_changed(digits, tmp_path, monkeypatch):
    path, images, labels = digits
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.aimodel").symlink_to(path)
    ai_program = AIModelAsset.load(Path("model.aimodel")).program
    compressed = quantize_weights(coreai_program=ai_program, dtype=DType.INT8, in_place=False)
    compressed.optimize()
    compressed.save_asset(Path("model_compressed.aimodel"))
    assert isinstance(compressed, AIProgram)
    assert _accuracy(tmp_path / "model_compressed.aimodel", images, labels) >= _accuracy(path, images, labels) - 0.01
    assert all(w.compression is None for w in lc.load(path).weights())  # in_place=False left the input alone


def test_a_second_pass_skips_what_is_compressed_and_says_why(digits):
    once = lc.quantize_weights(lc.load(digits[0]), dtype="int4", granularity="per_block", block_size=32)
    with pytest.warns(UserWarning, match="already compressed"):
        twice = lc.palettize_weights(once, n_bits=2)
    reasons = [r.skipped for r in twice.report.rows]
    assert reasons[0] == "144 elements <= weight_num_threshold 1024"
    assert reasons[1:] == ["already compressed (blockwise si4)"] * 4


def test_save_is_atomic_and_never_lands_inside_its_input(digits, tmp_path, monkeypatch):
    path = digits[0]
    out = tmp_path / "out.aimodel"
    lc.load(path).save(out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    program = lc.quantize_weights(lc.load(path), dtype="int8")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AIProgram, "save_asset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        program.save(out)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # the old asset is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.aimodel"]  # and no temporary folder is left
    with pytest.raises(ValueError, match=r"must end in \.aimodel"):
        program.save(tmp_path / "model.onnx")


def test_load_refuses_what_is_not_a_core_ai_asset(digits, tmp_path):
    truncated = tmp_path / "truncated.aimodel"
    shutil.copytree(digits[0], truncated)
    data = (truncated / "main.mlirb").read_bytes()
    (truncated / "main.mlirb").write_bytes(data[: len(data) // 2])
    with pytest.raises(lc.ModelLoadError, match=r"does not match main\.hash"):
        lc.load(truncated)
    with pytest.raises(lc.ModelLoadError, match="no such file"):
        lc.load(tmp_path / "missing.aimodel")
    (tmp_path / "empty.aimodel").mkdir()
    with pytest.raises(lc.ModelLoadError, match="not a Core AI asset"):
        lc.load(tmp_path / "empty.aimodel")
    broken = tmp_path / "broken.aimodel"
    broken.mkdir()
    (broken / "main.mlirb").write_bytes(b"not bytecode")
    with pytest.raises(lc.ModelLoadError, match="not MLIR bytecode"):
        lc.load(broken)
