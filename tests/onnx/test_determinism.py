"""Same input, same bytes out: every pass, twice, through save()."""

import numpy as np
import pytest
from conftest import make_model

import lowbit


@pytest.mark.parametrize(
    ("compress", "kwargs"),
    [
        (lowbit.palettize_weights, dict(n_bits=3, granularity="per_channel", num_kmeans_workers=1)),
        (lowbit.palettize_weights, dict(n_bits=2, cluster_dim=2, num_kmeans_workers=1)),
        (lowbit.quantize_weights, dict(dtype="int4", granularity="per_block", qscheme="asymmetric")),
        (lowbit.quantize_weights, dict(dtype="fp4_e2m1fn", granularity="per_block")),
        (lowbit.sparsify_weights, dict(target_sparsity=0.5, palettize_nbits=4)),
        (lowbit.sparsify_weights, dict(target_sparsity=0.0, n_m_ratio=(2, 4), quantize_dtype="int8")),
    ],
)
def test_same_bytes_twice(tmp_path, compress, kwargs):
    rng = np.random.default_rng(0)
    weights = {
        "a": rng.standard_normal((64, 96)).astype(np.float16),
        "b": rng.integers(-3, 3, (32, 64)).astype(np.float32),
    }
    program = lowbit.Program(make_model(weights, [("MatMul", "a", {}), ("Gemm", "b", {"transB": 1})]))
    first = compress(program, **kwargs).save(tmp_path / "1.onnx").read_bytes()
    second = compress(program, **kwargs).save(tmp_path / "2.onnx").read_bytes()
    assert first == second
