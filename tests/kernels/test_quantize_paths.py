"""The compiled quantizer (large weights) and the numpy one (small weights) give the same bytes and errors."""

import ml_dtypes
import numpy as np
import pytest

from lowbit.kernels import quantize


@pytest.mark.parametrize(
    ("dtype", "block", "symmetric", "search"),
    [
        (np.int8, (1, 0), True, False),
        (ml_dtypes.int4, (1, 32), True, False),
        (ml_dtypes.uint4, (1, 32), False, True),
        (np.uint8, (0, 0), False, False),
        (ml_dtypes.int4, (32, 1), True, True),
    ],
)
@pytest.mark.parametrize("weight_dtype", [np.float16, np.float32])
def test_compiled_and_numpy_paths_agree(monkeypatch, dtype, block, symmetric, search, weight_dtype):
    x = (np.random.default_rng(0).standard_t(4, (96, 256)) * 0.05).astype(weight_dtype)
    results = []
    for compiled_from in (0, 1 << 62):
        monkeypatch.setattr(quantize, "COMPILED_FROM", compiled_from)
        results.append(quantize.quantize_linear(x, dtype, block, symmetric=symmetric, search=search))
    compiled, plain = results
    assert np.array_equal(compiled.q.astype(np.int16), plain.q.astype(np.int16))
    assert compiled.scale.tobytes() == plain.scale.tobytes()
    assert (compiled.zero_point is None) == (plain.zero_point is None)
    if compiled.zero_point is not None:
        assert np.array_equal(compiled.zero_point.astype(np.int16), plain.zero_point.astype(np.int16))
    assert compiled.squared_error == pytest.approx(plain.squared_error, rel=1e-12)
    assert compiled.energy == pytest.approx(plain.energy, rel=1e-12)
