"""The configs of :class:`~lowbit.torch.palettization.DKMPalettizer`: every option of
``coremltools.optimize.torch.palettization.ModuleDKMPalettizerConfig``, validated up front. An option lowbit does not
implement yet raises ``NotImplementedError`` naming it when set to anything but its default (never silently
ignored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowbit.config import PALETTIZE_N_BITS, check_bool, check_choice, check_int, integral
from lowbit.torch.config import ModelConfig, ModuleConfig

__all__ = ["DKMPalettizerConfig", "ModuleDKMPalettizerConfig"]

PALETT_MODES = ("dkm", "gsm", "hard")
KMEANS_INITS = ("auto", "opt1d", "cpu.kmeans++", "kmeans++")
LUT_DTYPES = ("f32", "f16", "bf16", "i8", "u8")
# the torch dtypes (or their names) that coremltools also takes for each
LUT_DTYPE_NAMES = {"float32": "f32", "float16": "f16", "half": "f16", "bfloat16": "bf16", "int8": "i8", "uint8": "u8"}
SCALING_SCHEMES = ("min_max", "abs")
# options accepted at their default only, with why (activation quantization, distributed and batching modes)
NOT_IMPLEMENTED = {
    "quant_min": -128,
    "quant_max": 127,
    "dtype": torch.qint8,
    "quantize_activations": False,
    "cluster_permute": None,
    "palett_max_mem": 1.0,
    "palett_lambda": 0.0,
    "add_extra_centroid": False,
    "palett_cluster_tol": 0.0,
    "palett_batch_mode": False,
    "palett_dist": False,
    "percentage_palett_enable": 1.0,
    "kmeans_batch_threshold": 4,
    "kmeans_error_bnd": 0.0,
    "partition_size": None,
    "cluster_dtype": None,
}


def _check_float(name: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not value >= minimum:  # NaN too
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


@dataclass(frozen=True)
class ModuleDKMPalettizerConfig(ModuleConfig):
    """How one module's weights are palettized during training (see ``spec/torch-api.md`` for every option).

    Implemented: ``n_bits`` (None: 4 for Linear, 2 otherwise), ``weight_threshold``, ``granularity``
    (``"per_tensor"`` / ``"per_grouped_channel"``), ``group_size``, ``channel_axis``, ``enable_per_channel_scale``
    with ``per_channel_scaling_factor_scheme``, ``milestone``, ``cluster_dim``, ``lut_dtype``, ``kmeans_max_iter``,
    ``prune_threshold``, ``kmeans_init``, ``kmeans_opt1d_threshold``, ``kmeans_n_init``, ``enforce_zero``,
    ``palett_mode``, ``palett_tau``, ``palett_epsilon``, ``zero_threshold``, and eDKM's ``palett_unique``
    (attention over distinct 16-bit values), ``palett_shard`` (its index list sharded across ``torch.distributed``
    ranks between forward and backward) and ``palett_min_tsize`` (index lists of at least this many entries kept as
    int32). The others (see ``NOT_IMPLEMENTED``) raise ``NotImplementedError`` naming them unless left at their
    defaults.

    Raises ``ValueError`` / ``TypeError`` naming the option and its allowed values.
    """

    n_bits: int | None = None
    weight_threshold: int = 2048
    granularity: str = "per_tensor"
    group_size: int | None = None
    channel_axis: int = 0
    enable_per_channel_scale: bool = False
    milestone: int = 0
    cluster_dim: int | None = None
    quant_min: int = -128
    quant_max: int = 127
    dtype: Any = torch.qint8
    lut_dtype: str = "f32"
    quantize_activations: bool = False
    cluster_permute: Any = None
    palett_max_mem: float = 1.0
    kmeans_max_iter: int = 3
    prune_threshold: float = 1e-7
    kmeans_init: str = "auto"
    kmeans_opt1d_threshold: int = 1024
    enforce_zero: bool = False
    palett_mode: str = "dkm"
    palett_tau: float = 1e-4
    palett_epsilon: float = 1e-4
    palett_lambda: float = 0.0
    add_extra_centroid: bool = False
    palett_cluster_tol: float = 0.0
    palett_min_tsize: int = 65536
    palett_unique: bool = False
    palett_shard: bool = False
    palett_batch_mode: bool = False
    palett_dist: bool = False
    per_channel_scaling_factor_scheme: str = "min_max"
    percentage_palett_enable: float = 1.0
    kmeans_batch_threshold: int = 4
    kmeans_n_init: int = 10
    zero_threshold: float = 1e-7
    kmeans_error_bnd: float = 0.0
    partition_size: int | None = None
    cluster_dtype: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):  # as as_dict() writes it
            object.__setattr__(self, "dtype", getattr(torch, self.dtype.removeprefix("torch."), self.dtype))
        for name, default in NOT_IMPLEMENTED.items():
            if getattr(self, name) != default:
                raise NotImplementedError(
                    f"{name}={getattr(self, name)!r} is not implemented by lowbit's DKMPalettizer (only its default "
                    f"{default!r}); see the README's DKM section"
                )
        if self.n_bits is not None:
            object.__setattr__(self, "n_bits", integral("n_bits", self.n_bits))
            check_choice("n_bits", self.n_bits, PALETTIZE_N_BITS)
        check_int("weight_threshold", self.weight_threshold, 0)
        check_choice("granularity", self.granularity, ("per_tensor", "per_grouped_channel"))
        if (self.granularity == "per_grouped_channel") != (self.group_size is not None):
            raise ValueError("group_size must be set exactly when granularity is 'per_grouped_channel'")
        if self.group_size is not None:
            check_int("group_size", self.group_size, 1)
        check_choice("channel_axis", check_int("channel_axis", self.channel_axis), (0, 1))
        check_bool("enable_per_channel_scale", self.enable_per_channel_scale)
        check_int("milestone", self.milestone, 0)
        if self.cluster_dim is not None:
            check_int("cluster_dim", self.cluster_dim, 1)
            if self.cluster_dim > 1 and self.enable_per_channel_scale:
                raise ValueError("cluster_dim > 1 cannot be combined with enable_per_channel_scale")
        lut_dtype = str(self.lut_dtype).removeprefix("torch.").lower()
        object.__setattr__(self, "lut_dtype", LUT_DTYPE_NAMES.get(lut_dtype, lut_dtype))
        check_choice("lut_dtype", self.lut_dtype, LUT_DTYPES)
        check_int("kmeans_max_iter", self.kmeans_max_iter, 1)
        _check_float("prune_threshold", self.prune_threshold)
        check_choice("kmeans_init", self.kmeans_init, KMEANS_INITS)
        check_int("kmeans_opt1d_threshold", self.kmeans_opt1d_threshold, 0)
        check_int("kmeans_n_init", self.kmeans_n_init, 1)
        check_bool("enforce_zero", self.enforce_zero)
        check_choice("palett_mode", self.palett_mode, PALETT_MODES)
        if _check_float("palett_tau", self.palett_tau) == 0.0:
            raise ValueError("palett_tau must be > 0, got 0")
        _check_float("palett_epsilon", self.palett_epsilon)
        check_int("palett_min_tsize", self.palett_min_tsize, 0)
        check_bool("palett_unique", self.palett_unique)
        check_bool("palett_shard", self.palett_shard)
        if self.palett_unique and (self.cluster_dim or 1) > 1:
            raise ValueError("palett_unique needs scalar clusters (cluster_dim None or 1)")
        if self.palett_shard and not self.palett_unique:
            raise ValueError("palett_shard shards palett_unique's index list: set palett_unique=True with it")
        check_choice("per_channel_scaling_factor_scheme", self.per_channel_scaling_factor_scheme, SCALING_SCHEMES)
        _check_float("zero_threshold", self.zero_threshold)

    def bits_for(self, module: torch.nn.Module) -> int:
        """``n_bits``, or its default for ``module``: 4 for a Linear, 2 otherwise."""
        if self.n_bits is not None:
            return self.n_bits
        return 4 if isinstance(module, torch.nn.Linear) else 2


@dataclass
class DKMPalettizerConfig(ModelConfig[ModuleDKMPalettizerConfig]):
    """Per-module configs for :class:`DKMPalettizer`: ``global_config``, ``module_type_configs`` (a config, ``None``,
    or a list of configs of which the one with the largest ``weight_threshold`` below the module's weight size
    applies), ``module_name_configs`` (``None`` skips a module)."""

    module_config: ClassVar[type[ModuleConfig]] = ModuleDKMPalettizerConfig
    module_type_configs: dict = field(default_factory=dict)

    def _coerce(self, where: str, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [super(DKMPalettizerConfig, self)._coerce(where, v) for v in value]
        return super()._coerce(where, value)


def config_for_size(config: Any, numel: int) -> ModuleDKMPalettizerConfig | None:
    """The module config that applies to a weight of ``numel`` elements: ``config`` itself, or from a list the one
    with the largest ``weight_threshold`` below ``numel``; None when the weight is not above any threshold."""
    candidates = config if isinstance(config, list) else [config]
    fitting = [c for c in candidates if c is not None and c.weight_threshold < numel]
    return max(fitting, key=lambda c: c.weight_threshold) if fitting else None
