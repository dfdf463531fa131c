"""numpy-only compression kernels: arrays in, arrays out. Nothing here imports onnx or torch.

A kernel refuses a weight it cannot compress as asked by raising :class:`~lowbit.errors.SkipWeight`.
"""

from __future__ import annotations

import numpy as np

from lowbit.errors import SkipWeight


def check_finite(values: np.ndarray) -> None:
    """Raise :class:`~lowbit.errors.SkipWeight` when ``values`` holds NaN or Inf."""
    if not np.isfinite(values).all():
        raise SkipWeight("contains NaN or Inf")
