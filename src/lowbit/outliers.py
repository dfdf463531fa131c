"""Dense-and-sparse: the few weights a palettization serves worst, kept exact beside it (SqueezeLLM's outliers).

A palettized weight with outliers decodes as ``lut[codes]`` with the outliers' elements replaced by their own values,
stored as flat int32 positions and the values in the weight's dtype (for 0.5 % of an fp32 weight, 0.32 bits per
weight). The outliers are the fraction of elements whose squared error, weighted by their sensitivity, is largest."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Outliers", "choose_outliers", "outliers_of", "sensitivity_of"]


@dataclass(frozen=True)
class Outliers:
    """The elements of a weight kept exact: ``positions`` (flat, C order of the weight's own layout, int32,
    ascending) and their ``values`` (the weight's dtype)."""

    positions: np.ndarray
    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.positions.nbytes + self.values.nbytes

    def applied(self, dense: np.ndarray) -> np.ndarray:
        """``dense`` (the weight's shape and dtype) with the outliers' values in place, a new array."""
        out = np.array(dense, copy=True, order="C")  # reshape(-1) must be a view
        out.reshape(-1)[self.positions] = self.values
        return out

    def permuted(self, shape: tuple[int, ...], perm: tuple[int, ...]) -> Outliers:
        """The same outliers of ``array.transpose(perm)`` (``shape``: ``array``'s)."""
        coordinates = np.unravel_index(self.positions, shape)
        moved = np.ravel_multi_index(tuple(coordinates[a] for a in perm), tuple(shape[a] for a in perm))
        order = np.argsort(moved, kind="stable")
        return Outliers(moved[order].astype(np.int32), self.values[order])


def choose_outliers(score: np.ndarray, fraction: float) -> np.ndarray:
    """A boolean mask of ``score``'s shape with the ``round(fraction * size)`` largest scores set (ties: the first
    in C order)."""
    count = round(fraction * score.size)
    mask = np.zeros(score.size, bool)
    if count:
        mask[np.argsort(-score.reshape(-1), kind="stable")[:count]] = True
    return mask.reshape(score.shape)


def outliers_of(values: np.ndarray, mask: np.ndarray) -> Outliers:
    """The outliers at ``mask`` holding ``values`` there (both in the weight's layout)."""
    if mask.size >= 2**31:
        raise ValueError(f"outliers need int32 positions: the weight has {mask.size} elements")
    positions = np.flatnonzero(mask.reshape(-1))
    return Outliers(positions.astype(np.int32), np.ascontiguousarray(values.reshape(-1)[positions]))


def sensitivity_of(
    importance: np.ndarray | None, gram: np.ndarray | None, output_axis: int, shape: tuple[int, ...]
) -> np.ndarray:
    """How much each element's squared error counts when outliers are chosen (broadcastable to the weight of
    ``shape``): ``importance``, or the energy of the input it multiplies (``diag(X^T X)`` of a 2-D weight, or of a
    convolution's windows, ``output_axis`` 0, or a transposed one's, 1, with calibration), or 1."""
    if importance is not None:
        return np.asarray(importance, np.float64)
    if gram is not None:
        energy = np.diagonal(gram, axis1=-2, axis2=-1).astype(np.float64)  # a grouped convolution's: per group
        if len(shape) > 2 and output_axis % len(shape):  # a transposed convolution's [in, out, *kernel]
            return energy.reshape(shape[0], 1, *shape[2:])
        if len(shape) > 2:
            blocks = energy.reshape(-1, *shape[1:])  # one per group (a group-1 conv's: one)
            return np.repeat(blocks, shape[0] // len(blocks), axis=0)
        return energy[None, :] if output_axis == 0 else energy[:, None]
    return np.ones(1)
