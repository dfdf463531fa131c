"""The compiled quantizer (large weights) and the numpy one (small weights) give the same bytes and errors."""

from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

from lowbit.kernels import elements, quantize


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
    for compiled in (True, False):
        monkeypatch.setattr(quantize, "_compiled_for", lambda size, compiled=compiled: compiled)
        results.append(quantize.quantize_linear(x, dtype, block, symmetric=symmetric, search=search))
    compiled, plain = results
    assert np.array_equal(compiled.q.astype(np.int16), plain.q.astype(np.int16))
    assert compiled.scale.tobytes() == plain.scale.tobytes()
    assert (compiled.zero_point is None) == (plain.zero_point is None)
    if compiled.zero_point is not None:
        assert np.array_equal(compiled.zero_point.astype(np.int16), plain.zero_point.astype(np.int16))
    assert compiled.squared_error == pytest.approx(plain.squared_error, rel=1e-12)
    assert compiled.energy == pytest.approx(plain.energy, rel=1e-12)


def _tricky_weight(weight_dtype) -> np.ndarray:
    """Heavy-tailed values plus what rounding gets wrong: exact half-way points of fp4 / fp8 codes (under the block
    maximum that fixes a power-of-two scale), negative zeros, values that round to zero, all-zero blocks."""
    rng = np.random.default_rng(1)
    x = rng.standard_t(3, (64, 256)) * 0.05
    x[:, ::32] = 6.0  # every block of 32 has a maximum of 6: its MX scale is 1, so the codes below are exact ties
    x[::2, 1:17] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25, -0.0, -1e-9, 1e-9, 0.0, 3.0, -2.5, 0.125]
    x[3, 64:128] = 0.0
    return x.astype(weight_dtype)


@pytest.mark.parametrize(
    ("dtype", "e8m0", "block"),
    [
        (ml_dtypes.float4_e2m1fn, True, (1, 32)),
        (ml_dtypes.float8_e4m3fn, True, (1, 32)),
        (ml_dtypes.float8_e4m3fn, False, (1, 0)),
        (ml_dtypes.float8_e5m2, False, (32, 1)),
        (ml_dtypes.float8_e5m2, True, (1, 32)),
    ],
)
@pytest.mark.parametrize("weight_dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_compiled_and_numpy_paths_agree_on_small_floats(monkeypatch, dtype, e8m0, block, weight_dtype):
    x = _tricky_weight(weight_dtype)
    results = []
    for compiled in (True, False):
        monkeypatch.setattr(quantize, "_compiled_for", lambda size, compiled=compiled: compiled)
        results.append(quantize.quantize_linear(x, dtype, block, e8m0=e8m0))
    compiled, plain = results
    assert compiled.q.tobytes() == plain.q.tobytes()
    assert compiled.scale.tobytes() == plain.scale.tobytes()
    assert compiled.squared_error == pytest.approx(plain.squared_error, rel=1e-12)
    assert compiled.energy == pytest.approx(plain.energy, rel=1e-12)
    np.testing.assert_array_equal(compiled.decode(), plain.decode())


def test_small_weights_use_the_compiled_kernel_once_it_is_loaded():
    unloaded, loaded = SimpleNamespace(signatures=[]), SimpleNamespace(signatures=["float32[:, :]"])
    assert not elements.worth_compiling(1000, unloaded)  # a small weight in a process with no kernel loaded: numpy
    assert elements.worth_compiling(elements.COMPILED_FROM, unloaded)
    assert elements.worth_compiling(1000, loaded)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"])
def test_a_nan_weight_is_refused_without_reading_past_the_code_table(bounds_checked, dtype):
    """The compiled small-float path coded NaN as an index far past the 16/256-entry value table (read before the
    weight's energy refused it): with numba's bounds checks on, NaN and Inf weights are refused cleanly."""
    bounds_checked(
        f"""
import ml_dtypes, numpy as np
from lowbit.errors import SkipWeight
from lowbit.kernels import quantize
quantize._compiled_for = lambda size: True
for bad in (np.nan, -np.nan, np.inf):
    x = np.full((4, 64), 0.5, np.float32)
    x[1, 7] = bad
    try:
        quantize.quantize_linear(x, ml_dtypes.{dtype}, (1, 32))
    except SkipWeight:
        continue
    raise SystemExit(f"{{bad}} was not refused")
"""
    )
