"""Compression configs: small frozen dataclasses, validated up front, shared by the graph and torch paths."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from lowbit.types import CompressionGranularity, DType, QScheme

__all__ = [
    "PalettizeConfig",
    "QuantizeConfig",
    "SparsifyConfig",
    "block_shape",
    "check_bool",
    "check_choice",
    "check_int",
    "integral",
    "to_enum",
]

E = TypeVar("E", bound=enum.Enum)
C = TypeVar("C")


def config_of(cls: type[C], call: Mapping[str, Any]) -> C:
    """A config dataclass built from a public function's parameters (its ``locals()``), field by field: the one
    place the graph doors turn their arguments into a validated config."""
    return cls(**{f.name: call[f.name] for f in dataclasses.fields(cls) if f.name in call})  # type: ignore[arg-type]


def _shown(values: Collection[Any]) -> str:
    return "{" + ", ".join(str(getattr(v, "name", v)) for v in values) + "}"


def check_choice(name: str, value: Any, allowed: Collection[Any]) -> Any:
    """``value`` if it is one of ``allowed``, else ``ValueError`` naming the parameter and the choices."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {_shown(allowed)}, got {getattr(value, 'name', value)!r}")
    return value


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """An int (not bool) ``>= minimum``; ``TypeError`` for other types, ``ValueError`` when too small."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def integral(name: str, value: Any) -> int:
    """An int given as an int, an integer-valued float (``4.0``) or a decimal string (``"4"``), as coremltools'
    configs take it; ``TypeError`` for a bool or any other value."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdecimal():
        return int(value)
    return check_int(name, value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def to_enum(name: str, value: Any, enum_type: type[E]) -> E:
    """Accept an ``enum_type`` member, or its name / value as a string (``"per_tensor"``, ``"per-tensor"``)."""
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        key = value.strip().upper().replace("-", "_")
        if key in enum_type.__members__:
            return enum_type[key]
    raise ValueError(f"{name} must be one of {_shown(list(enum_type))}, got {value!r}")


PALETTIZE_N_BITS = (1, 2, 3, 4, 6, 8)
PALETTIZE_GRANULARITIES = (
    CompressionGranularity.PER_TENSOR,
    CompressionGranularity.PER_CHANNEL,
    CompressionGranularity.PER_GROUPED_CHANNEL,
)
LUT_DTYPES = (None, DType.INT8, DType.UINT8, DType.FP8_E4M3FN, DType.FP8_E5M2)
PALETTIZE_MODES = ("kmeans", "uniform", "unique")
MAX_OUTLIER_FRACTION = 0.1  # beyond, a sparse encoding of its own serves the weight better


@dataclass(frozen=True)
class PalettizeConfig:
    """What ``palettize_weights`` does to each weight; see ``spec/graph-api.md`` for every field."""

    lut_dtype: DType | None = None
    n_bits: int = 4
    granularity: CompressionGranularity = CompressionGranularity.PER_TENSOR
    group_size: int = 32
    cluster_dim: int = 1
    enable_per_channel_scale: bool = False
    weight_num_threshold: int = 1024
    num_kmeans_workers: int = 4
    enable_fast_kmeans_mode: bool = True
    rounding_precision: int = 4
    mode: str = "kmeans"
    outlier_fraction: float = 0.0

    def __post_init__(self) -> None:
        fraction = self.outlier_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(f"outlier_fraction must be a number, got {type(fraction).__name__} {fraction!r}")
        if not 0 <= fraction <= MAX_OUTLIER_FRACTION:
            raise ValueError(f"outlier_fraction must be in [0, {MAX_OUTLIER_FRACTION}], got {fraction}")
        if fraction and self.mode != "kmeans":
            raise ValueError(f"outlier_fraction needs mode='kmeans', got mode={self.mode!r}")
        lut_dtype = self.lut_dtype if self.lut_dtype is None else to_enum("lut_dtype", self.lut_dtype, DType)
        object.__setattr__(self, "lut_dtype", check_choice("lut_dtype", lut_dtype, LUT_DTYPES))
        check_choice("n_bits", check_int("n_bits", self.n_bits), PALETTIZE_N_BITS)
        granularity = to_enum("granularity", self.granularity, CompressionGranularity)
        object.__setattr__(self, "granularity", check_choice("granularity", granularity, PALETTIZE_GRANULARITIES))
        check_int("group_size", self.group_size, 1)
        check_int("cluster_dim", self.cluster_dim, 1)
        check_bool("enable_per_channel_scale", self.enable_per_channel_scale)
        if self.cluster_dim > 1 and self.enable_per_channel_scale:
            raise ValueError("cluster_dim > 1 cannot be combined with enable_per_channel_scale=True")
        check_int("weight_num_threshold", self.weight_num_threshold, 0)
        check_int("num_kmeans_workers", self.num_kmeans_workers, 1)
        check_bool("enable_fast_kmeans_mode", self.enable_fast_kmeans_mode)
        check_int("rounding_precision", self.rounding_precision, 0)
        check_choice("mode", self.mode, PALETTIZE_MODES)
        if self.mode == "uniform" and self.cluster_dim > 1:
            raise ValueError("mode='uniform' is scalar only: cluster_dim must be 1")


QUANTIZE_DTYPES = (
    DType.INT8,
    DType.UINT8,
    DType.INT4,
    DType.UINT4,
    DType.FP8_E4M3FN,
    DType.FP8_E5M2,
    DType.FP4_E2M1FN,
)
QUANTIZE_GRANULARITIES = (
    CompressionGranularity.PER_TENSOR,
    CompressionGranularity.PER_CHANNEL,
    CompressionGranularity.PER_BLOCK,
)
FLOAT_QUANTIZE_DTYPES = (DType.FP8_E4M3FN, DType.FP8_E5M2, DType.FP4_E2M1FN)
MX_BLOCK_SIZE = 32


def block_shape(
    granularity: CompressionGranularity, rank: int, output_axis: int, input_axis: int, block_size: int
) -> tuple[int, ...]:
    """Elements per block along each axis (0: the whole axis): ``PER_TENSOR`` -> all 0; ``PER_CHANNEL`` -> 1 on the
    output-channel axis; ``PER_BLOCK`` -> also ``block_size`` on the input-channel axis."""
    shape = [0] * rank
    if granularity in (CompressionGranularity.PER_CHANNEL, CompressionGranularity.PER_BLOCK):
        shape[output_axis] = 1
    if granularity == CompressionGranularity.PER_BLOCK:
        shape[input_axis] = block_size
    return tuple(shape)


@dataclass(frozen=True)
class QuantizeConfig:
    """What ``quantize_weights`` does to each weight; see ``spec/graph-api.md``."""

    dtype: DType
    qscheme: QScheme = QScheme.SYMMETRIC
    granularity: CompressionGranularity = CompressionGranularity.PER_CHANNEL
    block_size: int = 32
    weight_num_threshold: int = 1024
    scale_dtype: DType | None = None
    scale_search: bool = False

    def __post_init__(self) -> None:
        dtype = check_choice("dtype", to_enum("dtype", self.dtype, DType), QUANTIZE_DTYPES)
        check_bool("scale_search", self.scale_search)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "qscheme", to_enum("qscheme", self.qscheme, QScheme))
        granularity = to_enum("granularity", self.granularity, CompressionGranularity)
        object.__setattr__(self, "granularity", check_choice("granularity", granularity, QUANTIZE_GRANULARITIES))
        check_int("block_size", self.block_size, 1)
        check_int("weight_num_threshold", self.weight_num_threshold, 0)
        scale_dtype = None if self.scale_dtype is None else to_enum("scale_dtype", self.scale_dtype, DType)
        object.__setattr__(self, "scale_dtype", check_choice("scale_dtype", scale_dtype, (None, DType.FP8_E8M0FNU)))
        floating = dtype in FLOAT_QUANTIZE_DTYPES
        if floating and self.qscheme == QScheme.ASYMMETRIC:
            raise ValueError(f"qscheme must be SYMMETRIC for the float dtype {dtype.name}, got ASYMMETRIC")
        if scale_dtype is not None and not floating:
            raise ValueError(f"scale_dtype must be None for the integer dtype {dtype.name}, got {scale_dtype.name}")
        if self.scale_search and floating:
            raise ValueError(f"scale_search must be False for the float dtype {dtype.name} (integers only)")
        if dtype == DType.FP4_E2M1FN:
            if scale_dtype is not None:
                raise ValueError("scale_dtype must be None for FP4_E2M1FN (MXFP4 scales are always E8M0)")
            if self.granularity != CompressionGranularity.PER_BLOCK or self.block_size != MX_BLOCK_SIZE:
                raise ValueError(
                    f"FP4_E2M1FN (MXFP4) needs granularity PER_BLOCK and block_size {MX_BLOCK_SIZE}, got "
                    f"{self.granularity.name} and {self.block_size}"
                )

    @property
    def e8m0(self) -> bool:
        """Scales stored as E8M0 exponents (MXFP4, or an fp8 dtype with ``scale_dtype=FP8_E8M0FNU``)."""
        return self.dtype == DType.FP4_E2M1FN or self.scale_dtype == DType.FP8_E8M0FNU


SPARSE_QUANTIZE_DTYPES = (DType.INT8,)


@dataclass(frozen=True)
class SparsifyConfig:
    """What ``sparsify_weights`` does to each weight; see ``spec/graph-api.md``."""

    target_sparsity: float
    block_size: int = 1
    n_m_ratio: tuple[int, int] | None = None
    quantize_dtype: DType | None = None
    palettize_nbits: int | None = None
    weight_num_threshold: int = 1024

    def __post_init__(self) -> None:
        target = self.target_sparsity
        if isinstance(target, bool) or not isinstance(target, (int, float)):
            raise TypeError(f"target_sparsity must be a number, got {type(target).__name__} {target!r}")
        if not 0 <= target < 1:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target}")
        check_int("block_size", self.block_size, 1)
        if self.n_m_ratio is not None:
            ratio = self.n_m_ratio
            if (
                not isinstance(ratio, (tuple, list))
                or len(ratio) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in ratio)
                or not 0 < ratio[0] < ratio[1]
            ):
                raise ValueError(f"n_m_ratio must be a pair (n, m) of ints with 0 < n < m, got {ratio!r}")
            if self.block_size > 1:
                raise ValueError("n_m_ratio cannot be combined with block_size > 1")
            object.__setattr__(self, "n_m_ratio", (int(ratio[0]), int(ratio[1])))
        if self.quantize_dtype is not None and self.palettize_nbits is not None:
            raise ValueError("quantize_dtype and palettize_nbits cannot both be set: choose one joint compression")
        if self.quantize_dtype is not None:
            dtype = check_choice(
                "quantize_dtype", to_enum("quantize_dtype", self.quantize_dtype, DType), SPARSE_QUANTIZE_DTYPES
            )
            object.__setattr__(self, "quantize_dtype", dtype)
        if self.palettize_nbits is not None:
            check_choice("palettize_nbits", check_int("palettize_nbits", self.palettize_nbits), PALETTIZE_N_BITS)
        check_int("weight_num_threshold", self.weight_num_threshold, 0)
