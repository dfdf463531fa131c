"""What the weight layer's compressions share: layouts, the eligibility check, the relative error, the
calibration matrix's check."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lowbit.errors import SkipWeight
from lowbit.types import FLOAT_WEIGHT_DTYPES

__all__ = [
    "by_input",
    "check_eligible",
    "checked_gram",
    "columns_back",
    "columns_first",
    "feedback_columns",
    "moved_axis_perms",
    "relative",
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


def relative(squared_error: float, energy: float) -> float:
    return squared_error / energy if energy > 0 else 0.0


def by_input(a: np.ndarray, input_axis: int) -> np.ndarray:
    """A 2-D weight (or a grid of its shape) with its input channels first, or back (the view is its own
    inverse)."""
    return a.T if input_axis == 1 else a


def checked_gram(gram: np.ndarray | None, channels: int | None, outputs: int = 1) -> np.ndarray | None:
    """``gram`` when it is a finite ``channels x channels`` matrix, or a grouped convolution's ``[groups, channels,
    channels]`` blocks with ``groups`` dividing its ``outputs`` output channels (None without one, or without
    ``channels``: a layout the feedback does not read); ``ValueError`` naming the sizes otherwise."""
    if gram is None or channels is None:
        return None
    shape = np.shape(gram)
    grouped = len(shape) == 3 and shape[0] > 0 and outputs % shape[0] == 0
    if shape[-2:] != (channels, channels) or not (len(shape) == 2 or grouped):
        raise ValueError(
            f"gram must be {channels} x {channels} (the weight's input channels), or [groups, {channels}, {channels}] "
            f"with groups dividing its {outputs} output channels, got {shape}"
        )
    if not np.isfinite(gram).all():
        raise ValueError("gram (X^T X of the calibration activations) is not finite")
    return gram


def feedback_columns(shape: Sequence[int], output_axis: int, input_axis: int) -> int | None:
    """The size of the ``X^T X`` a weight's error feedback reads: a 2-D weight's input channels, or a convolution's
    (input channel, kernel position) pairs, its input's windows (:mod:`lowbit.kernels.patches`): ``[out, in,
    *kernel]`` (output axis 0, input axis 1), a transposed one's ``[in, out, *kernel]`` (output axis 1, input axis
    0); None for any other layout (no feedback)."""
    rank = len(shape)
    if rank == 2 and output_axis % 2 != input_axis % 2:
        return int(shape[input_axis])
    if rank > 2 and {output_axis % rank, input_axis % rank} == {0, 1}:
        return math.prod(shape) // int(shape[output_axis])
    return None


def columns_first(a: np.ndarray, input_axis: int) -> np.ndarray:
    """A weight (or a grid of its shape) as ``[feedback columns, output channels]`` (:func:`feedback_columns`): a
    2-D weight's :func:`by_input`, a convolution's output channels moved first, flattened and transposed."""
    if a.ndim == 2:
        return by_input(a, input_axis)
    outputs = 1 - input_axis % a.ndim  # a convolution's 0, a transposed one's 1
    return np.moveaxis(a, outputs, 0).reshape(a.shape[outputs], -1).T


def columns_back(a: np.ndarray, shape: tuple[int, ...], input_axis: int) -> np.ndarray:
    """:func:`columns_first`'s inverse, to a weight of ``shape``."""
    if len(shape) == 2:
        return by_input(a, input_axis)
    outputs = 1 - input_axis % len(shape)
    moved = (shape[outputs], *(n for axis, n in enumerate(shape) if axis != outputs))
    return np.moveaxis(a.T.reshape(moved), 0, outputs)
