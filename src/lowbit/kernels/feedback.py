"""Error feedback across input channels (GPTQ's): codes chosen one input channel at a time, each channel's rounding
error pushed onto the channels not yet coded, in proportion to how the calibration activations correlate them, so
that the layer's output error ``||X W - X W_q||`` is what is kept small rather than each weight's own error.

Arrays in, arrays out: the grid (a LUT per output channel, or a linear quantizer's) is given as a function.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["feedback_codes", "inverse_factor", "nearest_in_luts", "ordered_feedback_codes"]

Nearest = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


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


def feedback_codes(w: np.ndarray, factor: np.ndarray, nearest: Nearest, block: int = 128) -> np.ndarray:
    """Codes of ``w`` ``[K, N]`` (rows: the K input channels, coded in order), each row's rounding error fed to the
    rows after it through ``factor`` (:func:`inverse_factor`); ``nearest(values[N]) -> (codes[N], decoded[N])``
    is the grid. Updates run lazily in blocks of ``block`` rows (GPTQ's)."""
    work = np.array(w, dtype=np.float64, copy=True)
    rows = work.shape[0]
    codes = np.empty(work.shape, np.int64)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        errors = np.empty((stop - start, work.shape[1]), np.float64)
        for i, k in enumerate(range(start, stop)):
            codes[k], decoded = nearest(work[k])
            errors[i] = (work[k] - decoded) / factor[k, k]
            work[k + 1 : stop] -= np.outer(factor[k, k + 1 : stop], errors[i])
        work[stop:] -= factor[start:stop, stop:].T @ errors
    return codes


def nearest_in_luts(luts: np.ndarray) -> Nearest:
    """The grid of scalar LUTs, one per output channel: ``luts`` ``[N, L]`` (sorted or not)."""
    luts = np.asarray(luts, dtype=np.float64)
    columns = np.arange(luts.shape[0])

    def nearest(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = np.abs(values[:, None] - luts).argmin(axis=1)
        return codes, luts[columns, codes]

    return nearest


def ordered_feedback_codes(w: np.ndarray, gram: np.ndarray, nearest: Nearest, damping: float = 0.01) -> np.ndarray:
    """:func:`feedback_codes` with the input channels coded in decreasing order of their activations' energy
    (``diag(X^T X)``, GPTQ's act-order: the channels that matter most are coded while the most rows can still absorb
    their error); codes returned in ``w``'s own order."""
    order = np.argsort(-np.diag(gram), kind="stable")
    codes = feedback_codes(w[order], inverse_factor(gram[np.ix_(order, order)], damping), nearest)
    ordered = np.empty_like(codes)
    ordered[order] = codes
    return ordered
