"""Magnitude pruning masks (unstructured, blocks, n:m) and the sparse form of a weight, alone or jointly
palettized / quantized. A mask is True where a value is kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from lowbit.errors import SkipWeight
from lowbit.kernels import check_finite
from lowbit.kernels.elements import SAME_SIZE_UINT, as_readable, load, worth_compiling
from lowbit.kernels.palettize import Palettized, palettize
from lowbit.kernels.quantize import LinearQuantized, quantize_linear

__all__ = ["Sparsified", "block_mask", "kept_elements", "magnitude_mask", "n_m_mask", "row_mask", "sparsify"]

N_M_COMPILED_UP_TO = 64  # n:m groups up to this size are ranked by comparisons (:func:`_n_m_keep`), larger ones sorted


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


@numba.njit(cache=True, nogil=True)
def _magnitude_keep(keys: np.ndarray, magnitude_bits: int, count: int) -> np.ndarray:
    """:func:`magnitude_mask` on the bit patterns of 16- or 32-bit floats (``magnitude_bits`` 15 or 31: below
    the sign, the bits order finite magnitudes): a radix select, one counting pass per 16 bits of key, then one
    pass that writes the mask."""
    n = keys.shape[0]
    magnitude = (np.int64(1) << magnitude_bits) - 1
    shift = 16 if magnitude_bits > 16 else 0
    high = np.zeros(np.int64(1) << (magnitude_bits - shift), np.int64)
    for i in range(n):
        high[(np.int64(keys[i]) & magnitude) >> shift] += 1
    zeros = high[0] if shift == 0 else 0
    if shift:
        for i in range(n):
            zeros += (np.int64(keys[i]) & magnitude) == 0
    keep = np.empty(n, np.bool_)
    if zeros >= count:
        for i in range(n):
            keep[i] = (np.int64(keys[i]) & magnitude) != 0
        return keep
    below, bucket = 0, 0  # the bucket holding the count-th smallest key, and the keys below it
    while below + high[bucket] < count:
        below += high[bucket]
        bucket += 1
    threshold = bucket
    if shift:
        low = np.zeros(1 << shift, np.int64)
        for i in range(n):
            k = np.int64(keys[i]) & magnitude
            if k >> shift == bucket:
                low[k & ((1 << shift) - 1)] += 1
        rest = 0
        while below + low[rest] < count:
            below += low[rest]
            rest += 1
        threshold = (bucket << shift) | rest
    ties = count - below  # equal to the threshold: the lowest indices go first
    for i in range(n):
        k = np.int64(keys[i]) & magnitude
        keep[i] = k > threshold or (k == threshold and ties <= 0)
        if k == threshold:
            ties -= 1
    return keep


def magnitude_mask(w: np.ndarray, target: float) -> np.ndarray:
    """Keep all but the ``round(target * numel)`` smallest |w| (zeros count first; a weight with at least that many
    zeros keeps every value); ties at the threshold prune the lower indices first."""
    count = round(target * w.size)
    if w.dtype.itemsize in (2, 4) and 0 < count < w.size and worth_compiling(w.size, _magnitude_keep):
        keys = np.ascontiguousarray(w).reshape(-1).view(np.uint16 if w.dtype.itemsize == 2 else np.uint32)
        return _magnitude_keep(keys, 8 * w.dtype.itemsize - 1, count).reshape(w.shape)
    magnitude = np.abs(w.astype(np.float32))
    if int((magnitude == 0).sum()) >= count:
        return magnitude != 0
    return ~_smallest(magnitude, count)


def row_mask(w: np.ndarray, target: float) -> np.ndarray:
    """``w`` is ``[R, K]``: in each row keep all but the ``round(target * K)`` smallest |w| (ties: the lower index is
    pruned first), so every row is pruned alike. Each row's threshold by one partition of the whole array, then one
    compiled pass over each row (:func:`_kept_above`; a 1536 x 576 float32 array: 4.9 ms, against 8.4 ms for the
    ties counted by a cumulative sum over the array)."""
    size = np.abs(np.ascontiguousarray(w, dtype=np.promote_types(w.dtype, np.float32)))
    pruned = round(target * w.shape[1])
    if pruned == 0:
        return np.ones(w.shape, np.bool_)
    threshold = np.ascontiguousarray(np.partition(size, pruned - 1, axis=1)[:, pruned - 1])
    return _kept_above(size, threshold, pruned)


@numba.njit(cache=True, nogil=True)
def _kept_above(size: np.ndarray, threshold: np.ndarray, pruned: int) -> np.ndarray:
    """:func:`row_mask`'s mask from each row's ``threshold`` (its ``pruned``-th smallest value): below it pruned,
    and at it the first ones until ``pruned`` are."""
    rows, k = size.shape
    keep = np.empty((rows, k), np.bool_)
    for i in range(rows):
        limit = threshold[i]
        ties = pruned
        for j in range(k):
            ties -= size[i, j] < limit
        for j in range(k):
            value = size[i, j]
            tied = value == limit and ties > 0
            ties -= tied
            keep[i, j] = not (value < limit or tied)
    return keep


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


@numba.njit(cache=True, nogil=True)
def _n_m_keep(x: np.ndarray, table: np.ndarray, n: int, m: int) -> np.ndarray:
    """:func:`n_m_mask` on ``x`` as :func:`~lowbit.kernels.elements.as_readable` gives it: each value's rank by
    float32 magnitude in its group, counted by comparisons (of two equal magnitudes the later ranks above), in
    place of a stable argsort: 4-6x faster at m = 4 (fp32 / fp16), about as fast at m = 64 (measured on 4096^2); its
    m^2 comparisons per group lose beyond (2x slower at m = 128), so larger groups are sorted."""
    rows, k = x.shape
    keep = np.empty((rows, k), np.bool_)
    magnitude = np.empty(m, np.float32)
    for i in range(rows):
        for g in range(0, k, m):
            for a in range(m):
                magnitude[a] = abs(np.float32(load(x, i, g + a, table)))
            for a in range(m):
                below = 0
                for b in range(a):
                    below += magnitude[b] <= magnitude[a]
                for b in range(a + 1, m):
                    below += magnitude[b] < magnitude[a]
                keep[i, g + a] = below >= n
    return keep


def n_m_mask(w: np.ndarray, n: int, m: int, repeats: int = 1) -> np.ndarray:
    """``w`` is ``[R, K]`` (input channels last): in every ``m`` consecutive values keep the ``m - n`` largest |w|
    (ties: the lower index is pruned first). ``repeats``: how many masks of this size the caller will ask for (ADMM:
    one per iteration), which the compiled kernel's first compilation is weighed against (a SmolLM2 gate projection,
    885k elements, 20 times: 20 ms per mask sorted, 4 ms compiled)."""
    rows, k = w.shape
    if k % m:
        raise SkipWeight(f"{k} input channels do not divide by m={m} of the n:m ratio")
    if m <= N_M_COMPILED_UP_TO and worth_compiling(w.size * repeats, _n_m_keep):
        return _n_m_keep(*as_readable(w), n, m)
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

    @property
    def stored_codes(self) -> np.ndarray:
        """The quantized codes under the mask, row-major (``quantized`` only)."""
        assert self.quantized is not None
        return kept_elements(self.quantized.q, self.mask)

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
    mask, values, dropped, energy = _kept(w, mask)
    palettized = quantized = None
    if palettize_nbits is not None and values.size:
        palettized = palettize(values.reshape(1, -1), palettize_nbits)
    if quantize_dtype is not None:
        block = tuple(1 if a == channel_axis else 0 for a in range(w.ndim))
        quantized = quantize_linear(_zeroed(w, mask), quantize_dtype, block)
    # zeros decode exactly (symmetric quantization maps 0 to code 0): the error is the dropped values' plus the
    # stored values' own
    stored = palettized or quantized
    kept = None if stored else values
    return Sparsified(mask, kept, palettized, quantized, dropped + (stored.squared_error if stored else 0.0), energy)


def _zeroed(w: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``np.where(keep, w, 0)`` in ``w``'s dtype, bit patterns multiplied by the mask (numpy's ``where`` on 4096^2:
    65 -> 8 ms fp16, 73 -> 14 ms fp32)."""
    uint = SAME_SIZE_UINT[w.dtype.itemsize]
    return (np.ascontiguousarray(w).view(uint) * keep).view(w.dtype)


@numba.njit(cache=True, nogil=True)
def _compact(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], x.dtype)
    stored = 0
    for t in range(x.shape[0]):  # branch-free: which elements are kept is as good as random (as in _kept_values)
        out[stored] = x[t]
        stored += keep[t]
    return out[:stored].copy()


def kept_elements(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``x[keep]`` (row-major) for a boolean ``keep`` of ``x``'s shape; compiled for large arrays (numpy's boolean
    indexing of a random half of 4096^2 int8 codes: 75 ms, compiled: 7 ms). Raises ValueError when the shapes
    differ."""
    if keep.shape != x.shape:
        raise ValueError(f"keep has shape {keep.shape}, expected the values' {x.shape}")
    if not worth_compiling(x.size, _compact):
        return x[keep]
    uint = SAME_SIZE_UINT[x.dtype.itemsize]
    flat = np.ascontiguousarray(x).reshape(-1).view(uint)
    return _compact(flat, np.ascontiguousarray(keep).reshape(-1)).view(x.dtype)


@numba.njit(cache=True, nogil=True)
def _kept_values(x, table, keep):
    """(mask, values, dropped, energy) of :func:`_kept` for ``x`` as :func:`~lowbit.kernels.elements.as_readable`
    gives it, shaped ``(1, n)``: one pass (the values compacted as :func:`_compact` does, in the same loop: 6-9 %
    faster than a second pass)."""
    n = x.shape[1]
    mask = np.empty(n, np.bool_)
    values = np.empty(n, x.dtype)
    stored = 0
    dropped, energy = 0.0, 0.0
    for t in range(n):  # branch-free: which values are kept is as good as random
        v = load(x, 0, t, table)
        kept = keep[t] & (v != 0.0)
        mask[t] = kept
        values[stored] = x[0, t]
        stored += kept
        energy += v * v
        dropped += 0.0 if kept else v * v
    return mask, values[:stored].copy(), dropped, energy


def _kept(w: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(mask, values, dropped, energy): the mask of the non-zeros ``keep`` holds (zeros inside kept blocks are not
    stored either: they stay exact and pull no centroid), the values under it in row-major order, and the sums of
    squares of the values left out and of all of ``w``. Raises :class:`SkipWeight` when ``w`` is not finite."""
    if w.dtype.itemsize in (2, 4) and worth_compiling(w.size, _kept_values):
        x, table = as_readable(w.reshape(1, -1))
        mask, values, dropped, energy = _kept_values(x, table, np.ascontiguousarray(keep).reshape(-1))
        if not np.isfinite(energy):  # squares of 16- and 32-bit floats cannot overflow float64: NaN or Inf
            raise SkipWeight("contains NaN or Inf")
        return mask.reshape(w.shape), values.view(w.dtype), float(dropped), float(energy)
    check_finite(w)
    mask = keep & (w != 0)
    dense = w.astype(np.float64)
    return mask, w[mask], float(np.square(dense[~mask]).sum()), float(np.square(dense).sum())
