"""InputMoments: the sums every data-aware algorithm reads, in bounded memory and without overflow."""

import numpy as np
import pytest

from lowbit.statistics import FLOAT32_SAFE, GRAM_CHUNK, InputMoments


def _batches(rng, scale=1.0):
    return [rng.standard_normal((3, GRAM_CHUNK // 2 + 7, 24)).astype(np.float32) * scale for _ in range(3)]


def test_moments_sum_every_batch_against_float64():
    rng = np.random.default_rng(0)
    batches = _batches(rng)
    moments = InputMoments.empty(24, full=True)
    for batch in batches:
        moments.add(batch, -1)
    x = np.concatenate([b.reshape(-1, 24) for b in batches]).astype(np.float64)
    want = x.T @ x
    assert moments.rows == len(x)
    assert moments.gram is not None and moments.gram.dtype == np.float32  # half the memory of float64
    np.testing.assert_allclose(moments.squares, (x * x).sum(0), rtol=1e-12)
    np.testing.assert_allclose(moments.gram, want, rtol=1e-5, atol=1e-5 * want.diagonal().max())


def test_channel_axis_and_diagonal_only():
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((5, 24, 7))
    moments = InputMoments.empty(24)
    moments.add(batch, 1)
    x = np.moveaxis(batch, 1, -1).reshape(-1, 24)
    assert moments.gram is None and moments.rows == 35
    np.testing.assert_allclose(moments.squares, (x * x).sum(0), rtol=1e-12)


@pytest.mark.parametrize("how", ["add", "merge"])
def test_huge_activations_widen_the_gram_to_float64(how):
    rng = np.random.default_rng(2)
    small, huge = _batches(rng)[0], _batches(rng, scale=FLOAT32_SAFE * 100)[0].astype(np.float64)
    moments = InputMoments.empty(24, full=True)
    moments.add(small, -1)
    if how == "add":
        moments.add(huge, -1)
    else:
        other = InputMoments.empty(24, full=True)
        other.add(huge, -1)
        assert other.gram is not None and other.gram.dtype == np.float64
        moments.merge(other)
    assert moments.gram is not None and moments.gram.dtype == np.float64
    assert np.isfinite(moments.gram).all()
    x = np.concatenate([small.reshape(-1, 24), huge.reshape(-1, 24)]).astype(np.float64)
    np.testing.assert_allclose(moments.gram, x.T @ x, rtol=1e-6)


def test_a_negative_input_axis_counts_from_the_end():
    rng = np.random.default_rng(5)
    moments = InputMoments.empty(24, full=True)
    moments.add(rng.standard_normal((40, 24)), -1)
    weight = rng.standard_normal((16, 24))
    np.testing.assert_array_equal(moments.importance(weight.shape, -1), moments.importance(weight.shape, 1))
    np.testing.assert_array_equal(moments.channels_first(weight, -1), moments.channels_first(weight, 1))
