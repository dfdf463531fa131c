"""Shared enums of the public API and the one table that maps a :class:`DType` to its numpy form and width."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import ml_dtypes
import numpy as np

__all__ = ["CompressionGranularity", "DType", "DTypeInfo", "QScheme"]


@dataclass(frozen=True)
class DTypeInfo:
    """How one :class:`DType` is stored: numpy dtype and bits per element."""

    numpy: np.dtype
    bits: int


class DType(enum.Enum):
    """Element types lowbit reads or writes."""

    FP32 = DTypeInfo(np.dtype(np.float32), 32)
    FP16 = DTypeInfo(np.dtype(np.float16), 16)
    BF16 = DTypeInfo(np.dtype(ml_dtypes.bfloat16), 16)
    INT8 = DTypeInfo(np.dtype(np.int8), 8)
    UINT8 = DTypeInfo(np.dtype(np.uint8), 8)
    INT4 = DTypeInfo(np.dtype(ml_dtypes.int4), 4)
    UINT4 = DTypeInfo(np.dtype(ml_dtypes.uint4), 4)
    FP8_E4M3FN = DTypeInfo(np.dtype(ml_dtypes.float8_e4m3fn), 8)
    FP8_E5M2 = DTypeInfo(np.dtype(ml_dtypes.float8_e5m2), 8)
    FP8_E8M0FNU = DTypeInfo(np.dtype(ml_dtypes.float8_e8m0fnu), 8)
    FP4_E2M1FN = DTypeInfo(np.dtype(ml_dtypes.float4_e2m1fn), 4)

    @property
    def numpy(self) -> np.dtype:
        return self.value.numpy

    @property
    def bits(self) -> int:
        return self.value.bits

    @classmethod
    def of(cls, dtype: np.dtype) -> DType:
        """The DType stored as numpy ``dtype``; ``ValueError`` when none is."""
        for member in cls:
            if member.numpy == np.dtype(dtype):
                return member
        raise ValueError(f"no lowbit DType is stored as {np.dtype(dtype)}")


# The weight element types lowbit compresses (float64 weights are left alone: no runtime wants them small).
FLOAT_WEIGHT_DTYPES = frozenset({DType.FP32.numpy, DType.FP16.numpy, DType.BF16.numpy})


class CompressionGranularity(enum.Enum):
    """Which elements share one look-up table or one scale."""

    PER_TENSOR = "per-tensor"
    PER_CHANNEL = "per-channel"
    PER_GROUPED_CHANNEL = "per-grouped-channel"
    PER_BLOCK = "per-block"


class QScheme(enum.Enum):
    """Linear quantization scheme."""

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"
