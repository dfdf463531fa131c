"""What every post-training palettizer shares: pick each module's config, hand each weight to the weight layer,
write the palettized values back into the parameter, and record what was done on the module."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from lowbit.config import PalettizeConfig, check_int
from lowbit.errors import SkipWeight
from lowbit.report import CompressionReport
from lowbit.torch.config import ModelConfig, ModuleConfig
from lowbit.torch.modules import ModuleWeight, from_numpy, is_supported, module_weights, numpy_dtype, to_numpy
from lowbit.weights import PalettizedWeight, check_eligible, palettize_weight

__all__ = ["RECORD", "SKIPPED", "PalettizerBase", "Target"]

RECORD = "lowbit_palettization"  # module attribute: {parameter name: PalettizedWeight}
SKIPPED = "lowbit_skipped"  # module attribute: {parameter name: why it was left as it is}

MC = TypeVar("MC", bound=ModelConfig)


@dataclass(frozen=True)
class Target:
    """One weight to palettize: the module's qualified name, the module, the weight, and its config."""

    module_name: str
    module: nn.Module
    weight: ModuleWeight
    config: PalettizeConfig
    axis: int  # the weight's axis that LUT groups and vectors run along
    damping: float  # of the importance, when there is one

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.weight.name}" if self.module_name else self.weight.name


class PalettizerBase(Generic[MC]):
    """Base of :class:`PostTrainingPalettizer` and :class:`SKMPalettizer`."""

    config_class: type[MC]

    def __init__(self, model: nn.Module, config: MC | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self._model = model
        self._config = config

    def report(self) -> CompressionReport:
        """The per-weight report of the model this palettizer compressed last (see :func:`lowbit.torch.report`)."""
        from lowbit.torch.report import report

        return report(self._model)

    def _target_model(self, inplace: bool) -> nn.Module:
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
        for name, param in self._model.named_parameters():
            if param.device.type == "meta":
                raise ValueError(
                    f"parameter {name!r} is on the meta device: it has no values to palettize; load the weights first"
                )
        return self._model if inplace else copy.deepcopy(self._model)

    def _targets(self, model: nn.Module) -> Iterator[Target]:
        """Every weight to palettize, with its module's config; weights that cannot be are recorded as skipped."""
        for module_name, config in self._config.resolve(model, is_supported).items():
            module = model.get_submodule(module_name)
            for weight in module_weights(module):
                axis = weight.input_axis if getattr(config, "channel_axis", 0) == 1 else weight.output_axis
                damping = getattr(config, "sensitivity_damping", 0.0)
                target = Target(module_name, module, weight, weight_config(config), axis, damping)
                try:
                    check_eligible(weight.parameter.shape, numpy_dtype(weight.parameter.dtype), 0)
                except SkipWeight as skip:
                    _skip(target, skip)
                    continue
                yield target

    def _palettize(
        self, targets: list[Target], importance: Callable[[Target], np.ndarray | None], threads: int
    ) -> None:
        """Palettize each target, its k-means on ``threads`` threads; record the result on its module."""
        check_int("num_kmeans_workers", threads, 1)
        for target in targets:
            param = target.weight.parameter
            try:
                result = palettize_weight(
                    to_numpy(param),
                    target.axis,
                    target.config,
                    name=target.name,
                    importance=importance(target),
                    threads=threads,
                    damping=target.damping,
                )
            except SkipWeight as skip:
                _skip(target, skip)
                continue
            with torch.no_grad():
                param.copy_(from_numpy(result.decode(), param))
            _record(target.module, RECORD, target.weight.name, result)


def weight_config(config: ModuleConfig) -> PalettizeConfig:
    """The weight layer's config of a module config (every palettizer's module config has ``weight_config``)."""
    return config.weight_config()  # type: ignore[attr-defined]


def _record(module: nn.Module, attribute: str, key: str, value: Any) -> None:
    records = module.__dict__.setdefault(attribute, {})
    records[key] = value


def _skip(target: Target, skip: SkipWeight) -> None:
    if skip.warn:
        warnings.warn(f"weight {target.name!r} skipped: {skip.reason}", UserWarning, stacklevel=4)
    _record(target.module, SKIPPED, target.weight.name, skip.reason)


def palettization_of(module: nn.Module) -> dict[str, PalettizedWeight]:
    """The palettization recorded on ``module`` by a palettizer: parameter name -> :class:`PalettizedWeight`."""
    return dict(module.__dict__.get(RECORD, {}))
