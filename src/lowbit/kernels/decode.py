"""Reference decoders of lowbit's compressed forms, in canonical (channel-first / blocks-last) layout.

These are the ground truth that ONNX Runtime's decode of the encoding and ``decompress_weights`` must reproduce bit
for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = ["FP4_E2M1_VALUES", "dequantize_linear", "lut_decode", "mx_decode", "sparse_decode", "value_table"]


def value_table(dtype: np.dtype) -> np.ndarray:
    """float32 value of every code of a float element type of at most 8 bits (fp4, fp8), indexed by code."""
    bits = 4 if np.dtype(dtype) == np.dtype(ml_dtypes.float4_e2m1fn) else 8
    with np.errstate(invalid="ignore"):
        return np.arange(1 << bits, dtype=np.uint8).view(dtype).astype(np.float32)


FP4_E2M1_VALUES = value_table(np.dtype(ml_dtypes.float4_e2m1fn))


def lut_decode(codes: np.ndarray, lut: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Dense ``[C, R]`` weight from look-up-table codes.

    Parameters
    ----------
    codes : ``[C / cluster_dim, R]`` integer codes; rows are output channels (in vectors of ``cluster_dim``).
    lut : ``[G, K, cluster_dim]`` tables; group ``g`` serves ``C / G`` consecutive output channels.
    scale : optional per-channel factor, ``[C]`` (or one value), applied after the look-up in the LUT's dtype.
    """
    groups, k, cd = lut.shape
    rows, r = codes.shape
    flat = codes.reshape(groups, -1).astype(np.int64) + (np.arange(groups, dtype=np.int64) * k)[:, None]
    vectors = lut.reshape(-1, cd)[flat.reshape(-1)].reshape(rows, r, cd)
    dense = vectors.transpose(0, 2, 1).reshape(rows * cd, r)
    if scale is not None:
        dense = dense * np.asarray(scale, dtype=lut.dtype).reshape(-1, 1)
    return dense


def mx_decode(codes: np.ndarray, exponents: np.ndarray, table: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``table[codes] * 2^(exponents - 127)`` in float32, cast to ``dtype``; ``exponents`` (uint8 E8M0)
    broadcast against ``codes`` (one per block)."""
    scale = np.power(np.float32(2.0), exponents.astype(np.float32) - np.float32(127.0))
    return (table[codes] * scale).astype(dtype)


def sparse_decode(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Dense 1-D array of ``mask.size`` elements with ``values`` (row-major order) at the set bits of ``mask``."""
    dense = np.zeros(mask.size, dtype=values.dtype)
    dense[mask.reshape(-1).astype(bool)] = values
    return dense


def dequantize_linear(
    q: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    axis: int = 1,
    block_size: int = 0,
) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``(q - zero_point) * scale`` in float32, cast to the scale's dtype.

    ``scale`` is a scalar (per tensor), 1-D along ``axis`` (per axis), or of ``q``'s rank with ``axis`` divided by
    ``block_size`` (blocked).
    """
    axis = axis % q.ndim if q.ndim else 0
    out_dtype = np.asarray(scale).dtype
    s = _broadcast_param(np.asarray(scale).astype(np.float32), q, axis, block_size)
    zp = (
        np.float32(0)
        if zero_point is None
        else _broadcast_param(np.asarray(zero_point).astype(np.float32), q, axis, block_size)
    )
    return ((q.astype(np.float32) - zp) * s).astype(out_dtype)


def _broadcast_param(p: np.ndarray, q: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """Scale / zero point of DequantizeLinear expanded to broadcast against ``q``."""
    if block_size:
        return np.repeat(p, block_size, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
    if p.ndim == 0:
        return p
    shape = [1] * q.ndim
    shape[axis] = -1
    return p.reshape(shape)
