"""Linear quantization: integer (symmetric / asymmetric), fp8 and fp4 elements, float or E8M0 (power-of-two) scales,
over blocks of any shape. Round-half-to-even everywhere; scales are rounded to their stored dtype *before* the
elements are quantized, so decoding the stored numbers reproduces exactly what was measured.

A block shape gives, per axis, how many consecutive elements share one scale (0: the whole axis). The result's
``scale`` (and ``zero_point``) has one entry per block, laid out as the grid ``n_a / b_a`` per axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import ml_dtypes
import numpy as np

from lowbit.kernels import CannotCompress, check_finite
from lowbit.kernels.decode import dequantize_linear, mx_decode, value_table

__all__ = ["LinearQuantized", "Quantized", "blocks_of", "element_range", "quantize_linear", "quantize_per_row"]

INTEGER_DTYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, ml_dtypes.int4, ml_dtypes.uint4))
FLOAT_ELEMENT_DTYPES = tuple(
    np.dtype(t) for t in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float4_e2m1fn)
)
E8M0_BIAS = 127


def element_range(dtype: np.dtype, symmetric: bool) -> tuple[int, int, int]:
    """(lowest code, highest code, symmetric zero point) of an integer dtype.

    Symmetric: signed ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with zero point 0; unsigned the same span around the
    mid-range zero point ``2^(b-1)``. Asymmetric: the full range (the zero point is chosen per block).
    """
    info = ml_dtypes.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)
    if not symmetric:
        return lo, hi, 0
    half = (hi - lo) // 2  # 127 for 8 bits, 7 for 4 bits
    mid = 0 if lo < 0 else half + 1
    return mid - half, mid + half, mid


@dataclass(frozen=True)
class LinearQuantized:
    """``decode() = (q - zero_point) * scale`` per block (``scale = 2^(e - 127)`` for E8M0 exponents ``e``)."""

    q: np.ndarray
    scale: np.ndarray  # grid shape; the scale dtype, or uint8 E8M0 exponents
    zero_point: np.ndarray | None  # grid shape, q's dtype
    block: tuple[int, ...]  # per axis, resolved (no zeros)
    e8m0: bool
    out_dtype: np.dtype
    squared_error: float = 0.0
    energy: float = 0.0

    def split_shape(self) -> tuple[int, ...]:
        """``q``'s shape with each axis split into (blocks, block)."""
        return tuple(d for n, b in zip(self.q.shape, self.block, strict=True) for d in (n // b, b))

    def grid_shape(self) -> tuple[int, ...]:
        """The scale grid, broadcastable against :meth:`split_shape`."""
        return tuple(d for n, b in zip(self.q.shape, self.block, strict=True) for d in (n // b, 1))

    def decode(self) -> np.ndarray:
        if self.e8m0:
            dense = mx_decode(
                self.q.view(np.uint8).reshape(self.split_shape()),
                self.scale.reshape(self.grid_shape()),
                value_table(self.q.dtype),
                self.out_dtype,
            )
            return dense.reshape(self.q.shape)
        q = self.q.reshape(self.split_shape())
        zp = None if self.zero_point is None else self.zero_point.reshape(self.grid_shape())
        return _dequantize_grid(q, self.scale.reshape(self.grid_shape()), zp).reshape(self.q.shape)


def _dequantize_grid(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
    """DequantizeLinear's arithmetic with broadcasting scale/zero point: float32 product, cast to scale dtype."""
    zp = np.float32(0) if zero_point is None else zero_point.astype(np.float32)
    return ((q.astype(np.float32) - zp) * scale.astype(np.float32)).astype(scale.dtype)


def _resolve(block: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    resolved = tuple(n if b == 0 else b for n, b in zip(shape, block, strict=True))
    for axis, (n, b) in enumerate(zip(shape, resolved, strict=True)):
        if b < 1 or n % b:
            raise CannotCompress(f"axis {axis} of size {n} does not divide into blocks of {b}")
    return resolved


def _stored_scale(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``raw`` (float64, > 0 where data is non-zero, 0 for all-zero blocks) rounded to ``dtype``: finite, > 0."""
    info = ml_dtypes.finfo(dtype)
    stored = np.where(raw > 0, raw, 1.0)
    stored = np.clip(stored, float(info.smallest_subnormal), float(info.max)).astype(dtype)
    return stored


def _e8m0_exponents(amax: np.ndarray, element: np.dtype) -> np.ndarray:
    """OCP MX v1.0 shared exponent: ``floor(log2(amax)) - emax_elem``, biased by 127, clamped to [0, 254]."""
    emax = int(np.floor(np.log2(float(ml_dtypes.finfo(element).max))))
    with np.errstate(divide="ignore"):
        unbiased = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - emax, -E8M0_BIAS)
    return np.clip(unbiased + E8M0_BIAS, 0, 254).astype(np.uint8)


def quantize_linear(
    x: np.ndarray,
    dtype: Any,
    block: tuple[int, ...],
    symmetric: bool = True,
    scale_dtype: Any = None,
    e8m0: bool = False,
) -> LinearQuantized:
    """Quantize ``x`` (float, finite) to ``dtype`` with one scale per block.

    Parameters
    ----------
    x : the weight (float16 / bfloat16 / float32).
    dtype : int8, uint8, int4, uint4, float8_e4m3fn, float8_e5m2 or float4_e2m1fn (numpy / ml_dtypes).
    block : elements per block along each axis (0: the whole axis).
    symmetric : integers only; asymmetric blocks get a zero point that makes 0.0 exact.
    scale_dtype : float dtype of the scales (default ``x.dtype``); ignored with ``e8m0``.
    e8m0 : power-of-two scales stored as E8M0 exponents (the OCP MX encoding), for float element types.

    Raises :class:`~lowbit.kernels.CannotCompress` when the blocks do not tile ``x`` or ``x`` is not finite.
    """
    dtype = np.dtype(dtype)
    out_dtype = np.dtype(x.dtype)
    scale_dtype = out_dtype if scale_dtype is None else np.dtype(scale_dtype)
    check_finite(x)
    resolved = _resolve(tuple(block), x.shape)
    split = tuple(d for n, b in zip(x.shape, resolved, strict=True) for d in (n // b, b))
    inner = tuple(range(1, 2 * x.ndim, 2))
    xs = x.reshape(split)
    data = xs.astype(np.float64)
    zero_point = None
    if dtype in INTEGER_DTYPES:
        low, high, mid = element_range(dtype, symmetric)
        if symmetric:
            amax = np.abs(data).max(axis=inner, keepdims=True)
            scale = _stored_scale(amax / (high - mid), scale_dtype)
            q = np.clip(np.rint(data / scale.astype(np.float64)) + mid, low, high)
            if mid:
                zero_point = np.full(scale.shape, mid, np.float64)
        else:
            lo = np.minimum(data.min(axis=inner, keepdims=True), 0.0)
            hi = np.maximum(data.max(axis=inner, keepdims=True), 0.0)
            scale = _stored_scale((hi - lo) / (high - low), scale_dtype)
            s64 = scale.astype(np.float64)
            zero_point = np.clip(np.rint(low - lo / s64), low, high)
            q = np.clip(np.rint(data / s64) + zero_point, low, high)
        q = q.astype(np.int64).astype(dtype)
        zero_point = None if zero_point is None else zero_point.astype(np.int64).astype(dtype)
    elif dtype in FLOAT_ELEMENT_DTYPES:
        top = float(ml_dtypes.finfo(dtype).max)
        amax = np.abs(data).max(axis=inner, keepdims=True)
        if e8m0:
            scale = _e8m0_exponents(amax, dtype)
            s64 = np.exp2(scale.astype(np.float64) - E8M0_BIAS)
        else:
            scale = _stored_scale(amax / top, scale_dtype)
            s64 = scale.astype(np.float64)
        q = np.clip(data / s64, -top, top).astype(np.float32).astype(dtype)
    else:
        raise ValueError(f"dtype must be an integer, fp8 or fp4 element type, got {dtype}")
    grid = tuple(n // b for n, b in zip(x.shape, resolved, strict=True))
    zero_point = None if zero_point is None else zero_point.reshape(grid)
    result = LinearQuantized(q.reshape(x.shape), scale.reshape(grid), zero_point, resolved, e8m0, out_dtype)
    diff = result.decode().astype(np.float64) - x.astype(np.float64)
    return replace(result, squared_error=float(np.vdot(diff, diff)), energy=float(np.vdot(data, data)))


@dataclass(frozen=True)
class Quantized:
    """``q`` with one ``scale`` (and zero point) per row (axis 0): ``decode() == (q - zero_point) * scale``."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None

    def decode(self) -> np.ndarray:
        return dequantize_linear(self.q, self.scale, self.zero_point, axis=0)


def quantize_per_row(x: np.ndarray, dtype: Any, scale_dtype: Any) -> Quantized:
    """Symmetric quantization with one scale per row along axis 0 (LUT quantization)."""
    result = quantize_linear(x, dtype, (1,) + (0,) * (x.ndim - 1), symmetric=True, scale_dtype=scale_dtype)
    rows = len(x)
    zero_point = None if result.zero_point is None else result.zero_point.reshape(rows)
    return Quantized(result.q, result.scale.reshape(rows), zero_point)


def blocks_of(shape: tuple[int, ...], block: tuple[int, ...]) -> int:
    """Number of blocks of ``block`` (0: whole axis) in ``shape``."""
    return math.prod(n // (b or n) for n, b in zip(shape, block, strict=True))
