"""Linear quantization math: symmetric per-group quantization of small tables (LUTs), round-half-to-even."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from lowbit.kernels.decode import dequantize_linear

__all__ = ["Quantized", "quantize_per_row"]

_INTEGER_RANGE = {np.dtype(np.int8): (-127, 127, 0), np.dtype(np.uint8): (1, 255, 128)}


@dataclass(frozen=True)
class Quantized:
    """``q`` with one ``scale`` (and zero point) per row: ``decode() == (q - zero_point) * scale``."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None

    def decode(self) -> np.ndarray:
        return dequantize_linear(self.q, self.scale, self.zero_point, axis=0)


def quantize_per_row(x: np.ndarray, dtype: np.dtype, scale_dtype: np.dtype) -> Quantized:
    """Symmetric quantization of ``x`` (rows along axis 0) to ``dtype`` with one scale per row.

    Integers use the symmetric range (int8: [-127, 127]; uint8: zero point 128); fp8 scales map max|x| to the
    largest finite value. Rounding is round-half-to-even. An all-zero row gets scale 1.
    """
    rows = x.reshape(len(x), -1).astype(np.float64)
    amax = np.abs(rows).max(axis=1)
    dtype = np.dtype(dtype)
    top: float
    if dtype in _INTEGER_RANGE:
        low, high, zero = _INTEGER_RANGE[dtype]
        top = (high - low) // 2
    else:
        top = float(ml_dtypes.finfo(dtype).max)
    scale = np.where(amax > 0, amax / top, 1.0).astype(scale_dtype)
    scaled = rows / scale.astype(np.float64)[:, None]
    if dtype in _INTEGER_RANGE:
        q = np.clip(np.rint(scaled) + zero, low, high).astype(dtype)
        zero_point = np.full(len(x), zero, dtype) if zero else None
    else:
        q = np.clip(scaled, -top, top).astype(dtype)
        zero_point = None
    return Quantized(q.reshape(x.shape), scale, zero_point)
