"""Distinct values with multiplicities, and table-driven code assignment, for 16-bit floats (fp16 / bf16).

A 16-bit float has at most 65,536 values, so a group of any size reduces to a histogram over its bit patterns. Bit
patterns are mapped to *order keys* (sign-magnitude to unsigned order), so scanning keys upward visits values in
ascending order: the histogram comes out sorted, and the codes of a sorted LUT are assigned by one monotone walk.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import ml_dtypes
import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

from lowbit.kernels.packing import pack_bits

__all__ = [
    "SIXTEEN_BIT_FLOATS",
    "Histogram",
    "KeyRuns",
    "assign_by_thresholds",
    "assign_packed",
    "bit_values",
    "distinct_values",
    "distinct_values_any",
    "squared_error",
]

SIXTEEN_BIT_FLOATS = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


@functools.cache
def bit_values(dtype: np.dtype) -> np.ndarray:
    """float64 value of every bit pattern of a 16-bit float dtype (indexed by the raw uint16); read-only, cached."""
    with np.errstate(invalid="ignore"):
        table = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype).astype(np.float64)
    table.flags.writeable = False
    return table


@functools.cache
def key_values(dtype: np.dtype) -> np.ndarray:
    """float64 value of every order key of a 16-bit float dtype (NaN keys stay NaN); read-only, cached."""
    keys = np.arange(1 << 16, dtype=np.uint32)
    bits = np.where(keys & 0x8000, keys ^ 0x8000, ~keys & 0xFFFF).astype(np.uint16)
    with np.errstate(invalid="ignore"):
        table = bits.view(dtype).astype(np.float64)
    table.flags.writeable = False
    return table


@numba.njit(cache=True, nogil=True, inline="always")
def _key(bits: np.uint16) -> int:
    b = np.int64(bits)
    return b ^ 0xFFFF if b & 0x8000 else b | 0x8000


@numba.njit(cache=True, nogil=True)
def _distinct(bits: np.ndarray, importance: np.ndarray, weighted: bool, table: np.ndarray, values, weights, keys):
    """One pass per group: counts (or summed importance) into a reused table of the 65,536 order keys, and a
    bitmap of the keys present, walked word by word with count-trailing-zeros, so a group costs its element count
    plus its distinct values, not the width of its key range. Writes ``values``, ``weights``, ``keys``."""
    groups, n = bits.shape
    hist = np.zeros(1 << 16)
    present = np.zeros(1 << 10, np.uint64)
    offsets = np.zeros(groups + 1, np.int64)
    one = np.uint64(1)
    out = 0
    for g in range(groups):
        for e in range(n):
            k = _key(bits[g, e])
            hist[k] += importance[g, e] if weighted else 1.0
            present[k >> 6] |= one << np.uint64(k & 63)
        for word_index in range(1 << 10):
            word = present[word_index]
            if not word:
                continue
            present[word_index] = 0
            while word:
                k = (word_index << 6) + np.int64(trailing_zeros(word))  # type: ignore[call-arg]
                word &= word - one
                values[out] = table[k]
                weights[out] = hist[k]
                keys[out] = k
                out += 1
                hist[k] = 0.0
        offsets[g + 1] = out
    # views, not copies: the untouched tail of the buffers is never paged in
    return values[:out], weights[:out], keys[:out], offsets


class KeyRuns(NamedTuple):
    """The sorted order keys (uint16) present in each group, ``keys[offsets[g]:offsets[g + 1]]``."""

    keys: np.ndarray
    offsets: np.ndarray


class Histogram(NamedTuple):
    """Sorted distinct values of each group (runs concatenated, ``offsets[g]:offsets[g + 1]``) with their
    multiplicities or summed importance; ``present``: every order key of the 16-bit input, weightless ones too
    (None for other dtypes), which code assignment walks."""

    values: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    present: KeyRuns | None


def distinct_values(bits: np.ndarray, dtype: np.dtype, importance: np.ndarray | None = None) -> Histogram:
    """Sorted distinct values per group with their multiplicities (or summed ``importance``).

    Parameters
    ----------
    bits : ``(G, n)`` uint16 bit patterns of a 16-bit float dtype; finite values only.
    dtype : ``float16`` or ``bfloat16``, the meaning of ``bits``.
    importance : optional ``(G, n)`` non-negative per-element weights.

    Returns a :class:`Histogram` (float64 values and weights).
    """
    weighted = importance is not None
    imp = _counted_where_weightless(np.ascontiguousarray(importance, np.float64)) if weighted else np.zeros((1, 1))
    bits = np.ascontiguousarray(bits)
    values, weights, keys = _output_buffers(bits.shape[0] * min(bits.shape[1], 1 << 16))
    values, weights, keys, offsets = _distinct(bits, imp, weighted, key_values(dtype), values, weights, keys)
    histogram = Histogram(values, weights, offsets, KeyRuns(keys, offsets))
    return _drop_weightless(histogram) if weighted else histogram  # counts are >= 1


def _output_buffers(capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Room for every group's distinct values, weights and keys (no growth in the loop; the untouched tail is never
    paged in). Values and weights share one allocation, half a page apart: written at the same index, arrays
    whose elements share their offset within a 4 KiB page slow the histogram's walk 3-5x (store aliasing,
    measured), and separate large allocations all start at the same page offset."""
    apart = (256 - capacity) % 512  # float64 elements: weights[i] sits 2 KiB (mod 4 KiB) after values[i]
    both = np.empty(2 * capacity + apart)
    return both[:capacity], both[capacity + apart :], np.empty(capacity, np.uint16)


def distinct_values_any(x: np.ndarray, importance: np.ndarray | None = None) -> Histogram:
    """:func:`distinct_values` for values of any float dtype ``(G, n)`` (sorting; slower than the histogram)."""
    if importance is not None:
        importance = _counted_where_weightless(np.asarray(importance, np.float64))
    runs = [np.unique(row, return_inverse=True) for row in x.astype(np.float64)]
    values = np.concatenate([u for u, _ in runs])
    weights = np.concatenate(
        [
            np.bincount(inverse.reshape(-1), weights=None if importance is None else importance[g], minlength=len(u))
            for g, (u, inverse) in enumerate(runs)
        ]
    ).astype(np.float64)
    offsets = np.concatenate([[0], np.cumsum([len(u) for u, _ in runs])]).astype(np.int64)
    return _drop_weightless(Histogram(values, weights, offsets, None))


def _drop_weightless(h: Histogram) -> Histogram:
    """Values whose importance sums to 0 cannot pull a centroid: leave them out of the groups' runs. A value that is
    not finite stays, so that the finiteness check still sees it."""
    keep = (h.weights > 0) | ~np.isfinite(h.values)
    if keep.all():
        return h
    groups = np.repeat(np.arange(len(h.offsets) - 1), np.diff(h.offsets))
    counts = np.bincount(groups[keep], minlength=len(h.offsets) - 1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Histogram(h.values[keep], h.weights[keep], offsets, h.present)


def _counted_where_weightless(importance: np.ndarray) -> np.ndarray:
    """``importance`` (G, n) with every element of a group whose importance sums to 0 counting 1: any LUT costs such
    a group nothing, and the plain k-means of its values is as good as any."""
    weightless = ~(importance.sum(axis=1) > 0)
    if not weightless.any():
        return importance
    counted = importance.copy()
    counted[weightless] = 1.0
    return counted


@numba.njit(cache=True, nogil=True)
def _lookup(lookup: np.ndarray, thresholds: np.ndarray, g: int, table: np.ndarray, keys, offsets) -> None:
    """``lookup[k]`` = code of each order key ``k`` present in group ``g``: one monotone walk."""
    j = 0
    t = thresholds.shape[1]
    for i in range(offsets[g], offsets[g + 1]):
        k = keys[i]
        v = table[k]
        while j < t and v > thresholds[g, j]:
            j += 1
        lookup[k] = j


@numba.njit(cache=True, nogil=True)
def _assign(bits: np.ndarray, thresholds: np.ndarray, table: np.ndarray, keys, offsets) -> np.ndarray:
    groups, n = bits.shape
    codes = np.empty((groups, n), np.uint8)
    lookup = np.empty(1 << 16, np.uint8)
    for g in range(groups):
        _lookup(lookup, thresholds, g, table, keys, offsets)
        for e in range(n):
            codes[g, e] = lookup[_key(bits[g, e])]
    return codes


@numba.njit(cache=True, nogil=True)
def _assign_nibbles(bits, thresholds, table, keys, offsets) -> np.ndarray:
    """:func:`_assign` for 4-bit codes written straight into bytes of two (low nibble first), as
    :func:`~lowbit.kernels.packing.pack_bits` lays them out; every group has an even size."""
    groups, n = bits.shape
    row = n // 2
    out = np.empty(groups * row, np.uint8)
    lookup = np.empty(1 << 16, np.uint8)
    for g in range(groups):
        _lookup(lookup, thresholds, g, table, keys, offsets)
        for o in range(row):
            out[g * row + o] = lookup[_key(bits[g, 2 * o])] | (lookup[_key(bits[g, 2 * o + 1])] << 4)
    return out


def assign_packed(bits: np.ndarray, dtype: np.dtype, thresholds: np.ndarray, present: KeyRuns, n_bits: int):
    """``pack_bits(assign_by_thresholds(...), n_bits)``; 4-bit codes of even-sized groups in one pass."""
    if n_bits != 4 or bits.shape[1] % 2:
        return pack_bits(assign_by_thresholds(bits, dtype, thresholds, present), n_bits)
    thresholds = np.ascontiguousarray(thresholds, np.float64)
    return _assign_nibbles(np.ascontiguousarray(bits), thresholds, key_values(dtype), *present)


def assign_by_thresholds(bits: np.ndarray, dtype: np.dtype, thresholds: np.ndarray, present: KeyRuns) -> np.ndarray:
    """Codes ``(G, n)`` uint8: the number of a group's ascending ``thresholds`` that each value exceeds.

    ``present`` is the histogram's (:attr:`Histogram.present` of the same ``bits``).
    """
    table = key_values(dtype)
    return _assign(np.ascontiguousarray(bits), np.ascontiguousarray(thresholds, np.float64), table, *present)


@numba.njit(cache=True, nogil=True)
def _squared_error(values, weights, offsets, lut, thresholds) -> np.ndarray:
    groups = offsets.shape[0] - 1
    out = np.zeros(groups)
    t = thresholds.shape[1]
    for g in range(groups):
        j = 0
        for i in range(offsets[g], offsets[g + 1]):
            while j < t and values[i] > thresholds[g, j]:
                j += 1
            d = values[i] - lut[g, j]
            out[g] += weights[i] * d * d
    return out


def squared_error(values, weights, offsets, lut: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per-group weighted squared error of the distinct values against their nearest LUT entry (float64)."""
    return _squared_error(values, weights, offsets, np.ascontiguousarray(lut, np.float64), thresholds)
