"""Palettization of one weight: LUT groups, layout, seeds, activation weighting, error feedback and outliers."""

from __future__ import annotations

import dataclasses
import mmap
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lowbit.config import PalettizeConfig
from lowbit.errors import SkipWeight
from lowbit.kernels.feedback import grouped_feedback, lut_grid
from lowbit.kernels.layout import swapped
from lowbit.kernels.packing import pack_bits
from lowbit.kernels.palettize import Palettized, palettize, stack_palettized
from lowbit.outliers import Outliers, choose_outliers, outliers_of, sensitivity_of
from lowbit.types import CompressionGranularity
from lowbit.weights.common import checked_gram, feedback_columns, moved_axis_perms, relative

__all__ = ["PalettizedWeight", "feeds_back", "palettize_weight"]


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
        return relative(self.palettized.squared_error, self.palettized.energy)

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


def lut_groups(channels: int, config: PalettizeConfig) -> tuple[int, int]:
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


def _palettize_layout(rank: int, axis: int, config: PalettizeConfig, feedback: bool = False) -> list[int]:
    """The perm into the kernel's channel-first layout. One scalar LUT for the whole tensor has no channel
    structure: the weight keeps its own layout and the transpose (a copy) is saved, but for a transposed
    convolution's error ``feedback``, which reads its output channels first."""
    single_lut = config.granularity == CompressionGranularity.PER_TENSOR and config.cluster_dim == 1
    if single_lut and not config.enable_per_channel_scale and not (feedback and rank > 2 and axis):
        return list(range(rank))
    return moved_axis_perms(rank, axis)[0]


MIN_DAMPING = 1e-6


def _damped(importance: np.ndarray, groups: int, damping: float) -> np.ndarray:
    """``importance + damping * mean`` per LUT group: a few outlying sensitivities then cannot drag every centroid
    to themselves, and every value keeps some weight (a group whose importance is all zero falls back to plain
    k-means instead of having no values)."""
    imp = np.abs(importance, dtype=np.float64).reshape(groups, -1)
    if not np.isfinite(imp).all():  # checked first: the copy that clears them took most of the time
        imp = np.nan_to_num(imp, nan=0.0, posinf=0.0)
    mean = imp.mean(axis=1, keepdims=True)
    imp += np.where(mean > 0, mean * max(damping, MIN_DAMPING), 1.0)
    return imp.reshape(importance.shape)


def feeds_back(
    config: PalettizeConfig, shape: tuple[int, ...], output_axis: int = 0, input_axis: int | None = None
) -> bool:
    """Whether :func:`palettize_weight` chooses the codes of a weight of ``shape`` by error feedback when given its
    ``X^T X``: scalar LUTs of a 2-D weight, or of a convolution's ``[out, in, *kernel]`` (a transposed one's ``[in,
    out, *kernel]``: ``input_axis`` 0) along its output channels (``output_axis``; its ``X^T X`` over its input's
    windows, :mod:`lowbit.kernels.patches`). ``input_axis``: the weight's (default: a 2-D weight's other axis, a
    convolution's 1)."""
    return config.cluster_dim == 1 and _columns(shape, output_axis, input_axis) is not None


def _columns(shape: tuple[int, ...], output_axis: int, input_axis: int | None = None) -> int | None:
    """:func:`~lowbit.weights.common.feedback_columns` of a weight palettized along ``output_axis`` whose input
    channels lie on ``input_axis`` (default: a 2-D weight's other axis, a convolution's 1)."""
    if input_axis is None:
        input_axis = 1 - output_axis % 2 if len(shape) == 2 else 1
    return feedback_columns(shape, output_axis, input_axis)


def palettize_weight(
    array: np.ndarray,
    output_axis: int,
    config: PalettizeConfig,
    name: str = "",
    importance: np.ndarray | None = None,
    threads: int = 1,
    damping: float = 0.0,
    gram: np.ndarray | None = None,
    input_axis: int | None = None,
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
    threads : threads for the per-group k-means and the error feedback's output channels; the result does not
        depend on it.
    damping : with ``importance``: each LUT group's mean importance times ``damping`` is added to every element's
        (default 0: none, beyond a 1e-6 floor that keeps every value in play).
    gram : optional ``X^T X`` of a 2-D weight's input activations (input channels x input channels), or of a
        convolution's input windows (``[out, in, *kernel]``, ``output_axis`` 0: ``in * prod(kernel)`` square, see
        :func:`lowbit.kernels.patches.patches`): the codes are then chosen with error feedback across the input
        channels (:mod:`lowbit.kernels.feedback`), the LUTs kept, so that the layer's output error is minimized.
        Scalar LUTs only (with or without per-channel scale); ignored for vectors (``cluster_dim > 1``) and other
        layouts (:func:`feeds_back`). ``ValueError`` when its size is not those columns'.
    input_axis : the weight's input-channel axis, which ``gram``'s channels index (default None: a 2-D weight's
        other axis, a convolution's 1; a transposed convolution ``[in, out, *kernel]``: 0). No feedback along
        any other axis than the weight's output axis.

    Raises :class:`~lowbit.errors.SkipWeight` when the channels do not split into the configured groups or
    vectors, the values are not finite, or ``mode="unique"`` finds too many distinct values.
    """
    axis = output_axis % array.ndim
    channels = array.shape[axis]
    groups, per_group = lut_groups(channels, config)
    feedback = gram is not None and feeds_back(config, array.shape, axis, input_axis)
    forward = _palettize_layout(array.ndim, axis, config, feedback)
    moved = _transposed(array, forward)
    canonical = moved.reshape(moved.shape[0], -1)
    imp = None
    if importance is not None:
        moved_importance = np.ascontiguousarray(importance.transpose(forward)).reshape(canonical.shape)
        imp = moved_importance
    rows = canonical.shape[0]  # the channels, or (one LUT, own layout) the weight's first axis
    full = channels // per_group * per_group  # the channels of whole groups; a ragged last group is solved alone
    parts = [(0, full, full // per_group), (full, channels, 1)] if full < channels else [(0, rows, groups)]
    checked = checked_gram(gram, _columns(array.shape, axis, input_axis), array.shape[axis]) if feedback else None
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
            lut_only=feedback,  # the feedback chooses every code
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
        return _with_feedback(weight, view, checked, per_group, outputs_first, exact, threads)

    weight, _ = solved()
    if not config.outlier_fraction:
        return weight
    sensitivity = sensitivity_of(importance, checked, axis, array.shape)
    mask = choose_outliers((array.astype(np.float64) - weight.decode()) ** 2 * sensitivity, config.outlier_fraction)
    if not mask.any():  # a weight too small for one outlier at this fraction: no correction to store
        return weight
    by_canonical = mask.transpose(forward).reshape(canonical.shape)
    imp = (np.ones(canonical.shape) if imp is None else imp) * ~by_canonical  # the LUTs fit the rest
    exact = (by_canonical[:channels] if outputs_first else by_canonical) if feedback else None  # as solved's view
    weight, values = solved(exact)
    target = array if values is None else values.reshape(moved.shape).transpose(weight.back)
    with_outliers = dataclasses.replace(weight, outliers=outliers_of(target.astype(array.dtype), mask))
    error = with_outliers.decode().astype(np.float64) - array.astype(np.float64)
    palettized = dataclasses.replace(weight.palettized, squared_error=float(np.vdot(error, error)))
    return dataclasses.replace(with_outliers, palettized=palettized)


def _with_feedback(
    weight: PalettizedWeight,
    canonical: np.ndarray,
    gram: np.ndarray,
    per_group: int,
    outputs_first: bool,
    exact: np.ndarray | None = None,
    threads: int = 1,
) -> tuple[PalettizedWeight, np.ndarray]:
    """``weight`` (2-D or a convolution, scalar LUTs) with its codes re-chosen by error feedback over the input
    channels; LUTs unchanged. ``canonical``: the kernel's 2-D view, output channels first (``outputs_first``) or,
    one LUT for the whole weight, input channels first. ``exact``: a mask over ``canonical`` of elements kept as
    they are (outliers: no rounding error to feed on). Also returns the values the feedback ends with
    (``canonical``'s layout)."""
    p = weight.palettized
    by_input = swapped(canonical) if outputs_first else canonical  # [input channels, output channels], C order
    outputs = by_input.shape[1]
    group = np.arange(outputs) // per_group if outputs_first else np.zeros(outputs, np.int64)
    luts = p.lut[group, :, 0]  # each output channel's LUT, times its scale as the decode multiplies them
    if p.scale is not None:
        luts = luts * np.asarray(p.scale[:outputs], dtype=p.lut.dtype)[:, None]
    grid = lut_grid(luts, None if exact is None else exact.T if outputs_first else exact)
    codes, values, squared_change = grouped_feedback(by_input, gram, grid, threads=threads)
    laid_out = codes.T if outputs_first else codes
    if laid_out.shape[0] == p.codes_shape[0]:
        all_codes = laid_out
    else:  # a ragged last LUT group: the padding rows keep their codes
        all_codes = p.codes
        all_codes[: laid_out.shape[0]] = laid_out
    updated = dataclasses.replace(
        p, packed=pack_bits(all_codes.astype(np.uint8), p.n_bits), squared_error=squared_change
    )
    return PalettizedWeight(weight.shape, weight.forward, updated), values.T if outputs_first else values
