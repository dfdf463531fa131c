"""PostTrainingQuantizer: linear quantization of a torch model's weights, data-free or with GPTQ's error feedback."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.config import QuantizeConfig, check_bool, check_choice, check_int
from lowbit.errors import SkipWeight
from lowbit.kernels.quantize import INTEGER_DTYPES as INTEGER_NUMPY_DTYPES
from lowbit.statistics import InputMoments
from lowbit.torch._compressor import CompressorBase, Target, skip
from lowbit.torch.calibration import reads_rows
from lowbit.torch.config import ModelConfig, ModuleConfig
from lowbit.torch.modules import from_numpy, to_numpy
from lowbit.torch.records import store_quantization
from lowbit.torch.sequential import calibration_items, compressed_in_sequence
from lowbit.types import CompressionGranularity, DType, QScheme
from lowbit.weights import QuantizedWeight, quantize_weight

__all__ = ["ModulePostTrainingQuantizerConfig", "PostTrainingQuantizer", "PostTrainingQuantizerConfig"]

WEIGHT_DTYPES = {
    "int8": DType.INT8,
    "uint8": DType.UINT8,
    "int4": DType.INT4,
    "uint4": DType.UINT4,
    "fp8_e4m3": DType.FP8_E4M3FN,
    "fp8_e5m2": DType.FP8_E5M2,
}
# the weight dtypes whose codes are integers (the error feedback chooses them): the kernels' table, by option name
INTEGER_DTYPES = tuple(name for name, dtype in WEIGHT_DTYPES.items() if dtype.numpy in INTEGER_NUMPY_DTYPES)
GRANULARITIES = {
    "per_tensor": CompressionGranularity.PER_TENSOR,
    "per_channel": CompressionGranularity.PER_CHANNEL,
    "per_block": CompressionGranularity.PER_BLOCK,
}
SCHEMES = {"symmetric": QScheme.SYMMETRIC, "affine": QScheme.ASYMMETRIC}


TORCH_NAMES = {"float8_e4m3fn": "fp8_e4m3", "float8_e5m2": "fp8_e5m2"}


def _key(value: Any) -> Any:
    """A string option's key: ``torch.int8`` and ``"INT8"`` read as ``"int8"``, ``torch.float8_e4m3fn`` as
    ``"fp8_e4m3"``."""
    if not isinstance(value, (str, torch.dtype)):
        return value
    key = str(value).removeprefix("torch.").lower()
    return TORCH_NAMES.get(key, key)


@dataclass(frozen=True)
class ModulePostTrainingQuantizerConfig(ModuleConfig):
    """How the weights of one module are quantized.

    Parameters
    ----------
    weight_dtype : ``"int8"`` (default), ``"uint8"``, ``"int4"``, ``"uint4"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``
        (``torch.int8`` / ``torch.uint8`` and the float8 dtypes too).
    granularity : ``"per_channel"`` (default: one scale per output channel), ``"per_tensor"`` or ``"per_block"``
        (one scale per output channel and ``block_size`` input channels; the last block may be shorter).
    quantization_scheme : ``"symmetric"`` (default) or ``"affine"`` (a zero point per scale, integers only).
    block_size : input channels per block with ``"per_block"`` (required there, None otherwise).
    scale_search : lowbit's extension (default False): each scale's clipping range searched (60 % to 100 % of the
        block's) for the least squared error, integers only.

    Raises ``ValueError`` / ``TypeError`` naming the option and its allowed values.
    """

    weight_dtype: Any = "int8"
    granularity: str = "per_channel"
    quantization_scheme: str = "symmetric"
    block_size: int | None = None
    scale_search: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_dtype", check_choice("weight_dtype", _key(self.weight_dtype), WEIGHT_DTYPES))
        object.__setattr__(self, "granularity", check_choice("granularity", _key(self.granularity), GRANULARITIES))
        scheme = check_choice("quantization_scheme", _key(self.quantization_scheme), SCHEMES)
        object.__setattr__(self, "quantization_scheme", scheme)
        check_bool("scale_search", self.scale_search)
        if self.granularity == "per_block" and self.block_size is None:
            raise ValueError("block_size must be set (an int >= 1) when granularity is 'per_block'")
        if self.block_size is not None:
            check_int("block_size", self.block_size, 1)
            if self.granularity != "per_block":
                raise ValueError(f"block_size must be None when granularity is {self.granularity!r}")
        if self.weight_dtype.startswith("fp8") and self.quantization_scheme != "symmetric":
            raise ValueError(f"quantization_scheme must be 'symmetric' for weight_dtype {self.weight_dtype!r}")
        if self.weight_dtype.startswith("fp8") and self.scale_search:
            raise ValueError(f"scale_search must be False for weight_dtype {self.weight_dtype!r} (integers only)")

    def weight_config(self) -> QuantizeConfig:
        """The weight layer's :class:`~lowbit.config.QuantizeConfig` of this module config."""
        return QuantizeConfig(
            dtype=WEIGHT_DTYPES[self.weight_dtype],
            qscheme=SCHEMES[self.quantization_scheme],
            granularity=GRANULARITIES[self.granularity],
            block_size=self.block_size or 1,
            weight_num_threshold=0,
            scale_search=self.scale_search,
        )


@dataclass
class PostTrainingQuantizerConfig(ModelConfig[ModulePostTrainingQuantizerConfig]):
    """Per-module configs for :class:`PostTrainingQuantizer`: ``global_config``, ``module_type_configs`` (module
    classes or class names), ``module_name_configs`` (names or regular expressions); ``None`` skips a module."""

    module_config: ClassVar[type[ModuleConfig]] = ModulePostTrainingQuantizerConfig


class PostTrainingQuantizer(CompressorBase[PostTrainingQuantizerConfig]):
    """Quantize a model's weights linearly (int8 / int4 / fp8 codes with per-tensor, per-channel or per-block
    scales), the codes the graph path's ``quantize_weights`` gives the same weight.

    ``PostTrainingQuantizer(model, config).compress()`` returns a model whose supported weights (Linear, Conv*,
    ConvTranspose*, Embedding, MultiheadAttention, LSTM / GRU / RNN) hold their dequantized values. Each quantized
    module records its codes and scales in a buffer (see :func:`lowbit.torch.quantization.quantization_of`);
    :func:`lowbit.torch.report` tabulates them and :func:`lowbit.torch.export_onnx` writes them as ONNX's
    ``DequantizeLinear`` wherever the exporter keeps a weight's values (as they are or transposed; a recurrent
    layer's restacked gates and a folded BatchNorm are exported dense, with a warning). ``config`` defaults to
    int8 per-channel symmetric for every supported module.
    """

    config_class = PostTrainingQuantizerConfig

    def compress(
        self,
        inplace: bool = False,
        calibration_data: Iterable[Any] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> nn.Module:
        """Quantize and return the model: a deep copy (default) or, with ``inplace=True``, the model itself.

        ``calibration_data`` (lowbit's extension; default None: round to nearest): items run through
        ``forward_fn(model, item)`` (default ``model(**item)`` / ``model(*item)`` / ``model(item)``), block by
        block, while forward hooks collect each quantized ``nn.Linear`` weight's input ``X^T X`` (a
        convolution's: over its input's windows, a grouped one's per group); those weights' integer codes are then
        chosen with GPTQ's error feedback (in act-order, the scales kept; on ``torch.get_num_threads()`` threads,
        the result the same on any). Other weights, and float dtypes, are rounded to nearest.

        Raises ``ValueError`` when a parameter is on the meta device or ``calibration_data`` yields nothing. A
        weight that cannot be quantized (NaN / Inf values, an integer dtype) is left as it is with a
        ``UserWarning`` naming it and the reason.
        """
        model = self._target_model(inplace)
        targets = list(self._targets(model))
        fed = [t for t in targets if calibration_data is not None and _fed_back(t)]
        if calibration_data is not None and not fed:
            warnings.warn(
                "calibration_data is not used: no nn.Linear or convolution weight is quantized to an integer dtype "
                "(the error feedback chooses their integer codes; "
                f"{sorted(set(WEIGHT_DTYPES) - set(INTEGER_DTYPES))} and other modules' weights round to nearest)",
                UserWarning,
                stacklevel=2,
            )
        with torch.no_grad():
            if calibration_data is not None and fed:
                items = calibration_items(calibration_data)
                _write(compressed_in_sequence(model, fed, items, forward_fn, _quantized))
            names = {t.name for t in fed}
            _write(_quantized([t for t in targets if t.name not in names], {}))
        self._model = model
        return model


Outcome = tuple[Target[ModulePostTrainingQuantizerConfig], QuantizedWeight]


def _fed_back(target: Target) -> bool:
    """Whether calibration changes ``target``'s codes: a Linear's or a convolution's integer codes (error
    feedback)."""
    return reads_rows(target.module) and target.config.weight_dtype in INTEGER_DTYPES


def _quantized(targets: list[Target], statistics: Mapping[str, InputMoments]) -> Iterator[Outcome]:
    """Each target quantized (with error feedback where ``statistics`` has its inputs and its codes are integers),
    not yet written."""
    for target in targets:
        stats = statistics.get(target.name)
        weight = target.weight
        try:
            result = quantize_weight(
                to_numpy(weight.parameter),
                weight.output_axis,
                weight.input_axis,
                target.config.weight_config(),
                gram=None if stats is None else stats.gram,
                threads=torch.get_num_threads(),
            )
        except SkipWeight as skipped:
            skip(target, skipped)
            continue
        yield target, result


def _write(outcomes: Iterable[Outcome]) -> None:
    """Each quantized weight's values into its parameter, its record on its module."""
    for target, result in outcomes:
        param = target.weight.parameter
        param.copy_(from_numpy(result.decode(), param))
        store_quantization(target.module, target.weight.name, result)
