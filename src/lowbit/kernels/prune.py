"""Magnitude pruning masks (unstructured, blocks, n:m) and the sparse form of a weight, alone or jointly
palettized / quantized. A mask is True where a value is kept."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lowbit.errors import SkipWeight
from lowbit.kernels import check_finite
from lowbit.kernels.gather import squared_error_and_energy
from lowbit.kernels.palettize import Palettized, palettize
from lowbit.kernels.quantize import LinearQuantized, quantize_linear

__all__ = ["Sparsified", "block_mask", "magnitude_mask", "n_m_mask", "sparsify"]


def _smallest(scores: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` smallest ``scores`` (flat); ties go to the lower index."""
    flat = scores.reshape(-1)
    chosen = np.zeros(flat.size, bool)
    if count <= 0:
        return chosen.reshape(scores.shape)
    if count >= flat.size:
        return np.ones(scores.shape, bool)
    threshold = np.partition(flat, count - 1)[count - 1]
    below = flat < threshold
    chosen |= below
    ties = np.flatnonzero(flat == threshold)[: count - int(below.sum())]
    chosen[ties] = True
    return chosen.reshape(scores.shape)


def magnitude_mask(w: np.ndarray, target: float) -> np.ndarray:
    """Keep all but the ``round(target * numel)`` smallest |w| (zeros count first; a weight with at least that many
    zeros keeps every value)."""
    magnitude = np.abs(w.astype(np.float32))
    count = round(target * w.size)
    if int((magnitude == 0).sum()) >= count:
        return magnitude != 0
    return ~_smallest(magnitude, count)


def block_mask(w: np.ndarray, target: float, block: int) -> np.ndarray:
    """``w`` is ``[C, R]`` (output channels first): prune whole blocks of ``block`` consecutive channels by L2 norm,
    ``round(target * blocks)`` of them."""
    channels, rest = w.shape
    if channels % block:
        raise SkipWeight(f"{channels} output channels do not divide by block_size {block}")
    norms = np.sqrt(np.square(w.astype(np.float64)).reshape(channels // block, block, rest).sum(axis=1))
    count = round(target * norms.size)
    pruned = norms == 0 if int((norms == 0).sum()) >= count else _smallest(norms, count)
    return np.repeat(~pruned, block, axis=0)


def n_m_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """``w`` is ``[R, K]`` (input channels last): in every ``m`` consecutive values keep the ``m - n`` largest |w|
    (ties: the lower index is pruned first)."""
    rows, k = w.shape
    if k % m:
        raise SkipWeight(f"{k} input channels do not divide by m={m} of the n:m ratio")
    groups = np.abs(w.astype(np.float32)).reshape(-1, m)
    order = np.argsort(groups, axis=1, kind="stable")
    keep = np.ones(groups.shape, bool)
    np.put_along_axis(keep, order[:, :n], False, axis=1)
    return keep.reshape(rows, k)


@dataclass(frozen=True)
class Sparsified:
    """A pruned weight: ``mask`` (original layout, True = stored) and the stored values in row-major order, either
    as they are (``values``), palettized (``palettized``: a ``[1, nnz]`` LUT weight) or quantized (``quantized``:
    the whole pruned weight, per channel; its zeros stay exact zeros)."""

    mask: np.ndarray
    values: np.ndarray | None
    palettized: Palettized | None
    quantized: LinearQuantized | None
    squared_error: float
    energy: float

    def decode(self) -> np.ndarray:
        if self.quantized is not None:
            return np.where(self.mask, self.quantized.decode(), 0).astype(self.quantized.out_dtype)
        stored = self.values if self.palettized is None else self.palettized.decode().reshape(-1)
        assert stored is not None
        dense = np.zeros(self.mask.shape, stored.dtype)
        dense[self.mask] = stored
        return dense


def sparsify(
    w: np.ndarray,
    mask: np.ndarray,
    palettize_nbits: int | None = None,
    quantize_dtype: Any = None,
    channel_axis: int = 0,
) -> Sparsified:
    """The sparse form of ``w`` under ``mask``; non-zeros optionally palettized (per-tensor k-means over the
    non-zeros only) or quantized (symmetric, one scale per ``channel_axis`` entry, from the kept values)."""
    check_finite(w)
    mask = mask & (w != 0)  # zeros inside kept blocks are not stored either: they stay exact, pull no centroid
    values = w[mask]
    palettized = quantized = None
    if palettize_nbits is not None and values.size:
        palettized = palettize(values.reshape(1, -1), palettize_nbits)
    if quantize_dtype is not None:
        block = tuple(1 if a == channel_axis else 0 for a in range(w.ndim))
        quantized = quantize_linear(np.where(mask, w, 0).astype(w.dtype), quantize_dtype, block)
    result = Sparsified(mask, None if palettized or quantized else values, palettized, quantized, 0.0, 0.0)
    squared_error, energy = squared_error_and_energy(result.decode(), w)
    return replace(result, squared_error=squared_error, energy=energy)
