"""Error feedback across input channels (GPTQ's) against float64 references: the factor is the inverse's
Cholesky factor, feedback lowers the output error of every test layer below plain rounding to the same grid, and
with uncorrelated channels it is plain rounding."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.kernels.feedback import feedback_codes, inverse_factor, nearest_in_luts, ordered_feedback_codes


def _layer(seed: int, k: int = 48, n: int = 24, rows: int = 256):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((k, k)) * 0.3 + np.diag(rng.uniform(0.2, 3.0, k))  # correlated, uneven channels
    x = rng.standard_normal((rows, k)) @ mixing
    w = rng.standard_normal((k, n)) * 0.1
    luts = np.sort(rng.standard_normal((n, 8)) * 0.1, axis=1)  # a 3-bit LUT per output channel
    return x, w, luts


def _output_error(x, w, codes, luts) -> float:
    decoded = luts[np.arange(luts.shape[0])[None, :], codes]
    return float(np.linalg.norm(x @ (decoded - w)) ** 2 / np.linalg.norm(x @ w) ** 2)


def test_the_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    x, _, _ = _layer(0)
    gram = x.T @ x
    factor = inverse_factor(gram, damping=0.01)
    damped = gram + 0.01 * np.mean(np.diag(gram)) * np.eye(len(gram))
    np.testing.assert_allclose(factor.T @ factor, np.linalg.inv(damped), rtol=1e-8, atol=1e-12)
    assert np.allclose(factor, np.triu(factor))


@pytest.mark.parametrize("seed", range(6))
def test_feedback_lowers_the_output_error_below_plain_rounding(seed):
    x, w, luts = _layer(seed)
    nearest = nearest_in_luts(luts)
    plain = np.stack([nearest(row, k)[0] for k, row in enumerate(w)])
    gram = x.T @ x
    fed = feedback_codes(w, inverse_factor(gram), nearest)
    ordered = ordered_feedback_codes(w, gram, nearest)
    base = _output_error(x, w, plain, luts)
    assert _output_error(x, w, fed, luts) < 0.9 * base
    assert _output_error(x, w, ordered, luts) < 0.9 * base


def test_uncorrelated_channels_give_plain_rounding_and_dead_channels_are_safe():
    _, w, luts = _layer(1)
    nearest = nearest_in_luts(luts)
    plain = np.stack([nearest(row, k)[0] for k, row in enumerate(w)])
    gram = np.diag(np.linspace(1.0, 5.0, w.shape[0]))
    np.testing.assert_array_equal(feedback_codes(w, inverse_factor(gram), nearest), plain)
    gram[3, 3] = 0.0  # a channel the calibration data never activated
    assert np.isfinite(inverse_factor(gram)).all()
    np.testing.assert_array_equal(ordered_feedback_codes(w, gram, nearest), plain)
