"""PostTrainingPalettizer: k-means palettization of a torch model's weights, no data needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.config import PalettizeConfig, check_bool, check_choice, check_int
from lowbit.torch.config import ModelConfig, ModuleConfig
from lowbit.torch.palettization._base import PalettizerBase
from lowbit.types import CompressionGranularity, DType

__all__ = [
    "KMeansModuleConfig",
    "ModulePostTrainingPalettizerConfig",
    "PostTrainingPalettizer",
    "PostTrainingPalettizerConfig",
]

GRANULARITIES = ("per_tensor", "per_grouped_channel")
LUT_DTYPES = {None: None, "int8": DType.INT8, "uint8": DType.UINT8}


def lut_dtype_of(value: Any) -> DType | None:
    """The :class:`DType` of a ``lut_dtype`` option: None, ``torch.int8`` / ``torch.uint8`` or their names."""
    key = str(value).removeprefix("torch.") if value is not None else None
    return LUT_DTYPES[check_choice("lut_dtype", key, LUT_DTYPES)]


@dataclass(frozen=True)
class KMeansModuleConfig(ModuleConfig):
    """The options every post-training palettizer's module config has.

    Parameters
    ----------
    n_bits : bits per index, one of {1, 2, 3, 4, 6, 8} (default 4): a LUT of ``2**n_bits`` entries.
    lut_dtype : None (default: LUT entries in the weight's dtype), ``torch.int8`` or ``torch.uint8`` (LUT entries
        quantized symmetrically with one scale per LUT).
    granularity : ``"per_tensor"`` (default, one LUT) or ``"per_grouped_channel"`` (one LUT per ``group_size``
        channels along ``channel_axis``).
    group_size : channels per LUT with ``"per_grouped_channel"`` (required there, None otherwise); a weight whose
        channel count does not divide is skipped with a warning.
    channel_axis : 0 (default: the module's output channels) or 1 (its input channels): the axis that groups and
        vectors run along. A transposed convolution's output channels are its weight's axis 1, so 0 and 1 keep
        meaning output and input channels for every module.
    cluster_dim : None or 1 (scalar, exact k-means) or ``> 1``: LUT entries are vectors of this many channels
        along ``channel_axis``. Not with ``enable_per_channel_scale``.
    enable_per_channel_scale : divide each channel by its max-abs before clustering (default False).

    Raises ``ValueError`` / ``TypeError`` naming the option and its allowed values.
    """

    n_bits: int = 4
    lut_dtype: Any = None
    granularity: str = "per_tensor"
    group_size: int | None = None
    channel_axis: int = 0
    cluster_dim: int | None = None
    enable_per_channel_scale: bool = False

    def __post_init__(self) -> None:
        granularity = self.granularity
        if isinstance(granularity, CompressionGranularity):
            granularity = granularity.name.lower()
        object.__setattr__(self, "granularity", check_choice("granularity", granularity, GRANULARITIES))
        if self.granularity == "per_grouped_channel" and self.group_size is None:
            raise ValueError("group_size must be set (an int >= 1) when granularity is 'per_grouped_channel'")
        if self.group_size is not None:
            check_int("group_size", self.group_size, 1)
            if self.granularity == "per_tensor":
                raise ValueError("group_size must be None when granularity is 'per_tensor' (one LUT per tensor)")
        check_choice("channel_axis", check_int("channel_axis", self.channel_axis), (0, 1))
        if self.cluster_dim is not None:
            check_int("cluster_dim", self.cluster_dim, 1)
        self.weight_config()  # validates n_bits, lut_dtype, the per-channel scale and their combinations

    def _kmeans_options(self) -> dict[str, Any]:
        """Options of the weight layer's k-means a subclass sets (default: the weight layer's defaults)."""
        return {}

    def weight_config(self) -> PalettizeConfig:
        """The weight layer's :class:`~lowbit.config.PalettizeConfig` of this module config."""
        return PalettizeConfig(
            lut_dtype=lut_dtype_of(self.lut_dtype),
            n_bits=self.n_bits,
            granularity=CompressionGranularity[self.granularity.upper()],
            group_size=self.group_size or 1,
            cluster_dim=self.cluster_dim or 1,
            enable_per_channel_scale=self.enable_per_channel_scale,
            weight_num_threshold=0,
            **self._kmeans_options(),
        )


@dataclass(frozen=True)
class ModulePostTrainingPalettizerConfig(KMeansModuleConfig):
    """How the weights of one module are palettized: the options of :class:`KMeansModuleConfig`, and

    enable_fast_kmeans_mode : cluster float32 weights' fp16-rounded values (default True; 16-bit weights are always
        clustered exactly); False clusters the raw values.
    rounding_precision : accepted for compatibility (default 4): lowbit's fast mode rounds to fp16, not to
        decimal places.
    """

    enable_fast_kmeans_mode: bool = True
    rounding_precision: int = 4

    def __post_init__(self) -> None:
        check_bool("enable_fast_kmeans_mode", self.enable_fast_kmeans_mode)
        check_int("rounding_precision", self.rounding_precision, 0)
        super().__post_init__()

    def _kmeans_options(self) -> dict[str, Any]:
        return {"enable_fast_kmeans_mode": self.enable_fast_kmeans_mode, "rounding_precision": self.rounding_precision}


@dataclass
class PostTrainingPalettizerConfig(ModelConfig[ModulePostTrainingPalettizerConfig]):
    """Per-module configs for :class:`PostTrainingPalettizer`: ``global_config``, ``module_type_configs`` (module
    classes or class names), ``module_name_configs`` (names or regular expressions); ``None`` skips a module."""

    module_config: ClassVar[type[ModuleConfig]] = ModulePostTrainingPalettizerConfig


class PostTrainingPalettizer(PalettizerBase[PostTrainingPalettizerConfig]):
    """Palettize a model's weights with exact k-means, without data.

    ``PostTrainingPalettizer(model, config).compress()`` returns a model whose supported weights (Linear, Conv*,
    ConvTranspose*, Embedding, MultiheadAttention, LSTM / GRU / RNN) hold at most ``2**n_bits`` distinct values per
    LUT. Each palettized module records its palettization in ``module.lowbit_palettization`` (see
    :func:`lowbit.torch.palettization_of`); :func:`lowbit.torch.report` tabulates it and
    :func:`lowbit.torch.export_onnx` writes it into an ONNX file. ``config`` defaults to 4-bit per-tensor for every
    supported module.
    """

    config_class = PostTrainingPalettizerConfig

    def compress(self, num_kmeans_workers: int = 1, inplace: bool = False) -> nn.Module:
        """Palettize and return the model: a deep copy (default) or, with ``inplace=True``, the model itself.

        ``num_kmeans_workers`` threads share each weight's per-group k-means (the compiled kernel releases the
        GIL); the result does not depend on it.

        Raises ``ValueError`` when a parameter is on the meta device. A weight that cannot be palettized as
        configured (channels that do not divide, NaN / Inf values, an integer dtype) is left as it is with a
        ``UserWarning`` naming it and the reason.
        """
        model = self._target_model(inplace)
        with torch.no_grad():
            self._palettize(list(self._targets(model)), lambda target: None, num_kmeans_workers)
        self._model = model
        return model
