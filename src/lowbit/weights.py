"""The weight layer: everything about compressing one weight, given as an array and its channel axes.

Both front ends call it: the ONNX passes (discover -> read -> here -> write) and the torch palettizers (modules ->
here -> parameters). It decides the LUT groups and the layout the kernels see, the per-weight seed, the checks that
refuse a weight (always a :class:`~lowbit.errors.SkipWeight`), and the relative error that goes into the report.
It imports neither onnx nor torch, so the same array gives the same bytes through either door.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lowbit.config import PalettizeConfig, QuantizeConfig, SparsifyConfig, block_shape
from lowbit.errors import SkipWeight
from lowbit.kernels.feedback import BLOCK, Select, linear_grid, lut_grid, ordered_feedback, pruning_grid
from lowbit.kernels.layout import swapped
from lowbit.kernels.packing import pack_bits, packed_nbytes
from lowbit.kernels.palettize import Palettized, palettize, stack_palettized
from lowbit.kernels.prune import Sparsified, block_mask, column_mask, magnitude_mask, n_m_mask, sparsify
from lowbit.kernels.quantize import LinearQuantized, element_range, quantize_linear
from lowbit.outliers import Outliers, choose_outliers, outliers_of, sensitivity_of
from lowbit.types import FLOAT_WEIGHT_DTYPES, CompressionGranularity, DType, QScheme

__all__ = [
    "PalettizedWeight",
    "QuantizedWeight",
    "SparsifiedWeight",
    "check_eligible",
    "moved_axis_perms",
    "palettize_weight",
    "quantize_weight",
    "sparsify_weight",
]


def moved_axis_perms(rank: int, axis: int, to_front: bool = True) -> tuple[list[int], list[int]]:
    """(perm into canonical layout, perm back to the original) when ``axis`` moves to the front (or the end)."""
    others = [a for a in range(rank) if a != axis]
    forward = [axis, *others] if to_front else [*others, axis]
    return forward, [int(i) for i in np.argsort(forward)]


def check_eligible(
    shape: Sequence[int], dtype: np.dtype | None, threshold: int, threshold_name: str = "weight_num_threshold"
) -> None:
    """Raise :class:`SkipWeight` when a weight of this ``shape`` and ``dtype`` is not to be compressed: not a
    float32/float16/bfloat16 weight (warned), or at most ``threshold`` elements (not warned: small weights are
    left alone on purpose). Checked before a weight's data is read."""
    if dtype is None or np.dtype(dtype) not in FLOAT_WEIGHT_DTYPES:
        shown = "unknown" if dtype is None else np.dtype(dtype).name
        raise SkipWeight(f"dtype {shown} is not float32/float16/bfloat16")
    numel = math.prod(shape)
    if numel <= threshold:
        raise SkipWeight(f"{numel} elements <= {threshold_name} {threshold}", warn=False)


def _relative(squared_error: float, energy: float) -> float:
    return squared_error / energy if energy > 0 else 0.0


# ------------------------------------------------------------------------------------------------ palettization


@dataclass(frozen=True)
class PalettizedWeight:
    """A palettized weight of shape ``shape``: the kernel's :class:`~lowbit.kernels.palettize.Palettized` over the
    canonical view ``array.transpose(forward).reshape(C, -1)`` (the grouping axis first). With a ragged last LUT
    group the kernel's codes cover ``padded_shape`` (the channel axis rounded up to whole groups)."""

    shape: tuple[int, ...]
    forward: tuple[int, ...]
    palettized: Palettized
    outliers: Outliers | None = None  # elements kept exact beside the LUTs (``outlier_fraction``)

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.forward)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """``canonical_shape`` with the channel axis as the codes cover it (longer when the last group is ragged)."""
        channels = self.palettized.codes_shape[0] * self.palettized.lut.shape[2]
        return (channels, *self.canonical_shape[1:])

    @property
    def back(self) -> tuple[int, ...]:
        """The perm from the canonical layout back to the weight's."""
        return tuple(int(i) for i in np.argsort(self.forward))

    @property
    def rel_mse(self) -> float:
        return _relative(self.palettized.squared_error, self.palettized.energy)

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed form: packed codes, the LUT (quantized where it is), the per-channel scale and
        the outliers."""
        return self.palettized.nbytes + (0 if self.outliers is None else self.outliers.nbytes)

    def decode(self) -> np.ndarray:
        """The dense weight, in the weight's own layout and dtype (outliers included)."""
        channels = self.canonical_shape[0]
        dense = self.palettized.decode().reshape(self.padded_shape)[:channels].transpose(self.back)
        return dense if self.outliers is None else self.outliers.applied(dense)

    def without_outliers(self) -> PalettizedWeight:
        """The LUTs and codes alone (what ``lut_to_dense`` decodes before the outliers are added)."""
        return dataclasses.replace(self, outliers=None)

    def decode_into(self, out: np.ndarray) -> None:
        """Write the dense weight into ``out`` (the weight's shape and dtype), decoding in place when the layout
        allows (a C-contiguous ``out`` in the kernel's own layout)."""
        in_place = out.flags.c_contiguous and self.forward == tuple(range(out.ndim)) and self.palettized.scale is None
        in_place = in_place and self.outliers is None
        in_place = in_place and self.padded_shape == self.canonical_shape
        if in_place and out.dtype == self.palettized.lut.dtype and self.palettized.lut.shape[2] == 1:
            self.palettized.decode(out=out)
        else:
            out[...] = self.decode()

    def permuted(self, perm: Sequence[int]) -> PalettizedWeight:
        """The same compression, seen as a compression of ``array.transpose(perm)`` (e.g. an exporter's transposed
        copy of the weight): codes and LUTs are unchanged, only the layout bookkeeping moves."""
        inverse = np.argsort(perm)
        outliers = None if self.outliers is None else self.outliers.permuted(self.shape, tuple(perm))
        return PalettizedWeight(
            tuple(self.shape[a] for a in perm), tuple(int(inverse[a]) for a in self.forward), self.palettized, outliers
        )


def _transposed(array: np.ndarray, perm: Sequence[int]) -> np.ndarray:
    """C-contiguous ``array.transpose(perm)``: a 2-D swap in tiles (:func:`~lowbit.kernels.layout.swapped`). A
    memory-mapped array is read in its own order first: a transposing copy straight from the mapping faults its
    pages in out of order (measured on a 4096 x 11008 fp16 weight: 0.40 s, against 0.11 s to read it)."""
    if list(perm) == sorted(perm):
        return np.ascontiguousarray(array)
    if _memory_mapped(array):
        array = np.array(array)
    return swapped(array) if list(perm) == [1, 0] else np.ascontiguousarray(array.transpose(perm))


def _memory_mapped(array: np.ndarray) -> bool:
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)


def _lut_groups(channels: int, config: PalettizeConfig) -> tuple[int, int]:
    """(LUTs, channels per LUT) for the ``channels`` of the grouping axis; the last LUT of ``group_size`` channels
    may have fewer. :class:`SkipWeight` when they do not split into ``cluster_dim`` vectors."""
    if channels % config.cluster_dim:
        raise SkipWeight(f"{channels} output channels do not divide by cluster_dim {config.cluster_dim}")
    if config.granularity == CompressionGranularity.PER_TENSOR:
        return 1, channels
    if config.granularity == CompressionGranularity.PER_CHANNEL:
        return channels // config.cluster_dim, config.cluster_dim
    if config.group_size % config.cluster_dim:
        raise SkipWeight(f"group_size {config.group_size} does not divide by cluster_dim {config.cluster_dim}")
    per_group = min(config.group_size, channels)
    return -(-channels // per_group), per_group


def _palettize_layout(rank: int, axis: int, config: PalettizeConfig) -> list[int]:
    """The perm into the kernel's channel-first layout. One scalar LUT for the whole tensor has no channel
    structure: the weight keeps its own layout and the transpose (a copy) is saved."""
    single_lut = config.granularity == CompressionGranularity.PER_TENSOR and config.cluster_dim == 1
    if single_lut and not config.enable_per_channel_scale:
        return list(range(rank))
    return moved_axis_perms(rank, axis)[0]


MIN_DAMPING = 1e-6


def _damped(importance: np.ndarray, groups: int, damping: float) -> np.ndarray:
    """``importance + damping * mean`` per LUT group: a few outlying sensitivities then cannot drag every centroid
    to themselves, and every value keeps some weight (a group whose importance is all zero falls back to plain
    k-means instead of having no values)."""
    imp = np.nan_to_num(np.abs(importance.astype(np.float64)), nan=0.0, posinf=0.0).reshape(groups, -1)
    mean = imp.mean(axis=1, keepdims=True)
    floor = np.where(mean > 0, mean * max(damping, MIN_DAMPING), 1.0)
    return (imp + floor).reshape(importance.shape)


def palettize_weight(
    array: np.ndarray,
    output_axis: int,
    config: PalettizeConfig,
    name: str = "",
    importance: np.ndarray | None = None,
    threads: int = 1,
    damping: float = 0.0,
    gram: np.ndarray | None = None,
) -> PalettizedWeight:
    """Palettize one weight as ``config`` says.

    Parameters
    ----------
    array : the weight, float32 / float16 / bfloat16, in its own layout.
    output_axis : the axis whose channels share a LUT in groups (``granularity``) and form LUT vectors
        (``cluster_dim``).
    config : the :class:`~lowbit.config.PalettizeConfig`.
    name : the weight's name; seeds vector k-means, so the same name and values give the same bytes.
    importance : optional per-element non-negative sensitivity, ``array``'s shape: the k-means minimizes the
        importance-weighted squared error (sensitive k-means).
    threads : threads for the per-group k-means; the result does not depend on it.
    damping : with ``importance``: each LUT group's mean importance times ``damping`` is added to every element's
        (default 0: none, beyond a 1e-6 floor that keeps every value in play).
    gram : optional ``X^T X`` of a 2-D weight's input activations (input channels x input channels): the codes are
        then chosen with error feedback across the input channels (:mod:`lowbit.kernels.feedback`), the LUTs kept,
        so that the layer's output error is minimized. Scalar LUTs without per-channel scale only; otherwise
        ignored.

    Raises :class:`~lowbit.errors.SkipWeight` when the channels do not split into the configured groups or
    vectors, the values are not finite, or ``mode="unique"`` finds too many distinct values.
    """
    axis = output_axis % array.ndim
    channels = array.shape[axis]
    groups, per_group = _lut_groups(channels, config)
    forward = _palettize_layout(array.ndim, axis, config)
    moved = _transposed(array, forward)
    canonical = moved.reshape(moved.shape[0], -1)
    imp = None
    if importance is not None:
        moved_importance = np.ascontiguousarray(importance.transpose(forward)).reshape(canonical.shape)
        imp = moved_importance
    rows = canonical.shape[0]  # the channels, or (one LUT, own layout) the weight's first axis
    full = channels // per_group * per_group  # the channels of whole groups; a ragged last group is solved alone
    parts = [(0, full, full // per_group), (full, channels, 1)] if full < channels else [(0, rows, groups)]
    checked = _checked_gram(gram, array.shape[1 - axis]) if array.ndim == 2 else None
    feedback = checked is not None and config.cluster_dim == 1 and not config.enable_per_channel_scale
    outputs_first = forward[0] == axis

    def solve(start: int, stop: int, lut_groups: int) -> Palettized:
        part_importance = None if imp is None else _damped(imp[start:stop], lut_groups, damping)
        return palettize(
            canonical[start:stop],
            n_bits=config.n_bits,
            groups=lut_groups,
            cluster_dim=config.cluster_dim,
            mode=config.mode,
            per_channel_scale=config.enable_per_channel_scale,
            fast=config.enable_fast_kmeans_mode,
            lut_dtype=None if config.lut_dtype is None else config.lut_dtype.numpy,
            importance=part_importance,
            seed=zlib.crc32(name.encode()) + start,
            threads=threads,
        )

    def solved(exact: np.ndarray | None = None) -> tuple[PalettizedWeight, np.ndarray | None]:
        """The palettization (error feedback included) and, with ``exact``, the values feedback ends with."""
        parts_solved = [solve(*part) for part in parts if part[1] > part[0]]
        stacked = groups * per_group // config.cluster_dim
        result = parts_solved[0] if len(parts_solved) == 1 else stack_palettized(parts_solved, stacked)
        weight = PalettizedWeight(tuple(array.shape), tuple(forward), result)
        if not feedback:
            return weight, None
        assert checked is not None
        view = canonical[:channels] if outputs_first else canonical
        return _with_feedback(weight, view, checked, per_group, outputs_first, exact)

    weight, _ = solved()
    if not config.outlier_fraction:
        return weight
    sensitivity = sensitivity_of(importance, checked if feedback else None, axis)
    mask = choose_outliers((array.astype(np.float64) - weight.decode()) ** 2 * sensitivity, config.outlier_fraction)
    by_canonical = mask.transpose(forward).reshape(canonical.shape)
    imp = (np.ones(canonical.shape) if imp is None else imp) * ~by_canonical  # the LUTs fit the rest
    exact = (by_canonical[:channels] if outputs_first else by_canonical) if feedback else None  # as solved's view
    weight, values = solved(exact)
    target = array if values is None else values.reshape(moved.shape).transpose(weight.back)
    with_outliers = dataclasses.replace(weight, outliers=outliers_of(target.astype(array.dtype), mask))
    error = with_outliers.decode().astype(np.float64) - array.astype(np.float64)
    palettized = dataclasses.replace(weight.palettized, squared_error=float(np.vdot(error, error)))
    return dataclasses.replace(with_outliers, palettized=palettized)


def _by_input(a: np.ndarray, input_axis: int) -> np.ndarray:
    """A 2-D weight (or a grid of its shape) with its input channels first, or back (the view is its own
    inverse)."""
    return a.T if input_axis == 1 else a


def _checked_gram(gram: np.ndarray | None, channels: int) -> np.ndarray | None:
    """``gram`` when it is a finite ``channels x channels`` matrix; ``ValueError`` naming the sizes otherwise."""
    if gram is None:
        return None
    if np.shape(gram) != (channels, channels):
        raise ValueError(f"gram must be {channels} x {channels} (the weight's input channels), got {np.shape(gram)}")
    if not np.isfinite(gram).all():
        raise ValueError("gram (X^T X of the calibration activations) is not finite")
    return gram


def _with_feedback(
    weight: PalettizedWeight,
    canonical: np.ndarray,
    gram: np.ndarray,
    per_group: int,
    outputs_first: bool,
    exact: np.ndarray | None = None,
) -> tuple[PalettizedWeight, np.ndarray]:
    """``weight`` (2-D, scalar LUTs) with its codes re-chosen by error feedback over the input channels; LUTs
    unchanged. ``canonical``: the kernel's 2-D view, output channels first (``outputs_first``) or, one LUT for the
    whole weight, input channels first. ``exact``: a mask over ``canonical`` of elements kept as they are (outliers:
    no rounding error to feed on). Also returns the values the feedback ends with (``canonical``'s layout)."""
    p = weight.palettized
    by_input = canonical.T if outputs_first else canonical  # [input channels, output channels]
    outputs = by_input.shape[1]
    group = np.arange(outputs) // per_group if outputs_first else np.zeros(outputs, np.int64)
    luts = p.lut[group, :, 0]  # each output channel's LUT
    grid = lut_grid(luts, None if exact is None else exact.T if outputs_first else exact)
    codes, values = ordered_feedback(by_input, gram, grid)
    diff = values - by_input.astype(np.float64)
    all_codes = p.codes.copy()
    laid_out = codes.T if outputs_first else codes
    all_codes[: laid_out.shape[0]] = laid_out
    updated = dataclasses.replace(
        p, packed=pack_bits(all_codes.astype(np.uint8), p.n_bits), squared_error=float(np.vdot(diff, diff))
    )
    return PalettizedWeight(weight.shape, weight.forward, updated), values.T if outputs_first else values


# ------------------------------------------------------------------------------------------------- quantization


@dataclass(frozen=True)
class QuantizedWeight:
    """A linearly quantized weight in its own layout (:class:`~lowbit.kernels.quantize.LinearQuantized`). With a
    ragged last block, ``quantized`` covers the weight zero-padded along the blocked axis to whole blocks (zeros
    change no block's scale and cost no error) and ``shape`` is the weight's own."""

    quantized: LinearQuantized
    shape: tuple[int, ...]

    @property
    def rel_mse(self) -> float:
        return _relative(self.quantized.squared_error, self.quantized.energy)

    @property
    def codes_nbytes(self) -> int:
        """Bytes of the packed codes alone."""
        q = self.quantized.q
        return packed_nbytes(q.size, DType.of(q.dtype).bits)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored form: packed codes, scales and zero points."""
        q = self.quantized
        zero_points = 0 if q.zero_point is None else packed_nbytes(q.zero_point.size, DType.of(q.q.dtype).bits)
        return self.codes_nbytes + q.scale.nbytes + zero_points

    @property
    def trim(self) -> tuple[int, int] | None:
        """(axis, length) that cuts the padded decode back to ``shape`` (None: not padded)."""
        padded = self.quantized.q.shape
        axis = next((a for a, (n, m) in enumerate(zip(padded, self.shape, strict=True)) if n != m), None)
        return None if axis is None else (axis, self.shape[axis])

    def decode(self) -> np.ndarray:
        return np.ascontiguousarray(self.quantized.decode()[tuple(slice(0, n) for n in self.shape)])


def quantize_weight(
    array: np.ndarray, output_axis: int, input_axis: int, config: QuantizeConfig, gram: np.ndarray | None = None
) -> QuantizedWeight:
    """Quantize one weight as ``config`` says: one scale per tensor, per ``output_axis`` channel, or per channel
    and ``block_size`` elements along ``input_axis`` (the last block may be shorter). ``gram``: optional ``X^T X``
    of a 2-D weight's input activations: the integer codes are then chosen with error feedback across the input
    channels (GPTQ's), the scales kept (integer dtypes; otherwise ignored).

    Raises :class:`~lowbit.errors.SkipWeight` when the values are not finite.
    """
    padded = array
    block_size = min(config.block_size, array.shape[input_axis])  # an axis shorter than a block is one block
    if config.granularity == CompressionGranularity.PER_BLOCK and array.shape[input_axis] % block_size:
        short = -array.shape[input_axis] % block_size
        padded = np.pad(array, [(0, short if a == input_axis else 0) for a in range(array.ndim)])
    block = block_shape(config.granularity, array.ndim, output_axis, input_axis, block_size)
    symmetric = config.qscheme == QScheme.SYMMETRIC
    quantized = quantize_linear(
        padded, config.dtype.numpy, block, symmetric=symmetric, e8m0=config.e8m0, search=config.scale_search
    )
    integer = config.dtype in (DType.INT8, DType.UINT8, DType.INT4, DType.UINT4)
    checked = _checked_gram(gram, array.shape[input_axis]) if array.ndim == 2 else None
    if checked is not None and integer:
        quantized = _quantized_with_feedback(quantized, padded, checked, input_axis, symmetric)
        diff = quantized.decode()[tuple(slice(0, n) for n in array.shape)].astype(np.float64) - array
        quantized = dataclasses.replace(quantized, squared_error=float(np.vdot(diff, diff)))
    return QuantizedWeight(quantized, tuple(array.shape))


def _quantized_with_feedback(
    q: LinearQuantized, padded: np.ndarray, gram: np.ndarray, input_axis: int, symmetric: bool
) -> LinearQuantized:
    """``q``'s codes re-chosen by error feedback over the input channels (axis ``input_axis`` of a 2-D weight),
    its scales and zero points kept."""
    low, high, _ = element_range(q.q.dtype, symmetric)

    def per_element(grid: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(grid.reshape(q.grid_shape()[::2]), q.block[0], 0), q.block[1], 1)

    scale = per_element(q.scale.astype(np.float64))
    zero_point = np.zeros_like(scale) if q.zero_point is None else per_element(q.zero_point.astype(np.float64))
    channels = padded.shape[input_axis]
    full = np.zeros((channels, channels))
    full[: len(gram), : len(gram)] = gram  # padding channels: never active
    grid = linear_grid(_by_input(scale, input_axis), _by_input(zero_point, input_axis), low, high)
    codes = _by_input(ordered_feedback(_by_input(padded, input_axis), full, grid)[0], input_axis)
    return dataclasses.replace(q, q=codes.astype(q.q.dtype))


# ------------------------------------------------------------------------------------------------ sparsification


@dataclass(frozen=True)
class SparsifiedWeight:
    """A pruned weight in its own layout (:class:`~lowbit.kernels.prune.Sparsified`)."""

    sparsified: Sparsified

    @property
    def rel_mse(self) -> float:
        return _relative(self.sparsified.squared_error, self.sparsified.energy)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored form: the 1-bit mask and the non-zeros (as they are, palettized or quantized)."""
        s = self.sparsified
        mask = packed_nbytes(s.mask.size, 1)
        if s.palettized is not None:
            return mask + s.palettized.nbytes
        if s.quantized is not None:
            return mask + int(s.mask.sum()) * s.quantized.q.dtype.itemsize + s.quantized.scale.nbytes
        assert s.values is not None
        return mask + s.values.nbytes

    def decode(self) -> np.ndarray:
        return self.sparsified.decode()


def _mask_along(w: np.ndarray, axis: int, to_front: bool, make_mask) -> np.ndarray:
    """``make_mask`` applied to ``w`` viewed as 2-D with ``axis`` first (or last), mapped back to ``w``'s layout."""
    forward, back = moved_axis_perms(w.ndim, axis, to_front)
    moved = w.transpose(forward)
    rows = moved.reshape(w.shape[axis], -1) if to_front else moved.reshape(-1, w.shape[axis])
    return make_mask(rows).reshape(moved.shape).transpose(back)


def sparsify_weight(
    array: np.ndarray,
    output_axis: int,
    input_axis: int,
    config: SparsifyConfig,
    importance: np.ndarray | None = None,
    gram: np.ndarray | None = None,
) -> SparsifiedWeight:
    """Prune one weight as ``config`` says (unstructured, blocks of output channels, or n:m along the input
    channels), its non-zeros optionally palettized or quantized. ``importance`` (``array``'s shape, e.g. each input
    channel's mean squared activation) ranks the elements by ``|w| * sqrt(importance)`` instead of ``|w|``: the
    activation-aware pruning of Wanda, which keeps the weights whose removal moves the layer's output most.
    ``gram``: optional ``X^T X`` of a 2-D weight's input activations: the kept weights are then updated to make up
    for the pruned ones (SparseGPT's error feedback across the input channels), before any joint quantization.

    Raises :class:`~lowbit.errors.SkipWeight` when the channels do not divide into the blocks or the n:m groups,
    or the values are not finite.
    """
    scores = array
    if importance is not None:
        scores = (np.abs(array.astype(np.float32)) * np.sqrt(importance.astype(np.float32))).astype(np.float32)
    if config.n_m_ratio is not None:
        n, m = config.n_m_ratio
        mask = _mask_along(scores, input_axis, False, lambda rows: n_m_mask(rows, n, m))
    elif config.block_size > 1:
        mask = _mask_along(
            scores, output_axis, True, lambda rows: block_mask(rows, config.target_sparsity, config.block_size)
        )
    else:
        mask = magnitude_mask(scores, config.target_sparsity)
    dtype = None if config.quantize_dtype is None else config.quantize_dtype.numpy
    checked = _checked_gram(gram, array.shape[input_axis]) if array.ndim == 2 else None
    updated = array
    if checked is not None:
        mask, updated = _pruned_with_feedback(array, mask, checked, input_axis, config)
    result = sparsify(
        np.ascontiguousarray(updated), np.ascontiguousarray(mask), config.palettize_nbits, dtype, output_axis
    )
    if updated is not array:  # the error is the original weight's
        original = array.astype(np.float64)
        diff = result.decode().astype(np.float64) - original
        result = dataclasses.replace(
            result, squared_error=float(np.vdot(diff, diff)), energy=float(np.vdot(original, original))
        )
    return SparsifiedWeight(result)


def _adaptive_selection(config: SparsifyConfig) -> tuple[Select | None, int | None]:
    """(How :func:`_pruned_with_feedback` chooses each block's kept weights, the block it needs: None for the
    default, in act-order)."""
    if config.n_m_ratio is not None:
        n, m = config.n_m_ratio

        def n_of_m(values: np.ndarray, pivots: np.ndarray) -> np.ndarray:
            return n_m_mask(np.ascontiguousarray((values / pivots[:, None]).T), n, m).T

        return n_of_m, m * max(1, BLOCK // m)  # whole groups of m consecutive input channels in every block
    if config.block_size > 1:
        return None, None
    return (lambda values, pivots: column_mask(values / pivots[:, None], config.target_sparsity)), None


def _pruned_with_feedback(
    array: np.ndarray, mask: np.ndarray, gram: np.ndarray, input_axis: int, config: SparsifyConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(kept mask, values) of ``array`` (2-D) pruned one input channel at a time, each channel's error fed to the
    kept weights of the channels after it, in ``array``'s dtype. Unstructured and n:m pruning choose the kept weights
    block by block as the feedback reaches them, by SparseGPT's ``|w| / [H^-1]_kk`` on the updated weights: 1 -
    target of each output channel's weights in each block kept (compared within an output channel, as Wanda does),
    or m - n of each m input channels; blocks of output channels keep ``mask``."""
    select, block = _adaptive_selection(config)
    grid = pruning_grid(_by_input(mask, input_axis))
    values = ordered_feedback(_by_input(array, input_axis).astype(np.float64), gram, grid, select=select, block=block)[
        1
    ]
    kept = np.ascontiguousarray(_by_input(grid.exact, input_axis))
    return kept, np.ascontiguousarray(_by_input(values, input_axis)).astype(array.dtype)
