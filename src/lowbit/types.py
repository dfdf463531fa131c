"""Shared enums of the public API and the one table that maps a :class:`DType` to its numpy and ONNX forms."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

__all__ = ["CompressionGranularity", "DType", "DTypeInfo", "QScheme"]


@dataclass(frozen=True)
class DTypeInfo:
    """How one :class:`DType` is stored: numpy dtype, ONNX data type and bits per element."""

    numpy: np.dtype
    onnx: ir.DataType
    bits: int


class DType(enum.Enum):
    """Element types lowbit reads or writes."""

    FP32 = DTypeInfo(np.dtype(np.float32), ir.DataType.FLOAT, 32)
    FP16 = DTypeInfo(np.dtype(np.float16), ir.DataType.FLOAT16, 16)
    BF16 = DTypeInfo(np.dtype(ml_dtypes.bfloat16), ir.DataType.BFLOAT16, 16)
    INT8 = DTypeInfo(np.dtype(np.int8), ir.DataType.INT8, 8)
    UINT8 = DTypeInfo(np.dtype(np.uint8), ir.DataType.UINT8, 8)
    INT4 = DTypeInfo(np.dtype(ml_dtypes.int4), ir.DataType.INT4, 4)
    UINT4 = DTypeInfo(np.dtype(ml_dtypes.uint4), ir.DataType.UINT4, 4)
    FP8_E4M3FN = DTypeInfo(np.dtype(ml_dtypes.float8_e4m3fn), ir.DataType.FLOAT8E4M3FN, 8)
    FP8_E5M2 = DTypeInfo(np.dtype(ml_dtypes.float8_e5m2), ir.DataType.FLOAT8E5M2, 8)
    FP8_E8M0FNU = DTypeInfo(np.dtype(ml_dtypes.float8_e8m0fnu), ir.DataType.FLOAT8E8M0, 8)
    FP4_E2M1FN = DTypeInfo(np.dtype(ml_dtypes.float4_e2m1fn), ir.DataType.FLOAT4E2M1, 4)

    @property
    def numpy(self) -> np.dtype:
        return self.value.numpy

    @property
    def onnx(self) -> ir.DataType:
        return self.value.onnx

    @property
    def bits(self) -> int:
        return self.value.bits


# The weight element types the passes compress (float64 weights are left alone: no runtime wants them small).
FLOAT_WEIGHT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


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
