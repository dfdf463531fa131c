"""The compiled pruning kernels (radix-select mask, one-pass kept values) and the numpy ones give the same masks,
values and errors."""

import ml_dtypes
import numpy as np
import pytest

from lowbit.errors import SkipWeight
from lowbit.kernels import prune


def _weight(dtype, shape=(64, 96), seed=0) -> np.ndarray:
    """Values with many exact ties (rounded), exact zeros of both signs and a spread of magnitudes."""
    rng = np.random.default_rng(seed)
    w = np.round(rng.standard_normal(shape) * 8) / 64
    w[rng.random(shape) < 0.05] = 0.0
    w[rng.random(shape) < 0.02] = -0.0
    return w.astype(dtype)


def _both(monkeypatch, fn, *args):
    results = []
    for compiled in (True, False):
        monkeypatch.setattr(prune, "worth_compiling", lambda size, kernel, compiled=compiled: compiled)
        results.append(fn(*args))
    return results


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("target", [0.0, 0.03, 0.3, 0.5, 0.75, 0.999, 1.0])
def test_magnitude_masks_agree(monkeypatch, dtype, target):
    w = _weight(dtype)
    compiled, plain = _both(monkeypatch, prune.magnitude_mask, w, target)
    np.testing.assert_array_equal(compiled, plain)
    if 0 < target < 1 and (w == 0).sum() < round(target * w.size):
        assert (~compiled).sum() == round(target * w.size)
        assert np.abs(w[~compiled].astype(np.float32)).max() <= np.abs(w[compiled].astype(np.float32)).min()


def test_magnitude_mask_of_a_32_bit_weight_splits_its_key_in_two_passes(monkeypatch):
    """Magnitudes that share their high 16 bits and differ below them (the second counting pass decides)."""
    w = (1.0 + np.arange(4000, dtype=np.float32) * np.float32(2**-23))[::-1].copy().reshape(40, 100)
    compiled, plain = _both(monkeypatch, prune.magnitude_mask, w, 0.37)
    np.testing.assert_array_equal(compiled, plain)
    assert (~compiled).sum() == 1480


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_kept_values_agree(monkeypatch, dtype):
    w = _weight(dtype, seed=1)
    keep = np.random.default_rng(2).random(w.shape) < 0.6
    compiled, plain = _both(monkeypatch, prune._kept, w, keep)
    np.testing.assert_array_equal(compiled[0], plain[0])
    assert compiled[1].dtype == w.dtype and compiled[1].tobytes() == plain[1].tobytes()
    assert compiled[2] == pytest.approx(plain[2], rel=1e-12)
    assert compiled[3] == pytest.approx(plain[3], rel=1e-12)
    assert not (compiled[0] & (w == 0)).any()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_kept_values_refuse_non_finite_weights(monkeypatch, bad):
    w = _weight(np.float16)
    w[3, 4] = bad
    for compiled in (True, False):
        monkeypatch.setattr(prune, "worth_compiling", lambda size, kernel, compiled=compiled: compiled)
        with pytest.raises(SkipWeight, match="NaN or Inf"):
            prune._kept(w, np.ones(w.shape, bool))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8), (5, 16), (1, 2), (3, 3)])
def test_n_m_masks_agree(monkeypatch, dtype, n, m):
    """The compiled ranks against a stable argsort, on a weight with many exact ties and signed zeros."""
    w = _weight(dtype, shape=(64, 96))
    compiled, plain = _both(monkeypatch, prune.n_m_mask, w, n, m)
    np.testing.assert_array_equal(compiled, plain)
    assert (compiled.reshape(-1, m).sum(axis=1) == m - n).all()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, ml_dtypes.int4, np.float16, np.float32])
def test_kept_elements_agree_with_boolean_indexing(monkeypatch, dtype):
    x = np.random.default_rng(3).integers(-7, 7, (64, 96)).astype(dtype)
    keep = np.random.default_rng(4).random(x.shape) < 0.4
    compiled, plain = _both(monkeypatch, prune.kept_elements, x, keep)
    assert compiled.dtype == x.dtype and compiled.tobytes() == plain.tobytes() == x[keep].tobytes()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_zeroed_is_where_bit_for_bit(dtype):
    w = _weight(dtype, seed=5)
    keep = np.random.default_rng(6).random(w.shape) < 0.5
    zeroed = prune._zeroed(w, keep)
    assert zeroed.dtype == w.dtype and zeroed.tobytes() == np.where(keep, w, 0).astype(w.dtype).tobytes()


def test_kept_elements_refuse_a_mask_of_another_shape(monkeypatch):
    x = np.arange(16, dtype=np.int8).reshape(4, 4)
    for compiled in (True, False):
        monkeypatch.setattr(prune, "worth_compiling", lambda size, kernel, compiled=compiled: compiled)
        with pytest.raises(ValueError, match=r"keep has shape \(2, 4\), expected the values' \(4, 4\)"):
            prune.kept_elements(x, np.ones((2, 4), bool))


def test_n_m_groups_past_the_compiled_size_are_sorted(monkeypatch):
    """Large groups take the argsort (the comparisons grow as m^2); the mask is the same rule."""
    calls = []
    monkeypatch.setattr(prune, "worth_compiling", lambda size, kernel: calls.append(kernel) or True)
    m = 2 * prune.N_M_COMPILED_UP_TO
    w = _weight(np.float32, shape=(4, 2 * m))
    keep = prune.n_m_mask(w, m // 2, m)
    assert not calls and (keep.reshape(-1, m).sum(axis=1) == m // 2).all()
    prune.n_m_mask(w, 2, 4)
    assert calls == [prune._n_m_keep]


def test_row_mask_prunes_each_row_alike_smallest_first():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 10))
    w[0] = [5, -1, 1, 2, 0, 0, 3, -3, 4, 1]  # ties: the lower index goes first
    keep = prune.row_mask(w, 0.4)
    assert (keep.sum(1) == 6).all()
    for i in range(6):
        assert np.abs(w[i, ~keep[i]]).max() <= np.abs(w[i, keep[i]]).min()
    np.testing.assert_array_equal(keep[0], [1, 0, 0, 1, 0, 0, 1, 1, 1, 1])
    w[1] = 1.0  # a row of ties: the first four go
    np.testing.assert_array_equal(prune.row_mask(w, 0.4)[1], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    assert prune.row_mask(w, 0.0).all() and not prune.row_mask(w, 1.0).any()
    np.testing.assert_array_equal(prune.row_mask(w.astype(np.float16), 0.4), prune.row_mask(w.astype(np.float32), 0.4))
