"""Reading weight elements inside compiled kernels: 16-bit floats (fp16 / bf16) arrive as their uint16 bit patterns
and are read through a 65,536-entry table of their values (numpy's fp16 casts are slow); other floats as they are.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import overload

from lowbit.kernels.histogram import bit_values

__all__ = ["COMPILED_FROM", "SAME_SIZE_UINT", "as_readable", "load", "worth_compiling"]

SAME_SIZE_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # to copy elements of any type bit for bit

# until a compiled kernel is loaded, weights this small go through numpy: a process that only meets small weights
# never starts numba's compiler (~0.5 s even with every kernel cached on disk); once it is loaded, every weight goes
# through it (both paths give the same results, tested)
COMPILED_FROM = 1 << 20


def worth_compiling(size: int, kernel) -> bool:
    """Whether a weight of ``size`` elements should go through the compiled ``kernel`` (a numba dispatcher)."""
    return size >= COMPILED_FROM or bool(kernel.signatures)


def as_readable(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(array, table) for :func:`load`: a 16-bit float array viewed as uint16 with its value table, else ``x``
    (C-contiguous) with a placeholder table."""
    x = np.ascontiguousarray(x)
    if x.dtype.itemsize == 2:
        return x.view(np.uint16), bit_values(x.dtype)
    return x, np.zeros(1)


def load(x: np.ndarray, i: int, t: int, table: np.ndarray) -> float:
    """Element (i, t) of ``x`` (from :func:`as_readable`) as float64. Compiled per type by the overload below; a
    plain function argument would keep numba's on-disk cache from ever matching."""
    return float(table[x[i, t]]) if x.dtype == np.uint16 else float(x[i, t])


@overload(load, inline="always")
def _load_for(x, i, t, table):
    if x.dtype == numba.types.uint16:
        return lambda x, i, t, table: table[x[i, t]]
    return lambda x, i, t, table: np.float64(x[i, t])
