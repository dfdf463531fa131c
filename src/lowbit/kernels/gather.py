"""Compiled fast paths over packed LUT codes: decode straight from the packed bytes, and the squared error of a
decode against the original, without the temporaries of the numpy reference (:func:`lowbit.kernels.decode.
lut_decode` stays the ground truth; the tests hold both equal bit for bit)."""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["gather_packed", "squared_error_and_energy"]

_SAME_SIZE_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@numba.njit(cache=True, nogil=True)
def _gather(packed: np.ndarray, n_bits: int, table: np.ndarray, per_group: int, out: np.ndarray) -> None:
    mask = (1 << n_bits) - 1
    bit = 0
    group = 0
    left = per_group
    for e in range(out.shape[0]):
        byte = bit >> 3
        shift = bit & 7
        value = np.int64(packed[byte]) >> shift
        if shift + n_bits > 8:
            value |= np.int64(packed[byte + 1]) << (8 - shift)
        out[e] = table[group, value & mask]
        bit += n_bits
        left -= 1
        if left == 0:
            group += 1
            left = per_group


def gather_packed(packed: np.ndarray, n_bits: int, lut: np.ndarray, count: int) -> np.ndarray:
    """``count`` values ``lut[group, code]`` for the n-bit codes in ``packed`` (as :func:`~lowbit.kernels.packing.
    pack_bits` writes them); ``lut`` is ``[G, 2**n_bits]``, group ``g`` serving codes ``g * count / G`` onwards.
    Values are copied bit for bit (any dtype of 1, 2, 4 or 8 bytes)."""
    groups = lut.shape[0]
    uint = _SAME_SIZE_UINT[lut.dtype.itemsize]
    out = np.empty(count, lut.dtype)
    table = np.ascontiguousarray(lut).view(uint)
    _gather(np.ascontiguousarray(packed, np.uint8), int(n_bits), table, max(count // groups, 1), out.view(uint))
    return out


@numba.njit(cache=True, nogil=True)
def _error_and_energy(decoded: np.ndarray, original: np.ndarray) -> tuple[float, float]:
    sse = 0.0
    energy = 0.0
    for i in range(original.shape[0]):
        x = np.float64(original[i])
        d = np.float64(decoded[i]) - x
        sse += d * d
        energy += x * x
    return sse, energy


def squared_error_and_energy(decoded: np.ndarray, original: np.ndarray) -> tuple[float, float]:
    """(sum of squared differences, sum of squares of ``original``) in float64, without temporaries for float32 /
    float64 arrays (others go through float64 copies)."""
    a, b = decoded.reshape(-1), original.reshape(-1)
    if a.dtype in (np.float32, np.float64) and b.dtype in (np.float32, np.float64):
        sse, energy = _error_and_energy(np.ascontiguousarray(a), np.ascontiguousarray(b))
        return float(sse), float(energy)
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.dot(diff, diff)), float(np.dot(b.astype(np.float64), b.astype(np.float64)))
