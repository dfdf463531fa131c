"""Pruning of one weight: magnitude and Wanda's masks, or with ``X^T X`` the mask and kept values solved for the
layer's output (ADMM), n:m and blocks, the kept values compressed jointly."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from lowbit.config import SparsifyConfig
from lowbit.kernels import check_finite
from lowbit.kernels.feedback import by_groups
from lowbit.kernels.packing import packed_nbytes
from lowbit.kernels.prune import Sparsified, block_mask, magnitude_mask, n_m_mask, row_mask, sparsify
from lowbit.kernels.reconstruct import ADMM_ITERATIONS, Select, admm_prune
from lowbit.weights.common import (
    checked_gram,
    columns_back,
    columns_first,
    feedback_columns,
    moved_axis_perms,
    relative,
)

__all__ = ["SparsifiedWeight", "sparsify_weight"]


@dataclass(frozen=True)
class SparsifiedWeight:
    """A pruned weight in its own layout (:class:`~lowbit.kernels.prune.Sparsified`)."""

    sparsified: Sparsified

    @property
    def rel_mse(self) -> float:
        return relative(self.sparsified.squared_error, self.sparsified.energy)

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
    ``gram``: optional ``X^T X`` of a 2-D weight's input activations (or of a convolution's input windows, see
    :func:`~lowbit.weights.common.feedback_columns`): then, before any joint quantization, the kept weights
    (unstructured, blocks, n:m) are chosen and updated together for the smallest output error ``||X W - X W_s||``,
    the pruned ones made up for by the kept (see :func:`_pruned_for_output`).

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
    checked = checked_gram(gram, feedback_columns(array.shape, output_axis, input_axis), array.shape[output_axis])
    if checked is not None and checked.ndim == 3 and config.block_size > 1:
        checked = None  # blocks of output channels span a grouped convolution's groups: Wanda's block mask
    updated = array
    if checked is not None:
        check_finite(array)  # before the solve, which would spread a NaN
        mask, updated = _pruned_for_output(array, checked, input_axis, config)
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


def _selection(config: SparsifyConfig) -> Select:
    """How :func:`~lowbit.kernels.reconstruct.admm_prune` chooses the kept weights (from scores ``[N, K]``, a row per
    output channel), ramped up to the target: ``1 - target`` of each output channel's (compared within an output
    channel, as Wanda does), or the blocks of output channels with the largest scores
    (:func:`~lowbit.kernels.prune.block_mask`); n:m keeps ``m - n`` of every ``m`` input channels from the first
    step."""
    if config.n_m_ratio is not None:
        n, m = config.n_m_ratio
        return lambda scores, reached: n_m_mask(scores, n, m, ADMM_ITERATIONS)
    if config.block_size > 1:
        target, block = config.target_sparsity, config.block_size
        return lambda scores, reached: block_mask(scores, target * reached, block)
    return lambda scores, reached: row_mask(scores, config.target_sparsity * reached)


def _pruned_for_output(
    array: np.ndarray, gram: np.ndarray, input_axis: int, config: SparsifyConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(kept mask, values) of ``array`` (2-D, or a convolution ``[out, in, *kernel]``) pruned for the smallest
    output error under ``gram``, in ``array``'s dtype: the mask and the kept values chosen together by ADMM and the
    kept values then re-solved (:func:`~lowbit.kernels.reconstruct.admm_prune`). A convolution's columns are taken
    kernel position by kernel position, so that its n:m groups run along the input channels, as without ``gram``."""
    columns = columns_first(array, input_axis)
    order = _kernel_major(array.shape, input_axis)
    if order is not None:
        columns, gram = columns[order], np.take(np.take(gram, order, axis=-2), order, axis=-1)
    keep, values = _admm_by_groups(columns, gram, _selection(config))
    if order is not None:
        back = np.argsort(order)
        keep, values = keep[back], values[back]
    kept = np.ascontiguousarray(columns_back(keep, array.shape, input_axis))
    return kept, np.ascontiguousarray(columns_back(values, array.shape, input_axis)).astype(array.dtype)


def _admm_by_groups(columns: np.ndarray, gram: np.ndarray, select: Select) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~lowbit.kernels.reconstruct.admm_prune` of ``columns`` ``[K, N]`` under ``gram``, or a grouped
    convolution's ``[G, K, K]`` blocks group by group (each group's output channels under its block)."""
    if gram.ndim == 2:
        return admm_prune(columns, gram, select)
    parts = by_groups(columns, gram, lambda part, block, _start, _stop: admm_prune(part, block, select))
    return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1)


def _kernel_major(shape: tuple[int, ...], input_axis: int) -> np.ndarray | None:
    """A convolution's feedback columns (:func:`~lowbit.weights.common.columns_first`: input channel, kernel
    position) in (kernel position, input channel) order (None for a 2-D weight: in order)."""
    if len(shape) == 2:
        return None
    inputs = shape[input_axis]
    return np.arange(math.prod(shape[2:]) * inputs).reshape(inputs, -1).T.reshape(-1)
