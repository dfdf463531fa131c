"""What the weight layer's compressions share: layouts, the eligibility check, the relative error, the
calibration matrix's check."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lowbit.errors import SkipWeight
from lowbit.types import FLOAT_WEIGHT_DTYPES

__all__ = ["by_input", "check_eligible", "checked_gram", "moved_axis_perms", "relative"]


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


def checked_gram(gram: np.ndarray | None, channels: int) -> np.ndarray | None:
    """``gram`` when it is a finite ``channels x channels`` matrix; ``ValueError`` naming the sizes otherwise."""
    if gram is None:
        return None
    if np.shape(gram) != (channels, channels):
        raise ValueError(f"gram must be {channels} x {channels} (the weight's input channels), got {np.shape(gram)}")
    if not np.isfinite(gram).all():
        raise ValueError("gram (X^T X of the calibration activations) is not finite")
    return gram
