"""The weight layer's results as Core AI decode ops, the ones coreai-opt writes (so that Core AI's runtimes run
them), in place of a weight constant.

- palettized: ``lut_to_dense(indices ui<n>, lut, axis)`` (indices in the weight's own layout, packed LSB-first;
  LUT ``[groups at the output axis, 1..., 2^n, cluster_dim]``); a quantized LUT is decoded first by
  ``blockwise_shift_scale``; a per-channel scale multiplies the result (``broadcasting_mul``); outliers
  (``outlier_fraction``) are put back by ``scatter_nd`` (their coordinates ``[count, rank]``, int16 when every
  dim fits, and their values in the weight's type);
- quantized: ``blockwise_shift_scale(q, scale, offset1, offset2)``, ``scale`` one per block, ``offset1`` the zero
  point (a splat zero when symmetric), ``offset2`` a splat zero; MXFP4 is packed ``f4E2M1FN`` codes with
  ``f8E8M0FNU`` scales;
- sparse: 1-D non-zeros + a packed ``ui1`` mask -> ``build_sparse_with_bitmask`` -> ``sparse_with_bitmask_to_dense``,
  the non-zeros themselves from a LUT, or int8 codes then ``blockwise_shift_scale`` per output channel;
- a ragged last LUT group or block is decoded padded and cut by ``slice``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lowbit.coreai import _mlir, discovery
from lowbit.coreai.discovery import CoreAIWeight
from lowbit.kernels.packing import packed_nbytes
from lowbit.kernels.palettize import Palettized
from lowbit.kernels.quantize import LinearQuantized
from lowbit.weights import PalettizedWeight, QuantizedWeight, SparsifiedWeight

__all__ = ["stored_nbytes", "write"]

Value = Any


def _zero(shape: tuple[int, ...], element: str) -> Value:
    return _mlir.splat(0, shape, element)


def _sliced(value: Value, shape: tuple[int, ...]) -> Value:
    """``value`` cut to ``shape`` (a padded decode's leading part)."""
    full = _mlir.tensor_shape(value)
    assert full is not None
    if full == tuple(shape):
        return value
    rank = len(shape)
    return _mlir.ops.slice_(value, np.zeros(rank, np.int32), np.array(shape, np.int32), np.ones(rank, np.int32))


def _per_axis(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A 1-D array laid along ``axis`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


def _dequantized(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, out: str) -> Value:
    """``blockwise_shift_scale`` of constant codes ``q`` with a ``scale`` grid of ``q``'s rank."""
    data = _mlir.constant(q, "q", _code_element(q))
    element = _code_element(q)
    offset1 = (
        _zero(scale.shape, element)
        if zero_point is None or not zero_point.any()
        else (_mlir.constant(zero_point.astype(q.dtype), "zero_point", element))
    )
    scale_element = "f8E8M0FNU" if scale.dtype == np.uint8 else None
    scales = _mlir.constant(scale, "scale", scale_element)
    return _mlir.ops.blockwise_shift_scale(data, scales, offset1, _zero(scale.shape, out))


def _code_element(q: np.ndarray) -> str:
    return _mlir.element_name(q.dtype)


def _lut_decode(p: Palettized, index_shape: tuple[int, ...], axis: int, out: str, codes: np.ndarray) -> Value:
    """``lut_to_dense`` of ``codes`` (in ``index_shape``) over ``p``'s LUTs, grouped along ``axis``."""
    groups, k, vector = p.lut.shape
    rank = len(index_shape)
    lut_shape = (*(groups if a == axis else 1 for a in range(rank)), k, vector)
    indices = _mlir.constant(codes, "indices", f"ui{p.n_bits}")
    if p.lut_quantized is None:
        lut = _mlir.constant(p.lut.reshape(lut_shape), "lut", out)
    else:
        quantized = p.lut_quantized
        scale = quantized.scale.reshape((*lut_shape[:-2], 1, 1))
        zero_point = None if quantized.zero_point is None else quantized.zero_point.reshape(scale.shape)
        lut = _dequantized(quantized.q.reshape(lut_shape), scale, zero_point, out)
    return _mlir.ops.lut_to_dense(indices, lut, _mlir.scalar(axis, "si16"))


def _palettized(ref: CoreAIWeight, weight: PalettizedWeight, out: str) -> Value:
    value = _lut_decoded(ref, weight, out)
    if weight.outliers is None:
        return value
    coordinates = np.stack(np.unravel_index(weight.outliers.positions, ref.shape), axis=1)
    indices = _mlir.constant(coordinates.astype(_index_dtype(ref.shape)), "outlier_positions")
    return _mlir.ops.scatter_nd(value, indices, _mlir.constant(weight.outliers.values, "outlier_values", out))


def _index_dtype(shape: tuple[int, ...]) -> type[np.signedinteger]:
    """The outliers' coordinates' type: int16 when every dim fits it, else int32."""
    return np.int16 if max(shape) <= np.iinfo(np.int16).max + 1 else np.int32


def _lut_decoded(ref: CoreAIWeight, weight: PalettizedWeight, out: str) -> Value:
    """The LUT decode of ``weight`` (its outliers aside), per-channel scale included."""
    p = weight.palettized
    vector = p.lut.shape[2]
    padded = weight.padded_shape  # canonical: the grouping (output) axis first
    canonical_codes = p.codes.reshape((padded[0] // vector, *padded[1:]))
    codes = canonical_codes.transpose(weight.back)  # the weight's own layout, output axis shortened by the vectors
    own_padded = tuple(padded[i] for i in weight.back)
    value = _lut_decode(p, codes.shape, ref.output_axis, out, np.ascontiguousarray(codes))
    assert _mlir.tensor_shape(value) == own_padded
    value = _sliced(value, ref.shape)
    if p.scale is not None:  # as the kernel decodes: the product in the LUT's dtype
        scale = _per_axis(
            np.asarray(p.scale, p.lut.dtype)[: ref.shape[ref.output_axis]], len(ref.shape), ref.output_axis
        )
        value = _mlir.ops.broadcasting_mul(value, _mlir.constant(scale, "channel_scale", out))
    return value


def _grid(q: LinearQuantized) -> tuple[int, ...]:
    """The scale grid of ``q``: one entry per block, of ``q``'s rank (as ``blockwise_shift_scale`` takes it)."""
    return tuple(n // b for n, b in zip(q.q.shape, q.block, strict=True))


def _quantized(ref: CoreAIWeight, weight: QuantizedWeight, out: str) -> Value:
    q: LinearQuantized = weight.quantized
    grid = _grid(q)
    zero_point = None if q.zero_point is None else q.zero_point.reshape(grid)
    value = _dequantized(q.q, q.scale.reshape(grid), zero_point, out)
    return _sliced(value, ref.shape)


def _sparse(ref: CoreAIWeight, weight: SparsifiedWeight, out: str) -> Value:
    s = weight.sparsified
    mask = _mlir.constant(s.mask.astype(np.uint8), "mask", "ui1")
    if s.palettized is not None:
        p = s.palettized
        count = p.codes_shape[1]
        values = _lut_decode(p, (count,), 0, out, p.codes.reshape(count))
    elif s.quantized is not None:
        codes = _mlir.constant(s.stored_codes, "codes")
        dense_codes = _mlir.ops.sparse_with_bitmask_to_dense(_mlir.ops.build_sparse_with_bitmask(codes, mask))
        scale = s.quantized.scale.reshape(
            tuple(n // b for n, b in zip(s.quantized.q.shape, s.quantized.block, strict=True))
        )
        scales = _mlir.constant(scale, "scale")
        return _mlir.ops.blockwise_shift_scale(dense_codes, scales, _zero(scale.shape, "si8"), _zero(scale.shape, out))
    else:
        assert s.values is not None
        values = _mlir.constant(s.values, "values")
    return _mlir.ops.sparse_with_bitmask_to_dense(_mlir.ops.build_sparse_with_bitmask(values, mask))


_WRITERS: dict[type, Callable[[CoreAIWeight, Any, str], Value]] = {
    PalettizedWeight: _palettized,
    QuantizedWeight: _quantized,
    SparsifiedWeight: _sparse,
}


def write(ref: CoreAIWeight, result: Any) -> int:
    """Replace the constant of ``ref`` by the decode ops of ``result`` (a weight-layer result); returns the bytes
    they store."""
    out = _mlir.element_name(ref.dtype) if ref.dtype is not None else "f32"
    return discovery.stored_nbytes(_mlir.replace(ref.constant, lambda: _WRITERS[type(result)](ref, result, out)))


def stored_nbytes(result: Any) -> int:
    """Bytes ``result`` takes in a Core AI program: the weight layer's count (packed codes, tables, scales), plus
    the zero points of a quantized LUT, which the weight layer does not count, and the outliers' coordinates in
    place of the weight layer's flat int32 positions."""
    nbytes = result.nbytes
    if not isinstance(result, PalettizedWeight):
        return nbytes
    zero_point = None if result.palettized.lut_quantized is None else result.palettized.lut_quantized.zero_point
    if zero_point is not None:
        nbytes += packed_nbytes(zero_point.size, 8)
    if result.outliers is not None:
        positions = result.outliers.positions
        coordinates = positions.size * len(result.shape) * np.dtype(_index_dtype(result.shape)).itemsize
        nbytes += coordinates - positions.nbytes
    return nbytes
