"""Palettization of one weight in canonical layout ``[C, R]`` (output channels first): LUTs + codes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from lowbit.errors import SkipWeight
from lowbit.kernels import check_finite
from lowbit.kernels.decode import lut_decode
from lowbit.kernels.gather import gather_packed, packed_error, squared_error_and_energy
from lowbit.kernels.histogram import (
    SIXTEEN_BIT_FLOATS,
    assign_packed,
    distinct_values,
    distinct_values_any,
    squared_error,
)
from lowbit.kernels.kmeans1d import optimal_centroids
from lowbit.kernels.kmeans_vector import nearest_centers, vector_kmeans
from lowbit.kernels.packing import pack_bits, packed_nbytes, unpack_bits
from lowbit.kernels.quantize import Quantized, quantize_per_row

__all__ = ["Palettized", "palettize", "stack_palettized"]

MODES = ("kmeans", "uniform", "unique")
FP16_MAX = 65504.0
# fast mode keys weights whose largest magnitude is below this by a rescaled copy: with it at 2^-8, values down to
# 1/64 of the largest are still fp16 normals
FP16_KEY_SMALLEST = 2.0**-8


@dataclass(frozen=True)
class Palettized:
    """A palettized ``[C, R]`` weight: ``decode() = lut[group, codes] * scale[channel]``.

    ``packed``: the ``[C / cluster_dim, R]`` codes (``codes_shape``), n-bit packed as :func:`pack_bits` does.
    ``lut``: ``[G, 2**n_bits, cluster_dim]`` in the weight dtype (already dequantized when ``lut_quantized`` is set).
    ``scale``: per-channel ``[C]`` or None. ``squared_error``: sum of squared differences between ``decode()`` and
    the input, in float64.
    """

    packed: np.ndarray
    codes_shape: tuple[int, int]
    lut: np.ndarray
    scale: np.ndarray | None
    n_bits: int
    lut_quantized: Quantized | None
    squared_error: float
    energy: float  # sum of the input's squares, float64: rel-MSE = squared_error / energy

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes, the LUT (quantized where it is) and the per-channel scale."""
        lut = self.lut if self.lut_quantized is None else self.lut_quantized.q
        extra = 0 if self.lut_quantized is None else self.lut_quantized.scale.nbytes
        return self.packed.nbytes + lut.nbytes + extra + (0 if self.scale is None else self.scale.nbytes)

    @property
    def codes(self) -> np.ndarray:
        rows, cols = self.codes_shape
        return unpack_bits(self.packed, self.n_bits, rows * cols).reshape(rows, cols)

    def decode(self, out: np.ndarray | None = None) -> np.ndarray:
        """The dense ``[C, R]`` weight; written into ``out`` (C-contiguous, the LUT's dtype, ``C * R`` elements)
        when given and the LUT is scalar."""
        if self.lut.shape[2] > 1:  # vectors
            return lut_decode(self.codes, self.lut, self.scale)
        rows, cols = self.codes_shape
        flat = None if out is None else out.reshape(-1)
        dense = gather_packed(self.packed, self.n_bits, self.lut[:, :, 0], rows * cols, flat).reshape(rows, cols)
        if self.scale is not None:  # as lut_decode does: the product in the LUT's dtype
            dense = dense * np.asarray(self.scale, dtype=self.lut.dtype).reshape(-1, 1)
        return dense


def _midpoints(lut: np.ndarray) -> np.ndarray:
    table = lut.astype(np.float64)
    return (table[:, 1:] + table[:, :-1]) / 2


def _group_centroids(values, weights, offsets, k: int, mode: str, threads: int = 1) -> np.ndarray:
    """(G, k) float64 centroids, ascending, from each group's sorted distinct values."""
    if mode == "kmeans":
        return optimal_centroids(values, weights, offsets, k, threads)
    counts = np.diff(offsets)
    if mode == "uniform":
        low, high = values[offsets[:-1]], values[offsets[1:] - 1]
        return low[:, None] + (high - low)[:, None] * np.linspace(0.0, 1.0, k)[None, :]
    worst = int(counts.max())
    if worst > k:
        raise SkipWeight(f"mode='unique' needs at most {k} distinct values per LUT, found {worst}")
    return optimal_centroids(values, weights, offsets, k)  # m <= k: exactly the distinct values


def _finish_lut(centroids: np.ndarray, dtype: np.dtype, lut_dtype: np.dtype | None):
    lut = centroids.astype(dtype)
    if lut_dtype is None:
        return lut, None
    quantized = quantize_per_row(lut, lut_dtype, dtype)
    return quantized.decode().astype(dtype), quantized


def _fp16_key_scale(x: np.ndarray) -> float | None:
    """The power of two that fast mode multiplies ``x`` by before rounding it to fp16 keys: 1 for weights of
    ordinary magnitude, else one that brings the largest magnitude to [2^14, 2^15), so that tiny weights keep
    fp16's 11 significant bits (not its subnormal grid) and huge ones stay finite. None when ``x`` is not finite."""
    high = max(float(x.max(initial=0.0)), -float(x.min(initial=0.0)))
    if not np.isfinite(high):
        return None
    if high == 0.0 or FP16_KEY_SMALLEST <= high <= FP16_MAX:
        return 1.0
    return float(2.0 ** (14 - np.floor(np.log2(high))))


def _scalar(x, dtype, groups, k, n_bits, mode, fast, lut_dtype, importance, threads, lut_only=False):
    """Returns (packed codes, lut (G, k), quantized LUT, (squared error, energy) or None when to be measured);
    ``lut_only``: the codes left 0, the error not measured (None)."""
    xg = x.reshape(groups, -1)
    imp = None if importance is None else importance.reshape(groups, -1)
    exact_values = xg.dtype in SIXTEEN_BIT_FLOATS
    key_scale = 1.0 if exact_values else _fp16_key_scale(xg) if fast and mode != "unique" else None
    if key_scale is not None:
        keyed = xg if exact_values else (xg * np.float32(key_scale) if key_scale != 1.0 else xg).astype(np.float16)
        bits = keyed.view(np.uint16)
        hist = distinct_values(bits, keyed.dtype, imp)
        check_finite(hist.values)

        def assign(thresholds: np.ndarray) -> np.ndarray:
            assert hist.present is not None
            return assign_packed(bits, keyed.dtype, thresholds * key_scale, hist.present, n_bits)
    else:
        check_finite(xg)
        key_scale = 1.0
        hist = distinct_values_any(xg, imp)

        def assign(thresholds: np.ndarray) -> np.ndarray:
            rows = xg.astype(np.float64)
            codes = [np.searchsorted(t, row, side="left") for t, row in zip(thresholds, rows, strict=True)]
            return pack_bits(np.stack(codes), n_bits)

    values, weights, offsets, _ = hist
    centroids = _group_centroids(values, weights, offsets, k, mode, threads) / key_scale
    lut, quantized = _finish_lut(centroids, dtype, lut_dtype)
    if lut_only:
        return np.zeros(packed_nbytes(xg.size, n_bits), np.uint8), lut, quantized, None
    thresholds = _midpoints(lut)
    packed = assign(thresholds)
    measured = None
    if exact_values and imp is None:  # the histogram holds every value: error and energy are exact from it
        sse = float(squared_error(values, weights, offsets, lut, thresholds).sum())
        measured = (sse, float(np.dot(weights, values * values)))
    return packed, lut, quantized, measured


def _vector(x, dtype, groups, k, cd, mode, lut_dtype, seed, importance):
    channels, r = x.shape
    points = x.reshape(channels // cd, cd, r).transpose(0, 2, 1).reshape(groups, -1, cd).astype(np.float64)
    imp = None
    if importance is not None:
        imp = importance.reshape(channels // cd, cd, r).transpose(0, 2, 1).reshape(groups, -1, cd).sum(axis=2)
    if mode == "uniform":
        raise SkipWeight("mode='uniform' is scalar only; use cluster_dim=1")
    centers = []
    for g in range(groups):
        c = vector_kmeans(points[g], k, seed + g, None if imp is None else imp[g])
        if mode == "unique" and len(np.unique(points[g], axis=0)) > k:
            raise SkipWeight(f"mode='unique' needs at most {k} distinct vectors per LUT")
        centers.append(c)
    lut, quantized = _finish_lut(np.stack(centers), dtype, lut_dtype)
    table = lut.astype(np.float64)
    codes = np.empty(points.shape[:2], np.uint8)
    for g in range(groups):
        codes[g] = nearest_centers(points[g], table[g])
    return codes, lut, quantized


def palettize(
    w: np.ndarray,
    n_bits: int,
    groups: int = 1,
    cluster_dim: int = 1,
    mode: str = "kmeans",
    per_channel_scale: bool = False,
    fast: bool = True,
    lut_dtype: np.dtype | None = None,
    importance: np.ndarray | None = None,
    seed: int = 0,
    threads: int = 1,
    lut_only: bool = False,
) -> Palettized:
    """Palettize ``w`` (``[C, R]``, float) with ``groups`` LUTs of ``2**n_bits`` entries.

    Parameters
    ----------
    w : the weight, output channels first; finite values.
    n_bits : bits per code (1..8).
    groups : number of LUTs; each serves ``C / groups`` consecutive channels (``C`` must divide).
    cluster_dim : LUT entries are vectors of this many consecutive output channels.
    mode : ``"kmeans"`` (optimal, exact 1-D dynamic program for scalars), ``"uniform"``, ``"unique"``.
    per_channel_scale : divide each channel by its max-abs first; decode multiplies it back.
    fast : cluster fp32 values rounded to fp16 (16-bit weights, and mode "unique", always use the exact values).
    lut_dtype : quantize LUT entries to int8/uint8/fp8 with one scale per LUT (None: weight dtype).
    importance : optional per-element non-negative weights of the squared error (sensitivity).
    seed : seed of vector k-means++.
    threads : threads for the per-group k-means (the result does not depend on it).
    lut_only : scalar LUTs only (default False): the LUTs (and scales) alone, for a caller that chooses every code
        itself (error feedback): the codes are left 0 and ``squared_error`` is NaN; ``energy`` is measured.

    Raises :class:`~lowbit.errors.SkipWeight` when the weight cannot be palettized as asked.
    """
    if w.ndim != 2:
        raise SkipWeight(f"expected a [C, R] array, got shape {w.shape}")
    channels = w.shape[0]
    if channels % groups or (channels // groups) % cluster_dim:
        raise SkipWeight(f"{channels} channels do not split into {groups} LUT(s) of vectors of {cluster_dim}")
    dtype, k = w.dtype, 1 << n_bits
    scale = None
    x = w
    if per_channel_scale:
        amax = np.abs(w.astype(np.float32)).max(axis=1)
        scale = np.where(amax > 0, amax, 1).astype(dtype)
        x = (w.astype(np.float32) / scale.astype(np.float32)[:, None]).astype(dtype)
    measured = None
    if cluster_dim == 1:
        packed, lut, quantized, measured = _scalar(
            x, dtype, groups, k, n_bits, mode, fast, lut_dtype, importance, threads, lut_only
        )
        codes_shape = (channels, x.size // channels)
        lut = lut.reshape(groups, k, 1)
        if quantized is not None:
            quantized = replace(quantized, q=quantized.q.reshape(groups, k, 1))
    else:
        check_finite(x)
        codes, lut, quantized = _vector(x, dtype, groups, k, cluster_dim, mode, lut_dtype, seed, importance)
        packed = pack_bits(codes, n_bits)
        codes_shape = (channels // cluster_dim, x.size // channels)
    result = Palettized(packed, codes_shape, lut, scale, n_bits, quantized, 0.0, 0.0)
    if lut_only and cluster_dim == 1:
        measured = (float("nan"), squared_error_and_energy(w, w)[1])
    elif measured is None or scale is not None:  # not exact from the histogram: measure against the input
        if scale is None and cluster_dim == 1 and w.dtype in (np.float32, np.float64):
            measured = packed_error(packed, n_bits, lut[:, :, 0], w)  # straight from the codes, no decoded copy
        else:
            measured = squared_error_and_energy(result.decode(), w)
    return replace(result, squared_error=measured[0], energy=measured[1])


def stack_palettized(parts: list[Palettized], rows: int) -> Palettized:
    """One :class:`Palettized` of ``rows`` code rows from ``parts`` over consecutive channel ranges (their LUT groups
    in order); rows past the parts' own are padding: code 0, scale 1, outside the error. A ragged last LUT group
    is stored this way, as equal groups whose padding the decode slices off."""
    first = parts[0]
    cols = first.codes_shape[1]
    codes = np.zeros((rows, cols), np.uint8)
    start = 0
    for part in parts:
        codes[start : start + part.codes_shape[0]] = part.codes
        start += part.codes_shape[0]
    scale = None
    if first.scale is not None:
        cd = first.lut.shape[2]
        scale = np.ones(rows * cd, first.scale.dtype)
        scale[: start * cd] = np.concatenate([p.scale for p in parts if p.scale is not None])
    quantized = None
    if first.lut_quantized is not None:
        pieces = [p.lut_quantized for p in parts if p.lut_quantized is not None]
        zero_points = [q.zero_point for q in pieces if q.zero_point is not None]
        quantized = replace(
            first.lut_quantized,
            q=np.concatenate([q.q for q in pieces]),
            scale=np.concatenate([q.scale for q in pieces]),
            zero_point=np.concatenate(zero_points) if zero_points else None,
        )
    return Palettized(
        pack_bits(codes, first.n_bits),
        (rows, cols),
        np.concatenate([p.lut for p in parts]),
        scale,
        first.n_bits,
        quantized,
        sum(p.squared_error for p in parts),
        sum(p.energy for p in parts),
    )
