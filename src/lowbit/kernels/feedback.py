"""Error feedback across input channels (GPTQ's): codes chosen one input channel at a time, each channel's rounding
error pushed onto the channels not yet coded, in proportion to how the calibration activations correlate them, so
that the layer's output error ``||X W - X W_q||`` is what is kept small rather than each weight's own error.

Arrays in, arrays out: the grid (a LUT per output channel, or a linear quantizer's) is given as a function.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "feedback_codes",
    "inverse_factor",
    "keeping_exact",
    "nearest_in_luts",
    "nearest_on_linear_grid",
    "ordered_feedback",
    "ordered_feedback_codes",
    "ordered_feedback_values",
]

Nearest = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (values of input channel k, k) -> codes, values


def inverse_factor(gram: np.ndarray, damping: float = 0.01) -> np.ndarray:
    """The upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1``, ``H = X^T X`` (channels never active
    get a unit diagonal): the row-by-row form of the inverse the feedback needs."""
    h = np.array(gram, dtype=np.float64, copy=True)
    diagonal = np.diag(h).copy()
    dead = diagonal <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damping * max(float(np.mean(np.diag(h))), 1e-12)
    inverse = np.linalg.inv(h)
    return np.linalg.cholesky((inverse + inverse.T) / 2).T


def feedback_codes(
    w: np.ndarray, factor: np.ndarray, nearest: Nearest, block: int = 128, channels: np.ndarray | None = None
) -> np.ndarray:
    """Codes of ``w`` ``[K, N]`` (rows: the K input channels, coded in order), each row's rounding error fed to the
    rows after it through ``factor`` (:func:`inverse_factor`); ``nearest(values[N], k) -> (codes[N], decoded[N])``
    is the grid of input channel ``k`` (``channels[row]``: a row's channel when ``w``'s rows are reordered). Updates
    run lazily in blocks of ``block`` rows (GPTQ's)."""
    return _feedback(w, factor, nearest, block, channels)[0]


def _feedback(w, factor, nearest: Nearest, block: int, channels) -> tuple[np.ndarray, np.ndarray]:
    """(codes, decoded values) of :func:`feedback_codes`."""
    work = np.array(w, dtype=np.float64, copy=True)
    rows = work.shape[0]
    channel_of = np.arange(rows) if channels is None else channels
    codes = np.empty(work.shape, np.int64)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        errors = np.empty((stop - start, work.shape[1]), np.float64)
        for i, k in enumerate(range(start, stop)):
            codes[k], decoded = nearest(work[k], int(channel_of[k]))
            errors[i] = (work[k] - decoded) / factor[k, k]
            work[k + 1 : stop] -= np.outer(factor[k, k + 1 : stop], errors[i])
            work[k] = decoded
        work[stop:] -= factor[start:stop, stop:].T @ errors
    return codes, work


def nearest_in_luts(luts: np.ndarray) -> Nearest:
    """The grid of scalar LUTs, one per output channel: ``luts`` ``[N, L]`` (sorted or not)."""
    luts = np.asarray(luts, dtype=np.float64)
    columns = np.arange(luts.shape[0])

    def nearest(values: np.ndarray, channel: int) -> tuple[np.ndarray, np.ndarray]:
        codes = np.abs(values[:, None] - luts).argmin(axis=1)
        return codes, luts[columns, codes]

    return nearest


def nearest_on_linear_grid(scale: np.ndarray, zero_point: np.ndarray, low: int, high: int) -> Nearest:
    """The grid of a linear quantizer: ``scale`` / ``zero_point`` ``[K, N]`` per element (each block's repeated),
    codes rounded half to even and clipped to ``[low, high]`` (an all-zero block, scale 0, codes its zero point)."""
    scale = np.asarray(scale, dtype=np.float64)
    zero_point = np.asarray(zero_point, dtype=np.float64)

    def nearest(values: np.ndarray, channel: int) -> tuple[np.ndarray, np.ndarray]:
        s, z = scale[channel], zero_point[channel]
        with np.errstate(divide="ignore", invalid="ignore"):
            steps = np.where(s != 0, np.rint(values / s), 0.0)
        codes = np.clip(steps + z, low, high)
        return codes.astype(np.int64), (codes - z) * s

    return nearest


def ordered_feedback_codes(w: np.ndarray, gram: np.ndarray, nearest: Nearest, damping: float = 0.01) -> np.ndarray:
    """:func:`feedback_codes` with the input channels coded in decreasing order of their activations' energy
    (``diag(X^T X)``, GPTQ's act-order: the channels that matter most are coded while the most rows can still absorb
    their error); codes returned in ``w``'s own order."""
    return _ordered(w, gram, nearest, damping)[0]


def keeping_exact(nearest: Nearest, exact: np.ndarray) -> Nearest:
    """``nearest`` except where ``exact`` ``[K, N]`` is set: those values stay as they are (outliers kept exact),
    so they push no error onto the rows after them."""

    def near(values: np.ndarray, channel: int) -> tuple[np.ndarray, np.ndarray]:
        codes, decoded = nearest(values, channel)
        return codes, np.where(exact[channel], values, decoded)

    return near


def ordered_feedback(
    w: np.ndarray, gram: np.ndarray, nearest: Nearest, damping: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """(codes, the values the feedback ends with) of :func:`ordered_feedback_codes`."""
    return _ordered(w, gram, nearest, damping)


def ordered_feedback_values(w: np.ndarray, gram: np.ndarray, project: Nearest, damping: float = 0.01) -> np.ndarray:
    """The values :func:`ordered_feedback_codes` ends with, for a grid given as a projection (e.g. pruning:
    ``project(values, k)`` zeroes channel ``k``'s pruned weights, SparseGPT's update of the kept ones)."""
    return _ordered(w, gram, project, damping)[1]


def _ordered(w: np.ndarray, gram: np.ndarray, nearest: Nearest, damping: float) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-np.diag(gram), kind="stable")
    factor = inverse_factor(gram[np.ix_(order, order)], damping)
    codes, values = _feedback(w[order], factor, nearest, 128, order)
    back = np.argsort(order)
    return codes[back], values[back]
