"""Recurrent weights (LSTM W and R: output channels on axis 1) through every pass, ONNX Runtime == decompressed."""

import numpy as np
import onnx_ir as ir
import pytest
from conftest import check_model, ort_session, ort_weights

import lowbit

HIDDEN, INPUT = 32, 48


def _lstm_program() -> lowbit.Program:
    rng = np.random.default_rng(0)
    w = ir.Value(
        name="W", const_value=ir.tensor((rng.standard_normal((1, 4 * HIDDEN, INPUT)) * 0.1).astype(np.float32))
    )
    r = ir.Value(
        name="R", const_value=ir.tensor((rng.standard_normal((1, 4 * HIDDEN, HIDDEN)) * 0.1).astype(np.float32))
    )
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([5, 2, INPUT]))
    node = ir.node("LSTM", [x, w, r], {"hidden_size": HIDDEN}, num_outputs=3, name="lstm")
    y = node.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape([5, 1, 2, HIDDEN])
    for extra, name in zip(node.outputs[1:], ("y_h", "y_c"), strict=True):
        extra.name = name
    graph = ir.Graph([x], [y], nodes=[node], initializers=[w, r], opset_imports={"": 17}, name="lstm")
    return lowbit.Program(ir.Model(graph, ir_version=8))


@pytest.mark.parametrize(
    ("compress", "kwargs"),
    [
        (lowbit.palettize_weights, dict(n_bits=4, granularity="per_grouped_channel", group_size=16)),
        (lowbit.palettize_weights, dict(n_bits=6, cluster_dim=2, num_kmeans_workers=1)),
        (lowbit.quantize_weights, dict(dtype="int8")),
        (lowbit.quantize_weights, dict(dtype="int4", granularity="per_block", block_size=16)),
        (lowbit.sparsify_weights, dict(target_sparsity=0.5, n_m_ratio=(2, 4))),
    ],
)
def test_lstm_weights(compress, kwargs):
    program = _lstm_program()
    assert {(w.name, w.output_axis, w.input_axis) for w in program.weights()} == {("W", 1, 2), ("R", 1, 2)}
    out = compress(program, **kwargs)
    assert {r.name for r in out.report.compressed} == {"W", "R"}
    check_model(out.model)
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 2, INPUT)).astype(np.float32)}
    got = ort_weights(out, feeds)
    decoded = lowbit.decompress_weights(out)
    for w in decoded.weights():  # ONNX Runtime decodes each weight bit for bit as decompress_weights does
        assert got[w.name].tobytes() == w.value.const_value.numpy().tobytes()
    want = ort_session(decoded.model).run(None, feeds)[0]
    np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-6)  # GEMM paths differ for computed weights
    dense = ort_session(program.model).run(None, feeds)[0]
    # compressed, not broken: 2:4 sparsity costs most here, 0.37 relative
    assert np.linalg.norm(got["y"] - dense) / np.linalg.norm(dense) < 0.5
