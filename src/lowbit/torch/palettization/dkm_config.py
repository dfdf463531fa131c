"""The configs of :class:`~lowbit.torch.palettization.DKMPalettizer`: every option of
``coremltools.optimize.torch.palettization.ModuleDKMPalettizerConfig`` with the meaning coremltools 9.0 gives it,
validated up front."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowbit.config import PALETTIZE_N_BITS, check_bool, check_choice, check_int, integral
from lowbit.torch.config import ModelConfig, ModuleConfig

__all__ = ["DKMPalettizerConfig", "ModuleDKMPalettizerConfig"]

PALETT_MODES = ("dkm", "topk", "hard", "gsm")
KMEANS_INITS = ("auto", "opt1d", "cpu.kmeans++", "kmeans++")
LUT_DTYPES = ("f32", "f16", "bf16", "i8", "u8")
# the torch dtypes (or their names) that coremltools also takes for each
LUT_DTYPE_NAMES = {"float32": "f32", "float16": "f16", "half": "f16", "bfloat16": "bf16", "int8": "i8", "uint8": "u8"}
SCALING_SCHEMES = ("min_max", "abs")
# the activations' fake-quantization types, and their integer ranges
ACTIVATION_DTYPES = {"qint8": torch.qint8, "quint8": torch.quint8}
ACTIVATION_RANGES = {torch.qint8: (-128, 127), torch.quint8: (0, 255)}
# options coremltools 9.0 refuses whenever set (a DeprecationWarning raised), with what replaced them
DEPRECATED = {"partition_size": "group_size", "cluster_dtype": "lut_dtype"}
# options coremltools 9.0 accepts and never acts on in DKM, with why: accepted here too, with a warning when set
NO_EFFECT = {
    "palett_lambda": (0.0, "coremltools 9.0 never reads it"),
    "add_extra_centroid": (False, "coremltools 9.0 reads it only in joint pruning, which DKMPalettizer does not do"),
    "kmeans_error_bnd": (0.0, "coremltools 9.0's DKM never reaches the k-means branch that reads it"),
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

    Every option acts as in coremltools 9.0 (see :mod:`lowbit.torch.palettization.fake_palettize` for the DKM step
    and the README's DKM section for each option): ``n_bits`` (None: 4 for Linear, 2 otherwise),
    ``weight_threshold``, ``granularity``, ``group_size``, ``channel_axis``, ``enable_per_channel_scale`` with
    ``per_channel_scaling_factor_scheme``, ``milestone``, ``cluster_dim``, ``cluster_permute`` (LUT groups along its
    first axis), ``lut_dtype``, ``kmeans_max_iter``, ``prune_threshold`` (off the distance to centroid 0),
    ``zero_threshold`` (the attention's floor), ``kmeans_init``, ``kmeans_opt1d_threshold``, ``kmeans_n_init``,
    ``enforce_zero``, ``palett_mode``, ``palett_tau``, ``palett_epsilon`` (the inertia's change that stops the
    iterations), ``palett_cluster_tol`` (duplicate centroids repaired), ``percentage_palett_enable`` (the first
    groups train, the rest keep their first LUT), ``palett_max_mem`` (the fraction of the attention held at once),
    ``quantize_activations`` with ``quant_min`` / ``quant_max`` / ``dtype`` (the module's output fake-quantized),
    eDKM's ``palett_unique``, ``palett_shard``, ``palett_min_tsize``; ``palett_batch_mode``, ``palett_dist`` and
    ``kmeans_batch_threshold`` only distribute work in coremltools (lowbit computes every group at once: the same
    result); ``palett_lambda``, ``add_extra_centroid`` and ``kmeans_error_bnd`` have no effect in coremltools' DKM
    and none here (a warning when set); ``partition_size`` and ``cluster_dtype`` are refused, as coremltools 9.0
    refuses them.

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
        for name, replacement in DEPRECATED.items():
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is deprecated (coremltools 9.0 refuses it too): set {replacement} instead")
        for name, (default, why) in NO_EFFECT.items():
            if getattr(self, name) != default:
                warnings.warn(f"{name}={getattr(self, name)!r} has no effect: {why}", UserWarning, stacklevel=3)
        self._check_activation_quantization()
        if self.cluster_permute is not None:
            permute = self.cluster_permute
            if not isinstance(permute, list | tuple) or any(
                isinstance(a, bool) or not isinstance(a, int) for a in permute
            ):
                raise TypeError(f"cluster_permute must be None or a tuple of axes, got {permute!r}")
            if sorted(permute) != list(range(len(permute))):
                raise ValueError(f"cluster_permute must be a permutation of 0..{len(permute) - 1}, got {permute!r}")
            object.__setattr__(self, "cluster_permute", tuple(permute))
        for name in ("palett_max_mem", "percentage_palett_enable"):
            if not 0 < _check_float(name, getattr(self, name)) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if _check_float("palett_cluster_tol", self.palett_cluster_tol) > 1:
            raise ValueError(f"palett_cluster_tol must be in [0, 1], got {self.palett_cluster_tol}")
        for name in ("quantize_activations", "add_extra_centroid", "palett_batch_mode", "palett_dist"):
            check_bool(name, getattr(self, name))
        check_int("kmeans_batch_threshold", self.kmeans_batch_threshold, 1)
        _check_float("kmeans_error_bnd", self.kmeans_error_bnd)
        _check_float("palett_lambda", self.palett_lambda)
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

    def _check_activation_quantization(self) -> None:
        """``dtype`` (``qint8`` / ``quint8``, or their names) and a ``quant_min`` .. ``quant_max`` range inside it
        that holds 0: checked whether or not ``quantize_activations`` is set, as coremltools checks them."""
        dtype = self.dtype
        if isinstance(dtype, str):  # a name, as as_dict() writes it
            dtype = ACTIVATION_DTYPES.get(dtype.removeprefix("torch.").lower(), dtype)
        object.__setattr__(self, "dtype", check_choice("dtype", dtype, ACTIVATION_RANGES))
        low, high = ACTIVATION_RANGES[self.dtype]
        check_int("quant_min", self.quant_min)
        check_int("quant_max", self.quant_max)
        if not low <= self.quant_min <= 0 <= self.quant_max <= high or self.quant_min >= self.quant_max:
            raise ValueError(
                f"quant_min / quant_max must satisfy {low} <= quant_min <= 0 <= quant_max <= {high} for {self.dtype} "
                f"and quant_min < quant_max, got {self.quant_min} / {self.quant_max}"
            )

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
