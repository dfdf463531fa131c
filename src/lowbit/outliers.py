"""Dense-and-sparse: the few weights a palettization serves worst, kept exact beside it (SqueezeLLM's outliers).

A palettized weight with outliers decodes as ``lut[codes] + correction``, the correction zero but at the outliers,
where it makes each one exact (chosen so that the sum in the weight's dtype is the weight, where a float can be).
The outliers are the fraction of elements whose squared error, weighted by their sensitivity, is largest."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.kernels.packing import pack_bits, packed_nbytes, unpack_bits

__all__ = ["Outliers", "choose_outliers", "corrected", "outliers_of"]


@dataclass(frozen=True)
class Outliers:
    """Which elements of a weight (a packed bitmask over its own layout, C order) get a correction, and the
    corrections (the weight's dtype, in the order of the set bits)."""

    mask: np.ndarray
    values: np.ndarray
    numel: int

    @property
    def nbytes(self) -> int:
        return packed_nbytes(self.numel, 1) + self.values.nbytes

    @property
    def positions(self) -> np.ndarray:
        """The flat indices of the outliers."""
        return np.flatnonzero(unpack_bits(self.mask, 1, self.numel))

    def add_to(self, dense: np.ndarray) -> np.ndarray:
        """``dense`` (the weight's shape and dtype) with the corrections added, a new array."""
        out = np.array(dense, copy=True, order="C")  # reshape(-1) must be a view
        flat = out.reshape(-1)
        flat[self.positions] += self.values
        return out

    def permuted(self, shape: tuple[int, ...], perm: tuple[int, ...]) -> Outliers:
        """The same outliers of ``array.transpose(perm)`` (``shape``: ``array``'s)."""
        grid = np.zeros(self.numel, np.int64)
        grid[self.positions] = np.arange(1, len(self.values) + 1)
        moved = grid.reshape(shape).transpose(perm).reshape(-1)
        order = moved[moved > 0] - 1
        return Outliers(pack_bits((moved > 0).astype(np.uint8), 1), self.values[order], self.numel)


def choose_outliers(score: np.ndarray, fraction: float) -> np.ndarray:
    """A boolean mask of ``score``'s shape with the ``round(fraction * size)`` largest scores set (ties: the first
    in C order)."""
    count = round(fraction * score.size)
    mask = np.zeros(score.size, bool)
    if count:
        mask[np.argsort(-score.reshape(-1), kind="stable")[:count]] = True
    return mask.reshape(score.shape)


def corrected(target: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Corrections ``c`` (``decoded``'s dtype) with ``decoded + c == target`` where one exists within two ulps of
    ``target - decoded`` (else the nearest tried)."""
    dtype = decoded.dtype
    exact = target.astype(np.float64) - decoded.astype(np.float64)
    best = exact.astype(dtype)
    for step in (1, -1, 2, -2):
        wrong = (decoded + best).astype(dtype) != target.astype(dtype)
        if not wrong.any():
            break
        candidate = best.copy()
        direction = np.full(candidate.shape, np.inf if step > 0 else -np.inf, dtype)
        for _ in range(abs(step)):
            candidate = np.nextafter(candidate, direction)
        fixed = wrong & ((decoded + candidate).astype(dtype) == target.astype(dtype))
        best = np.where(fixed, candidate, best)
    return best


def outliers_of(array: np.ndarray, decoded: np.ndarray, mask: np.ndarray) -> Outliers:
    """The outliers at ``mask`` that make ``decoded`` equal ``array`` there (``array``'s layout)."""
    positions = np.flatnonzero(mask.reshape(-1))
    values = corrected(array.reshape(-1)[positions], decoded.reshape(-1)[positions])
    return Outliers(pack_bits(mask.reshape(-1).astype(np.uint8), 1), values, mask.size)
