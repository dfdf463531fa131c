"""Error feedback across input channels (GPTQ's) against float64 references: the factor is the inverse's
Cholesky factor, the compiled kernel is the textbook recurrence written out in numpy (every grid: LUTs, a linear
grid, outliers kept exact, pruning), its lazy blocks change only
the rounding, feedback lowers the output error of every test layer below plain rounding to the same grid, and with
uncorrelated channels it is plain rounding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lowbit.kernels.feedback import (
    Grid,
    feedback,
    inverse_factor,
    linear_grid,
    lut_grid,
    ordered_feedback,
)


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
    grid = lut_grid(luts)
    plain = np.stack([grid.nearest(row, k)[0] for k, row in enumerate(w)])
    gram = x.T @ x
    fed = feedback(w, inverse_factor(gram), grid)[0]
    ordered = ordered_feedback(w, gram, grid)[0]
    base = _output_error(x, w, plain, luts)
    assert _output_error(x, w, fed, luts) < 0.9 * base
    assert _output_error(x, w, ordered, luts) < 0.9 * base


def test_uncorrelated_channels_give_plain_rounding_and_dead_channels_are_safe():
    _, w, luts = _layer(1)
    grid = lut_grid(luts)
    plain = np.stack([grid.nearest(row, k)[0] for k, row in enumerate(w)])
    gram = np.diag(np.linspace(1.0, 5.0, w.shape[0]))
    np.testing.assert_array_equal(feedback(w, inverse_factor(gram), grid)[0], plain)
    gram[3, 3] = 0.0  # a channel the calibration data never activated
    assert np.isfinite(inverse_factor(gram)).all()
    np.testing.assert_array_equal(ordered_feedback(w, gram, grid)[0], plain)


@pytest.mark.parametrize("entries", [1, 2, 16, 256])
def test_the_nearest_lut_entry_is_the_first_of_the_closest_on_ties_and_repeats(entries):
    """The search over sorted LUTs writes what a scan of the unsorted LUT does: the nearest entry's code, the
    smallest code when entries repeat or two lie at the same distance (values on quarter steps: exact midpoints)."""
    rng = np.random.default_rng(entries)
    n = 64
    luts = rng.integers(-8, 8, (n, entries)) / 4.0  # repeats within a LUT
    values = rng.integers(-40, 40, n) / 8.0  # midpoints between entries, beyond both ends
    grid = lut_grid(luts)
    codes, decoded = grid.nearest(values, 0)
    expected = np.abs(values[:, None] - luts).argmin(axis=1)  # the first minimum
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(decoded, luts[np.arange(n), expected])


def test_the_bucket_index_finds_the_nearest_entry_of_any_lut():
    """Where the index's buckets sit (crowded LUTs, one entry, all entries equal, entries a denormal apart, values
    far outside the LUT or landing on bucket edges) changes where the search starts, never what it finds."""
    rng = np.random.default_rng(0)
    n, entries = 6, 64
    luts = np.sort(rng.standard_normal((n, entries)) ** 3, axis=1)  # crowded near 0, sparse in the tails
    luts[1] = 0.5  # all equal
    luts[2] = np.arange(entries) * 2 * 5e-324  # denormal steps: the steps per unit overflow to inf
    luts[3, :-1] = -1.0  # one outlying entry
    luts[4] = np.linspace(-1, 1, entries)  # values on bucket edges below
    edges = -0.3 + np.arange(2 * entries) * (1.0 / (2 * entries))  # the index's bucket edges for entries -0.3 .. 0.7
    below = np.nextafter(edges[2 : 2 * entries - 2 : 4], -1.0)  # pairs of adjacent floats just below edges
    luts[5] = np.sort(np.concatenate([[-0.3, 0.7], below, np.nextafter(below, -1.0)]))[:entries]
    values = np.concatenate([rng.standard_normal((200, n)) * 3, np.linspace(-1, 1, 129)[:, None].repeat(n, 1)])
    values[:, 2] = rng.integers(-4, 2 * entries + 4, values.shape[0]) * 5e-324
    # the LUT's own entries, e.g. just below an edge: a value's step may round up into the next bucket (other values
    # would be as near to both floats of a pair in the scan's rounded distances)
    values[:, 5] = luts[5, rng.integers(0, entries, values.shape[0])]
    grid = lut_grid(luts)
    for value in values:
        codes, decoded = grid.nearest(value, 0)
        expected = np.abs(value[:, None] - luts).argmin(axis=1)
        np.testing.assert_array_equal(codes, expected)
        np.testing.assert_array_equal(decoded, luts[np.arange(n), expected])


def _grids(seed: int, k: int, n: int) -> dict[str, tuple[Grid, object]]:
    """Each grid with its rounding written out in numpy: ``(values, channel) -> (codes, decoded)``."""
    rng = np.random.default_rng(seed)
    luts = rng.standard_normal((n, 8)) * 0.1  # unsorted
    exact = rng.random((k, n)) < 0.05
    scale = np.abs(rng.standard_normal((k, n))) * 0.03
    scale[0, :2] = 0.0  # an all-zero block
    zero = rng.integers(0, 16, (k, n)).astype(np.float64)
    keep = rng.random((k, n)) < 0.5

    def in_luts(values, channel, keep_exact=None):
        codes = np.abs(values[:, None] - luts).argmin(axis=1)
        decoded = luts[np.arange(n), codes]
        return codes, decoded if keep_exact is None else np.where(keep_exact[channel], values, decoded)

    def on_linear_grid(values, channel):
        s, z = scale[channel], zero[channel]
        steps = np.where(s != 0, np.rint(values / np.where(s != 0, s, 1.0)), 0.0)
        codes = np.clip(steps + z, 0, 15)
        return codes.astype(np.int64), (codes - z) * s

    return {
        "luts": (lut_grid(luts), in_luts),
        "outliers": (lut_grid(luts, exact), lambda v, c: in_luts(v, c, exact)),
        "linear": (linear_grid(scale, zero, 0, 15), on_linear_grid),
        "pruning": (lut_grid(np.zeros((n, 1)), keep), lambda v, c: (np.zeros(n, np.int64), np.where(keep[c], v, 0.0))),
    }


def _recurrence(w, factor, nearest, channels):
    """The textbook recurrence: row k rounded, its error over the pivot pushed onto every later row at once."""
    work, codes = w.astype(np.float64).copy(), np.empty(w.shape, np.int64)
    for k in range(len(work)):
        codes[k], decoded = nearest(work[k], channels[k])
        error = (work[k] - decoded) / factor[k, k]
        work[k + 1 :] -= np.outer(factor[k, k + 1 :], error)
        work[k] = decoded
    return codes, work


@pytest.mark.parametrize("kind", ["luts", "outliers", "linear", "pruning"])
def test_the_compiled_kernel_is_the_recurrence_on_every_grid(kind):
    x, w, _ = _layer(3, k=40, n=12)
    grid, nearest = _grids(4, 40, 12)[kind]
    order = np.random.default_rng(5).permutation(40)  # rows in another order than the channels
    factor = inverse_factor((x.T @ x)[np.ix_(order, order)])
    want_codes, want_values = _recurrence(w[order], factor, nearest, order)
    codes, values = feedback(w[order], factor, grid, block=64, channels=order)  # one block: no lazy updates
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_allclose(values, want_values, rtol=0, atol=1e-12)
    lazy_codes, lazy_values = feedback(w[order], factor, grid, block=7, channels=order)
    assert np.mean(lazy_codes == want_codes) > 0.99  # the lazy blocks reorder sums: rounding-level changes only
    np.testing.assert_allclose(lazy_values[lazy_codes == want_codes], want_values[lazy_codes == want_codes], atol=1e-9)


@pytest.mark.parametrize("kind", ["luts", "outliers", "linear", "pruning"])
def test_the_output_channels_run_in_spans_on_any_threads_with_the_same_result(kind, monkeypatch):
    """Spans of output channels (the last one short) on 1, 2 or 5 threads: the same codes and values as one span,
    the recurrence's to the bit."""
    import lowbit.kernels.feedback as module

    x, w, _ = _layer(6, k=40, n=23)
    grid, nearest = _grids(7, 40, 23)[kind]
    factor = inverse_factor(x.T @ x)
    whole_codes, whole_values = feedback(w, factor, grid)
    want_codes, _ = _recurrence(w, factor, nearest, np.arange(40))
    np.testing.assert_array_equal(whole_codes, want_codes)
    lazy_codes, lazy_values = feedback(w, factor, grid, block=8)  # the later rows' updates in BLAS products
    monkeypatch.setattr(module, "COLUMNS", 5)
    for threads in (1, 2, 5):
        codes, values = feedback(w, factor, grid, threads=threads)
        np.testing.assert_array_equal(codes, whole_codes)
        np.testing.assert_array_equal(values, whole_values)
        codes, values = feedback(w, factor, grid, block=8, threads=threads)
        np.testing.assert_array_equal(codes, lazy_codes)
        np.testing.assert_array_equal(values, lazy_values)


def test_a_gram_is_inverted_once_for_the_weights_that_share_it():
    """The factor of one ``X^T X`` is kept by content: an equal copy gets the same (read-only) arrays, what
    changes the factor (the values, the damping) does not."""
    from lowbit.kernels.feedback import ordered_factor

    x = np.random.default_rng(3).standard_normal((200, 24))
    gram = x.T @ x
    order, factor = ordered_factor(gram, 0.01)
    again = ordered_factor(gram.copy(), 0.01)
    assert again[0] is order and again[1] is factor and not factor.flags.writeable
    np.testing.assert_array_equal(order, np.argsort(-np.diag(gram), kind="stable"))
    np.testing.assert_allclose(factor, inverse_factor(gram[np.ix_(order, order)], 0.01))
    changed = gram.copy()
    changed[0, 0] += 1.0
    for other in (
        ordered_factor(changed, 0.01),
        ordered_factor(gram, 0.1),
    ):
        assert other[1] is not factor and not np.array_equal(other[1], factor)


def test_the_kept_factors_stay_within_their_bytes(monkeypatch):
    import lowbit.kernels.feedback as fb

    x = np.random.default_rng(4).standard_normal((100, 16))
    gram = x.T @ x
    monkeypatch.setattr(fb, "FACTORS_KEPT_BYTES", 16 * 16 * 8 - 1)  # less than one factor (and its order)
    first = fb.ordered_factor(gram, 0.01)[1]
    assert fb.ordered_factor(gram, 0.01)[1] is not first  # not kept: computed again, the same values
    np.testing.assert_array_equal(fb.ordered_factor(gram, 0.01)[1], first)
    monkeypatch.setattr(fb, "FACTORS_KEPT_BYTES", 2 * (16 * 16 * 8 + 16 * 8))  # two factors and their orders
    kept = [fb.ordered_factor(gram * scale, 0.01)[1] for scale in (1.0, 2.0, 3.0)]
    assert fb.ordered_factor(gram * 3.0, 0.01)[1] is kept[2]
    assert fb.ordered_factor(gram, 0.01)[1] is not kept[0]  # the oldest went


@pytest.mark.parametrize("kept_bytes", [1 << 20, 1])
def test_threads_asking_for_one_gram_at_once_share_one_computation(monkeypatch, kept_bytes):
    """Kept or too large to keep, a factor several threads ask for at once is computed once, all of them getting
    it; a failing computation runs once too, and every thread gets its error."""
    import threading
    import time

    from lowbit.kernels import feedback as fb

    monkeypatch.setattr(fb, "FACTORS_KEPT_BYTES", kept_bytes)
    gram = np.diag(np.arange(1.0, 9.0)) + kept_bytes  # its own content: no other test's entry
    calls: list[int] = []

    def compute(matrix: np.ndarray) -> tuple[np.ndarray, ...]:
        calls.append(1)
        time.sleep(0.2)
        if fail:
            raise np.linalg.LinAlgError("not positive definite")
        return (matrix * 2,)

    for fail in (False, True):
        calls.clear()
        results: list[object] = []
        kind = f"test {fail}"

        def ask(kind: str = kind, results: list[object] = results) -> None:
            try:
                results.append(fb.kept_by_gram(kind, gram, 0.0, compute)[0])
            except np.linalg.LinAlgError as error:
                results.append(error)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(calls) == 1 and len(results) == 4
        if fail:
            assert all(isinstance(r, np.linalg.LinAlgError) for r in results)
        else:
            assert all(np.array_equal(r, gram * 2) for r in results)


def test_a_lut_grid_is_built_with_its_codes():
    with pytest.raises(ValueError, match="build it with lut_grid"):
        Grid(luts=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="build it with lut_grid"):
        Grid(luts=np.zeros((4, 4)), lut_codes=np.zeros((4, 4), np.int64))
    grid = lut_grid(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="build it with lut_grid"):  # an index of no buckets
        dataclasses.replace(grid, buckets=grid.buckets[:, :0])
