"""The tiled axis swap equals numpy's transposing copy, bit for bit, on every element size and ragged tiles."""

import ml_dtypes
import numpy as np
import pytest

from lowbit.kernels import layout


@pytest.mark.parametrize("dtype", [np.uint8, ml_dtypes.int4, np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [(1, 1), (0, 5), (5, 0), (7, 1), (1, 9), (9, 7), (8, 13), (33, 70), (64, 32), (3, 1000), (261, 530), (512, 256)],
)
def test_swapped_equals_numpy(monkeypatch, dtype, shape):
    monkeypatch.setattr(layout, "worth_compiling", lambda size, kernel: True)
    rng = np.random.default_rng(0)
    x = rng.integers(-8, 8, shape).astype(dtype) if dtype == ml_dtypes.int4 else rng.standard_normal(shape)
    x = np.asarray(x).astype(dtype)
    got = layout.swapped(x[::1])
    assert got.dtype == x.dtype and got.shape == shape[::-1] and got.flags.c_contiguous
    assert got.tobytes() == np.ascontiguousarray(x.T).tobytes()
    assert layout.swapped(np.asfortranarray(x)).tobytes() == got.tobytes()
