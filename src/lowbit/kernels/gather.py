"""Compiled fast paths over packed LUT codes: decode straight from the packed bytes, and measure a decode's squared
error against the original without materializing it. :func:`lowbit.kernels.decode.lut_decode` stays the ground
truth; the tests hold both equal bit for bit."""

from __future__ import annotations

import numba
import numpy as np

from lowbit.kernels.elements import SAME_SIZE_UINT, as_readable, load, worth_compiling

__all__ = ["gather_packed", "packed_error", "squared_error_and_energy"]


_CHUNK = 4096  # codes unpacked at a time into a small buffer; a multiple of 8, so chunks start on a byte


@numba.njit(cache=True, nogil=True, inline="always")
def _unpack_chunk(packed: np.ndarray, n_bits: int, first: int, buf: np.ndarray, count: int) -> None:
    """Codes ``first .. first + count - 1`` of the little-endian bit stream into ``buf`` (``first`` a multiple of
    8). Widths that divide 8 read whole bytes; 3, 5, 6 and 7 bits may straddle two bytes."""
    mask = (1 << n_bits) - 1
    if 8 % n_bits == 0:
        per_byte = 8 // n_bits
        e = 0
        for b in range(first // per_byte, (first + count + per_byte - 1) // per_byte):
            byte = packed[b]
            for c in range(per_byte):
                if e < count:
                    buf[e] = (byte >> (c * n_bits)) & mask
                e += 1
        return
    bit = first * n_bits
    for e in range(count):
        b, shift = bit >> 3, bit & 7
        value = np.int64(packed[b]) >> shift
        if shift + n_bits > 8:
            value |= np.int64(packed[b + 1]) << (8 - shift)
        buf[e] = value & mask
        bit += n_bits


@numba.njit(cache=True, nogil=True)
def _walk(packed, n_bits: int, table, per_group: int, count: int, out, original, measure: bool):
    """Visit the ``count`` codes in order with their LUT group's row: write ``row[code]`` to ``out``, or
    (``measure``) accumulate its squared difference to ``original`` and ``original``'s energy."""
    buf = np.empty(_CHUNK, np.uint8)
    sse, energy = 0.0, 0.0
    group, left = 0, per_group
    for first in range(0, count, _CHUNK):
        size = min(_CHUNK, count - first)
        _unpack_chunk(packed, n_bits, first, buf, size)
        row = table[group]
        for e in range(size):
            if measure:
                x = np.float64(original[first + e])
                d = row[buf[e]] - x
                sse += d * d
                energy += x * x
            else:
                out[first + e] = row[buf[e]]
            left -= 1
            if left == 0:
                group, left = group + 1, per_group
                row = table[min(group, table.shape[0] - 1)]
    return sse, energy


def _per_group(count: int, lut: np.ndarray) -> int:
    return max(count // lut.shape[0], 1)


def gather_packed(
    packed: np.ndarray, n_bits: int, lut: np.ndarray, count: int, out: np.ndarray | None = None
) -> np.ndarray:
    """``count`` values ``lut[group, code]`` for the n-bit codes in ``packed`` (as :func:`~lowbit.kernels.packing.
    pack_bits` writes them); ``lut`` is ``[G, 2**n_bits]``, group ``g`` serving codes ``g * count / G`` onwards.
    Values are copied bit for bit (any dtype of 1, 2, 4 or 8 bytes), into ``out`` (1-D, contiguous, the LUT's
    dtype) when given: writing into memory already in use spares a fresh allocation's page faults."""
    uint = SAME_SIZE_UINT[lut.dtype.itemsize]
    if out is None:
        out = np.empty(count, lut.dtype)
    table = np.ascontiguousarray(lut).view(uint)
    data = np.ascontiguousarray(packed, np.uint8)
    nothing = np.zeros(1)
    _walk(data, int(n_bits), table, _per_group(count, lut), count, out.view(uint), nothing, False)
    return out


def packed_error(packed: np.ndarray, n_bits: int, lut: np.ndarray, original: np.ndarray) -> tuple[float, float]:
    """(sum of squared differences between the decode and ``original``, sum of ``original``'s squares), float64,
    read straight from the packed codes; ``original`` float32 or float64, in code order."""
    flat = np.ascontiguousarray(original.reshape(-1))
    table = np.ascontiguousarray(lut, np.float64)
    data = np.ascontiguousarray(packed, np.uint8)
    sse, energy = _walk(data, int(n_bits), table, _per_group(flat.size, lut), flat.size, table[0], flat, True)
    return float(sse), float(energy)


@numba.njit(cache=True, nogil=True)
def _error_and_energy(a, table_a, b, table_b) -> tuple[float, float]:
    """Sums of squares of ``a - b`` and of ``b``, both as :func:`~lowbit.kernels.elements.as_readable` gives them,
    shaped ``(1, n)``."""
    sse, energy = 0.0, 0.0
    for t in range(b.shape[1]):
        x = load(b, 0, t, table_b)
        d = load(a, 0, t, table_a) - x
        sse += d * d
        energy += x * x
    return sse, energy


def squared_error_and_energy(decoded: np.ndarray, original: np.ndarray) -> tuple[float, float]:
    """(sum of squared differences, sum of squares of ``original``) in float64."""
    if not worth_compiling(original.size, _error_and_energy):
        a, b = decoded.reshape(-1).astype(np.float64), original.reshape(-1).astype(np.float64)
        diff = a - b
        return float(np.dot(diff, diff)), float(np.dot(b, b))
    a, table_a = as_readable(decoded.reshape(1, -1))
    b, table_b = as_readable(original.reshape(1, -1))
    sse, energy = _error_and_energy(a, table_a, b, table_b)
    return float(sse), float(energy)
