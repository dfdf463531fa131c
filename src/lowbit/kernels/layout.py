"""Copies of 2-D arrays with their axes swapped, in cache-sized tiles. numpy's transposing copy walks one side with
a stride of a whole row, a cache line per element; a tile keeps both sides' lines in cache while it is copied."""

from __future__ import annotations

import numba
import numpy as np

from lowbit.kernels.elements import SAME_SIZE_UINT, worth_compiling

__all__ = ["swapped"]

_TILE = 32


@numba.njit(cache=True, nogil=True)
def _swap(src: np.ndarray, out: np.ndarray, write_order: bool) -> None:
    """``out[j, i] = src[i, j]`` tile by tile; within a tile along ``out``'s rows (``write_order``) or ``src``'s
    (measured fastest for 2-byte and for 1-byte elements respectively)."""
    rows, cols = src.shape
    for i0 in range(0, rows, _TILE):
        i1 = min(i0 + _TILE, rows)
        for j0 in range(0, cols, _TILE):
            j1 = min(j0 + _TILE, cols)
            if write_order:
                for j in range(j0, j1):
                    for i in range(i0, i1):
                        out[j, i] = src[i, j]
            else:
                for i in range(i0, i1):
                    for j in range(j0, j1):
                        out[j, i] = src[i, j]


def swapped(array: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(array.T)`` of a 2-D array, bit for bit."""
    itemsize = array.dtype.itemsize
    if array.ndim != 2 or itemsize not in SAME_SIZE_UINT or not worth_compiling(array.size, _swap):
        return np.ascontiguousarray(array.T)
    uint = SAME_SIZE_UINT[itemsize]
    out = np.empty(array.shape[::-1], uint)
    _swap(np.ascontiguousarray(array).view(uint), out, itemsize > 1)
    return out.view(array.dtype)
