"""One round trip over both backends (a cross-backend template, as NNCF's weight-compression tests do): the same
weights compressed through the ONNX door and the Core AI door with the same parameters decode to the same values,
and report the same errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("coreai.authoring", reason="needs lowbit[coreai] (coreai-core, Python >= 3.11)")
pytest.importorskip("coreai_torch", reason="needs coreai-torch (Python >= 3.11)")

from coreai_support import make_probe, onnx_probe

import lowbit
import lowbit.coreai as lc
from lowbit.coreai.decode import evaluate

CASES = [
    ("palettize_weights", {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 16}),
    ("palettize_weights", {"n_bits": 4, "lut_dtype": "int8", "enable_per_channel_scale": True}),
    ("palettize_weights", {"bits_per_weight": 3.5, "granularity": "per_grouped_channel", "group_size": 16}),
    (
        "palettize_weights",
        {"n_bits": 2, "granularity": "per_grouped_channel", "group_size": 8, "outlier_fraction": 0.02},
    ),
    ("quantize_weights", {"dtype": "int4", "granularity": "per_block", "block_size": 24}),
    ("quantize_weights", {"dtype": "fp4_e2m1fn", "granularity": "per_block", "block_size": 32}),
    ("sparsify_weights", {"target_sparsity": 0.5, "quantize_dtype": "int8"}),
    ("sparsify_weights", {"target_sparsity": 0.0, "n_m_ratio": (2, 4), "palettize_nbits": 4}),
]

MODULE_OF = {
    "broadcasting_batch_matmul": "linear",
    "gather_nd": "embedding",
    "conv2d": "conv",
    "conv_transpose2d": "deconv",
}


@pytest.mark.parametrize(("function", "params"), CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_the_same_weights_decode_the_same_through_onnx_and_core_ai(function, params):
    program, _, dense = make_probe("fp32")
    core = getattr(lc, function)(program, weight_num_threshold=512, **params)
    onnx_out = getattr(lowbit, function)(onnx_probe(dense), weight_num_threshold=512, **params)
    onnx_dense = lowbit.decompress_weights(onnx_out).graph.initializers
    core_weights = {MODULE_OF[w.op]: w for w in core.weights()}
    for module, transposed in (("linear", True), ("embedding", False), ("conv", False), ("deconv", False)):
        ours = onnx_dense[module].const_value.numpy()
        theirs = evaluate(core_weights[module].value)
        np.testing.assert_array_equal(ours.T if transposed else ours, theirs)
    errors = {r.name: r.rel_mse for r in onnx_out.report.rows}
    core_errors = {MODULE_OF[r.op]: r.rel_mse for r in core.report.rows}
    for module in ("linear", "embedding", "conv", "deconv"):
        assert errors[module] == pytest.approx(core_errors[module], rel=1e-12)
