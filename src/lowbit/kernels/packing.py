"""n-bit packing of integer codes into bytes, little-endian within each byte (low bits first).

Codes ``c_0, c_1, ...`` of ``n`` bits each form one bit stream: bit ``j`` of code ``i`` is stream bit ``i*n + j``,
and stream bit ``b`` is bit ``b % 8`` of byte ``b // 8``. The stream is padded with zero bits to whole bytes.

Every ``n`` in 1..8 uses the same vectorized scheme: ``8 / gcd(n, 8)`` codes fill exactly ``n / gcd(n, 8)`` bytes
(1, 3, 5 or 7), so codes are processed in such groups, each group assembled in one machine word.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]

_CHUNK_GROUPS = 1 << 20  # groups per chunk: bounds the temporary memory to a few MB


def _layout(n_bits: int) -> tuple[int, int, np.dtype]:
    """Return (codes per group, bytes per group, little-endian word dtype holding one group)."""
    if not isinstance(n_bits, (int, np.integer)) or isinstance(n_bits, bool) or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an integer in 1..8, got {n_bits!r}")
    g = math.gcd(int(n_bits), 8)
    codes, nbytes = 8 // g, int(n_bits) // g
    word = np.dtype("u1") if nbytes == 1 else np.dtype("<u4") if nbytes <= 4 else np.dtype("<u8")
    return codes, nbytes, word


def packed_nbytes(count: int, n_bits: int) -> int:
    """Number of bytes that ``count`` codes of ``n_bits`` bits occupy once packed."""
    _layout(n_bits)
    return (int(count) * int(n_bits) + 7) // 8


def pack_bits(codes: np.ndarray, n_bits: int) -> np.ndarray:
    """Pack integer codes into a 1-D uint8 array.

    Parameters
    ----------
    codes : array of non-negative integers, any shape (flattened in C order), each ``< 2**n_bits``.
    n_bits : bits per code, 1..8.

    Returns
    -------
    uint8 array of ``packed_nbytes(codes.size, n_bits)`` bytes.

    Raises
    ------
    ValueError: ``n_bits`` outside 1..8, or a code outside ``[0, 2**n_bits)``.
    """
    per_group, group_bytes, word = _layout(n_bits)
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << n_bits)):
        raise ValueError(f"codes must lie in [0, {1 << n_bits}) for n_bits={n_bits}")
    flat = flat.astype(np.uint8, copy=False)
    count = flat.size
    groups = -(-count // per_group)
    if groups * per_group != count:
        flat = np.concatenate([flat, np.zeros(groups * per_group - count, np.uint8)])
    grid = np.ascontiguousarray(flat).reshape(groups, per_group)
    out = np.empty((groups, group_bytes), np.uint8)
    # 1, 2 and 4 bits: a group's codes are the bytes of one little-endian word, folded into its low byte by shifts
    # instead of gathered column by column (4-bit 4096^2: 9.3 -> 2.1 ms; 2-bit 11 -> 7; 1-bit no faster)
    fold = np.dtype(f"<u{per_group}") if group_bytes == 1 and per_group > 1 else None
    for start in range(0, groups, _CHUNK_GROUPS):
        block = grid[start : start + _CHUNK_GROUPS]
        if fold is not None:
            words = block.view(fold).reshape(-1)
            acc = words.copy()
            for i in range(1, per_group):
                acc |= words >> fold.type(i * (8 - n_bits))
            out[start : start + len(block), 0] = acc  # the low byte
            continue
        acc = block[:, 0].astype(word)
        for i in range(1, per_group):
            acc |= block[:, i].astype(word) << word.type(i * n_bits)
        out[start : start + len(block)] = acc.view(np.uint8).reshape(len(block), word.itemsize)[:, :group_bytes]
    return out.reshape(-1)[: packed_nbytes(count, n_bits)]


def unpack_bits(packed: np.ndarray, n_bits: int, count: int) -> np.ndarray:
    """Unpack ``count`` codes of ``n_bits`` bits from the bytes written by :func:`pack_bits`.

    Returns a 1-D uint8 array of ``count`` codes.

    Raises
    ------
    ValueError: ``n_bits`` outside 1..8, or ``packed`` holds fewer bytes than ``count`` codes need.
    """
    per_group, group_bytes, word = _layout(n_bits)
    data = np.asarray(packed, dtype=np.uint8).reshape(-1)
    need = packed_nbytes(count, n_bits)
    if data.size < need:
        raise ValueError(f"packed holds {data.size} bytes, {need} needed for {count} codes of {n_bits} bits")
    groups = -(-int(count) // per_group)
    full = np.zeros(groups * group_bytes, np.uint8)
    full[:need] = data[:need]
    padded = np.zeros((groups, word.itemsize), np.uint8)
    padded[:, :group_bytes] = full.reshape(groups, group_bytes)
    words = padded.view(word).reshape(groups)
    mask = word.type((1 << n_bits) - 1)
    out = np.empty((groups, per_group), np.uint8)
    for i in range(per_group):
        out[:, i] = (words >> word.type(i * n_bits)) & mask
    return out.reshape(-1)[: int(count)]
