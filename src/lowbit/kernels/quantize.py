"""Linear quantization: integer (symmetric / asymmetric), fp8 and fp4 elements, float or E8M0 (power-of-two) scales,
over blocks of any shape. Round-half-to-even everywhere; scales are rounded to their stored dtype *before* the
elements are quantized, so decoding the stored numbers reproduces exactly what was measured.

A block shape gives, per axis, how many consecutive elements share one scale (0: the whole axis). The result's
``scale`` (and ``zero_point``) has one entry per block, laid out as the grid ``n_a / b_a`` per axis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import ml_dtypes
import numba
import numpy as np

from lowbit.errors import SkipWeight
from lowbit.kernels import check_finite
from lowbit.kernels.decode import dequantize_linear, mx_decode, value_table
from lowbit.kernels.elements import as_readable, load, worth_compiling
from lowbit.kernels.histogram import bit_values

__all__ = ["LinearQuantized", "Quantized", "element_range", "quantize_linear", "quantize_per_row"]

INTEGER_DTYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, ml_dtypes.int4, ml_dtypes.uint4))
FLOAT_ELEMENT_DTYPES = tuple(
    np.dtype(t) for t in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float4_e2m1fn)
)
E8M0_BIAS = 127


def element_range(dtype: np.dtype, symmetric: bool) -> tuple[int, int, int]:
    """(lowest code, highest code, symmetric zero point) of an integer dtype.

    Symmetric 8-bit: ``[-127, 127]`` (unsigned: the same span around 128) with zero point 0 (128). Symmetric 4-bit
    uses all 16 codes, ``[-8, 7]`` around zero point 0 (unsigned: ``[0, 15]`` around 8), the block's extreme value
    landing on the -8 side (ONNX Runtime's RTN). Asymmetric: the full range (the zero point is chosen per block).
    """
    info = ml_dtypes.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)
    if not symmetric:
        return lo, hi, 0
    half = (hi - lo) // 2  # 127 for 8 bits, 7 for 4 bits
    mid = 0 if lo < 0 else half + 1
    return (mid - half - 1 if _is_4bit(dtype) else mid - half), mid + half, mid


def _is_4bit(dtype: np.dtype) -> bool:
    return dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))


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
            raise SkipWeight(f"axis {axis} of size {n} does not divide into blocks of {b}")
    return resolved


def _stored_scale(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``raw`` (float64, > 0 where data is non-zero, 0 for all-zero blocks) in ``dtype``: finite, > 0, and rounded
    *down*. A scale a hair small saturates only the block's extreme value, by less than one ulp of the scale per
    step, while every other element gets the finer step: less error than rounding to nearest (fp16 int8 per
    channel, measured: 0.9998 vs 1.0006 of an exact float32 scale's error)."""
    info = ml_dtypes.finfo(dtype)
    wanted = np.clip(np.where(raw > 0, raw, 1.0), float(info.smallest_subnormal), float(info.max))
    stored = wanted.astype(dtype)
    above = stored.astype(np.float64) > wanted
    if above.any():
        stored[above] = np.nextafter(stored[above], np.zeros((), dtype))
    return stored


def _e8m0_exponents(amax: np.ndarray, element: np.dtype) -> np.ndarray:
    """OCP MX v1.0 shared exponent: ``floor(log2(amax)) - emax_elem``, biased by 127, clamped to [0, 254]."""
    emax = int(np.floor(np.log2(float(ml_dtypes.finfo(element).max))))
    with np.errstate(divide="ignore"):
        unbiased = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - emax, -E8M0_BIAS)
    return np.clip(unbiased + E8M0_BIAS, 0, 254).astype(np.uint8)


def _three_axes(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(outer grid, block, inner grid)`` sizes when the blocks of ``shape`` can be viewed as ``x.reshape(g0, b,
    g1)`` with one scale per ``(g0, g1)`` (every granularity of the spec on Conv/Gemm/MatMul weights), else None."""
    dims: list[tuple[str, int]] = []
    for n, b in zip(shape, block, strict=True):
        for kind, size in (("g", n // b), ("b", b)):
            if size == 1:
                continue
            if dims and dims[-1][0] == kind:
                dims[-1] = (kind, dims[-1][1] * size)
            else:
                dims.append((kind, size))
    kinds = "".join(k for k, _ in dims)
    start = "gbg".find(kinds)
    if start < 0:
        return None
    layout = [1, 1, 1]
    layout[start : start + len(dims)] = [size for _, size in dims]
    return layout[0], layout[1], layout[2]


@numba.njit(cache=True, nogil=True)
def _block_min_max(x: np.ndarray, table: np.ndarray, g1: int) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of each block of ``x`` viewed as ``(g0, b * g1)`` rows, the block of element t being t % g1."""
    g0, row = x.shape
    lo = np.full((g0, g1), np.inf)
    hi = np.full((g0, g1), -np.inf)
    for i in range(g0):
        if g1 == 1:
            low, high = np.inf, -np.inf
            for t in range(row):
                v = load(x, i, t, table)
                low = min(low, v)
                high = max(high, v)
            lo[i, 0], hi[i, 0] = low, high
            continue
        j = 0
        for t in range(row):
            v = load(x, i, t, table)
            lo[i, j] = min(lo[i, j], v)
            hi[i, j] = max(hi[i, j], v)
            j = j + 1 if j + 1 < g1 else 0
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _round_float32_bits(buf: np.ndarray, drop: int, subnormal_below: int) -> None:
    """Round float32 values in place, half to even, to a narrower float sharing float32's exponent range minus
    ``drop`` mantissa bits (fp16: 13, bf16: 16); values with biased exponent below ``subnormal_below`` land on the
    narrower type's subnormal grid (fp16: 2^-24 steps below 2^-14)."""
    if drop == 0:
        return
    bits = buf.view(np.uint32)
    half = np.uint32((1 << (drop - 1)) - 1)
    mask = np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    for t in range(buf.shape[0]):
        u = bits[t]
        if ((u >> 23) & 0xFF) < subnormal_below:
            buf[t] = np.float32(np.rint(np.float64(buf[t]) * 2.0**24) * 2.0**-24)
        else:
            bits[t] = (u + half + ((u >> drop) & 1)) & mask


@numba.njit(cache=True, nogil=True, inline="always")
def _to_element(r: np.float32, top: float, mantissa: int, min_exponent: int, sign_bit: int, per_step: float) -> int:
    """The code of the small float (fp8 / fp4: ``mantissa`` bits, smallest normal ``2^min_exponent``) nearest
    ``r``, half to even, saturating at ``top``; a negative ``r`` (-0 too) gets ``sign_bit``. ``per_step``:
    ``2^(mantissa - min_exponent)``, subnormal steps per unit, computed once by the caller (a power per element
    cost ~1.3 ns)."""
    sign = sign_bit if r.view(np.uint32) >> 31 else 0
    a = abs(np.float64(r))
    a = a if a <= top else top  # NaN too: its weight is refused afterwards, but the code must index the table
    # subnormal grid: steps of 2^(min_exponent - mantissa) (rint is half to even)
    subnormal = np.int64(np.rint(a * per_step))
    u = np.int64(np.float32(a).view(np.uint32))
    drop = 23 - mantissa
    u = (u + (1 << (drop - 1)) - 1 + ((u >> drop) & 1)) >> drop  # the float32 mantissa rounded, half to even
    normal = (((u >> mantissa) - 127 - min_exponent + 1) << mantissa) | (u & ((1 << mantissa) - 1))
    return sign | (subnormal if a * per_step < 1 << mantissa else normal)  # a rounding carry lands on the next exponent


@numba.njit(cache=True, nogil=True, inline="always")
def _encode(v, s, inv, zp, low, high, small_float, values):
    """(code, decoded float32) of value ``v`` with scale ``s`` (as :func:`_quantize_blocks` describes).
    ``small_float``: :func:`_to_element`'s (top, mantissa, min_exponent, sign_bit, per_step), mantissa 0 for
    integers, then whether ``inv`` is the scale's exact inverse."""
    top, mantissa, min_exponent, sign_bit, per_step, exact_inverse = small_float
    if mantissa == 0:
        code = min(max(np.rint(v / s) + zp, low), high)
        return np.int64(code), np.float32(code - zp) * np.float32(s)
    quotient = v * inv if exact_inverse else v / s
    c = _to_element(np.float32(quotient), top, mantissa, min_exponent, sign_bit, per_step)
    return c, values[c] * np.float32(s)


@numba.njit(cache=True, nogil=True)
def _quantize_blocks(x, table, scale, inverse, zero_point, low, high, element, values, drop, subnormal_below, q):
    """Quantize each block of ``x`` (as in :func:`_block_min_max`) and return (squared error of the decoded weight,
    energy). Integers (``element`` all zero): q = clip(rint(x / scale) + zp); small floats: the code nearest the
    float32 quotient (:func:`_to_element`; ``element``: the type's largest value, mantissa bits, smallest normal
    exponent and sign bit), decoded through ``values`` (float32 value by code). The
    decoded weight is DequantizeLinear's: the float32 product with the scale, rounded to the output float type.
    ``inverse``: ``1 / scale`` when every scale is a power of two (E8M0), so the quotient is an exact product (the
    same bits, without a division per element); else empty.

    A row is encoded in segments: with one scale per row (``g1 == 1``), chunks whose scale is read once; else one
    segment per run of ``g1`` elements, whose scales are read by position (5-21 % less time than one loop tracking
    each element's block: 4096^2 int8 and MXFP4, fp16 and fp32, measured)."""
    g0, row = x.shape
    g1 = scale.shape[1]
    top, mantissa, min_exponent, sign_bit = element[0], np.int64(element[1]), np.int64(element[2]), np.int64(element[3])
    exact_inverse = inverse.size > 0
    small_float = (top, mantissa, min_exponent, sign_bit, 2.0 ** (mantissa - min_exponent), exact_inverse)
    step = 4096 if g1 == 1 else g1
    buf = np.empty(step, np.float32)
    sse = 0.0
    energy = 0.0
    for i in range(g0):
        for start in range(0, row, step):
            stop = min(start + step, row)
            if g1 == 1:
                s, zp = scale[i, 0], zero_point[i, 0]
                inv = inverse[i, 0] if exact_inverse else 0.0
                for t in range(start, stop):
                    c, d = _encode(load(x, i, t, table), s, inv, zp, low, high, small_float, values)
                    q[i, t] = c
                    buf[t - start] = d
            else:
                for j in range(stop - start):
                    inv = inverse[i, j] if exact_inverse else 0.0
                    v = load(x, i, start + j, table)
                    c, d = _encode(v, scale[i, j], inv, zero_point[i, j], low, high, small_float, values)
                    q[i, start + j] = c
                    buf[j] = d
            _round_float32_bits(buf[: stop - start], drop, subnormal_below)
            for t in range(start, stop):
                v = load(x, i, t, table)
                d = np.float64(buf[t - start]) - v
                sse += d * d
                energy += v * v
    return sse, energy


_OUTPUT_ROUNDING = {  # (float32 mantissa bits dropped, biased float32 exponent of the smallest normal)
    np.dtype(np.float16): (13, 113),
    np.dtype(ml_dtypes.bfloat16): (16, 0),
}


def _as_float64(x: np.ndarray) -> np.ndarray:
    """float64 copy of ``x``; 16-bit floats go through a 65,536-entry table (numpy's fp16 cast is slow)."""
    return bit_values(x.dtype)[x.view(np.uint16)] if x.dtype.itemsize == 2 else x.astype(np.float64)


def _integer_params(lo, hi, dtype, symmetric, scale_dtype):
    """(stored scale, zero point as float64 or None) per block from the blocks' min and max (float64).

    Symmetric: the block's extreme value maps to the lowest code (-8 for 4 bits, whose range is one code wider
    below than above) or to the highest (8 bits), so the scale's sign follows the extreme's."""
    low, high, mid = element_range(dtype, symmetric)
    if symmetric:
        extreme = np.where(np.abs(lo) > np.abs(hi), lo, hi)
        if mid - low > high - mid:  # 4-bit: the extreme on the long side
            scale = _stored_scale(np.abs(extreme) / (mid - low), scale_dtype) * -np.sign(np.where(extreme, extreme, 1))
            scale = scale.astype(scale_dtype)
        else:
            scale = _stored_scale(np.abs(extreme) / (high - mid), scale_dtype)
        zero_point = np.full(scale.shape, float(mid)) if mid else None
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = _stored_scale((hi - lo) / (high - low), scale_dtype)
        zero_point = np.clip(np.rint(low - lo / scale.astype(np.float64)), low, high)
    return scale, zero_point


@numba.njit(cache=True, nogil=True)
def _block_errors(x, table, scale, zero_point, low, high, out):
    """Add each block's squared quantization error (float64, before output rounding) into ``out`` (``x`` as in
    :func:`_block_min_max`, ``scale`` / ``zero_point`` per block as float64)."""
    g0, row = x.shape
    g1 = scale.shape[1]
    for i in range(g0):
        j = 0
        for t in range(row):
            v = load(x, i, t, table)
            s = scale[i, j]
            code = min(max(np.rint(v / s) + zero_point[i, j], low), high)
            d = (code - zero_point[i, j]) * s - v
            out[i, j] += d * d
            j = j + 1 if j + 1 < g1 else 0


SEARCH_RATIOS = np.linspace(1.0, 0.6, 41)  # the share of each block's range kept, tried in steps of 1 %


def _searched_range(errors_of, lo, hi, dtype, symmetric, scale_dtype):
    """(lo, hi) per block shrunk by the ratio in :data:`SEARCH_RATIOS` whose parameters give the block the least
    squared error (``errors_of(scale, zero point)``, per block): clipping a few outliers buys every other element a
    finer step. Ratio 1 (plain round-to-nearest) is a candidate, so no block gets worse."""
    best = np.full(lo.shape, np.inf)
    best_ratio = np.ones(lo.shape)
    for ratio in SEARCH_RATIOS:
        scale, zero_point = _integer_params(lo * ratio, hi * ratio, dtype, symmetric, scale_dtype)
        errors = errors_of(scale.astype(np.float64), np.zeros(scale.shape) if zero_point is None else zero_point)
        better = errors < best
        best[better], best_ratio[better] = errors[better], ratio
    return lo * best_ratio, hi * best_ratio


def _compiled_for(size: int) -> bool:
    """Whether a weight of ``size`` elements goes through the compiled kernel (the numpy path gives the same
    bytes, 3-4x slower, without starting numba)."""
    return worth_compiling(size, _quantize_blocks)


def _float_scale(amax: np.ndarray, dtype: np.dtype, e8m0: bool, scale_dtype: np.dtype):
    """(stored scale, the same as float64) per block of a small-float element type from the blocks' max-abs."""
    if e8m0:
        scale = _e8m0_exponents(amax, dtype)
        return scale, np.ldexp(1.0, scale.astype(np.int64) - E8M0_BIAS)  # exact powers of two, by construction
    scale = _stored_scale(amax / float(ml_dtypes.finfo(dtype).max), scale_dtype)
    return scale, scale.astype(np.float64)


def _quantize_compiled(x, dtype, layout, resolved, symmetric, scale_dtype, e8m0, search) -> LinearQuantized:
    """:func:`quantize_linear` by the compiled kernel, for blocks that view as ``x.reshape(g0, b, g1)``."""
    out_dtype = np.dtype(x.dtype)
    g0, b, g1 = layout
    rows, table = as_readable(x.reshape(g0, b * g1))
    lo, hi = _block_min_max(rows, table, g1)
    check_finite(lo)
    check_finite(hi)
    if dtype in INTEGER_DTYPES:
        low, high, _ = element_range(dtype, symmetric)
        if search:

            def errors_of(scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
                errors = np.zeros(scale.shape)
                _block_errors(rows, table, scale, zero_point, low, high, errors)
                return errors

            lo, hi = _searched_range(errors_of, lo, hi, dtype, symmetric, scale_dtype)
        scale, zero_point = _integer_params(lo, hi, dtype, symmetric, scale_dtype)
        s64 = scale.astype(np.float64)
        elements = (low, high, np.zeros(4), np.zeros(0, np.float32))
        q = np.empty((g0, b * g1), np.int8 if element_range(dtype, False)[0] < 0 else np.uint8)
    else:
        scale, s64 = _float_scale(np.maximum(-lo, hi), dtype, e8m0, scale_dtype)
        zero_point = None
        values = value_table(dtype)
        info = ml_dtypes.finfo(dtype)
        element = np.array([float(info.max), info.nmant, info.minexp, len(values) >> 1], np.float64)
        elements = (0, 0, element, values)
        q = np.empty((g0, b * g1), np.uint8)
    drop, subnormal_below = _OUTPUT_ROUNDING.get(out_dtype, (0, 0))
    zp = np.zeros(scale.shape) if zero_point is None else zero_point
    inverse = 1.0 / s64 if e8m0 else np.zeros((0, 0))  # powers of two: exact reciprocals
    sse, energy = _quantize_blocks(rows, table, s64, inverse, zp, *elements, drop, subnormal_below, q)
    check_finite(energy)  # NaN slips through min/max comparisons, not through a sum of squares
    grid = tuple(n // b for n, b in zip(x.shape, resolved, strict=True))
    return LinearQuantized(
        q.reshape(x.shape).view(dtype),
        scale.reshape(grid),
        None if zero_point is None else zero_point.astype(np.int64).astype(dtype).reshape(grid),
        resolved,
        e8m0,
        out_dtype,
        sse,
        energy,
    )


def quantize_linear(
    x: np.ndarray,
    dtype: Any,
    block: tuple[int, ...],
    symmetric: bool = True,
    scale_dtype: Any = None,
    e8m0: bool = False,
    search: bool = False,
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
    search : integers only: per block, the clipping range (60 % to 100 % of the block's) with the least squared
        error instead of the full range (round-to-nearest).

    Raises :class:`~lowbit.errors.SkipWeight` when the blocks do not tile ``x`` or ``x`` is not finite.
    """
    dtype = np.dtype(dtype)
    out_dtype = np.dtype(x.dtype)
    scale_dtype = out_dtype if scale_dtype is None else np.dtype(scale_dtype)
    resolved = _resolve(tuple(block), x.shape)
    grid = tuple(n // b for n, b in zip(x.shape, resolved, strict=True))
    layout = _three_axes(x.shape, resolved)
    # the compiled kernel decodes to ``out_dtype``; so does DequantizeLinear when the scales are E8M0 or share it
    same_decode = dtype in INTEGER_DTYPES or e8m0 or scale_dtype == out_dtype
    if layout is not None and _compiled_for(x.size) and same_decode:
        return _quantize_compiled(x, dtype, layout, resolved, symmetric, scale_dtype, e8m0, search)
    check_finite(x)
    split = tuple(d for n, b in zip(x.shape, resolved, strict=True) for d in (n // b, b))
    inner = tuple(range(1, 2 * x.ndim, 2))
    data = _as_float64(x).reshape(split)
    zero_point = None
    if dtype in INTEGER_DTYPES:
        low, high, _ = element_range(dtype, symmetric)

        def codes(scale: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
            return np.clip(
                np.rint(data / scale.astype(np.float64)) + (0 if zero_point is None else zero_point), low, high
            )

        def errors_of(scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
            return (((codes(scale, zero_point) - zero_point) * scale - data) ** 2).sum(axis=inner, keepdims=True)

        lo, hi = data.min(axis=inner, keepdims=True), data.max(axis=inner, keepdims=True)
        if search:
            lo, hi = _searched_range(errors_of, lo, hi, dtype, symmetric, scale_dtype)
        scale, zp = _integer_params(lo, hi, dtype, symmetric, scale_dtype)
        q = codes(scale, zp)
        q = q.astype(np.int64).astype(dtype)
        zero_point = None if zp is None else zp.astype(np.int64).astype(dtype)
    elif dtype in FLOAT_ELEMENT_DTYPES:
        top = float(ml_dtypes.finfo(dtype).max)
        scale, s64 = _float_scale(np.abs(data).max(axis=inner, keepdims=True), dtype, e8m0, scale_dtype)
        q = np.clip(data / s64, -top, top).astype(np.float32).astype(dtype)
    else:
        raise ValueError(f"dtype must be an integer, fp8 or fp4 element type, got {dtype}")
    zero_point = None if zero_point is None else zero_point.reshape(grid)
    result = LinearQuantized(q.reshape(x.shape), scale.reshape(grid), zero_point, resolved, e8m0, out_dtype)
    diff = result.decode().astype(np.float64) - data.reshape(x.shape)
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
