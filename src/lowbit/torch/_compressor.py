"""What every post-training compressor of a torch model shares: pick each module's config, list the weights to
compress (skipping, with a reason, those that cannot be, and compressing a tied parameter once), and note on each
module what was done."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import nn

from lowbit.errors import SkipWeight, warn_skipped
from lowbit.report import CompressionReport
from lowbit.torch.config import ModelConfig, ModuleConfig
from lowbit.torch.modules import (
    ModuleWeight,
    computed_weights,
    is_supported,
    module_weights,
    numpy_dtype,
    qualified_name,
)
from lowbit.weights import check_eligible

__all__ = ["ALLOCATED", "SKIPPED", "CompressorBase", "Target", "record_skip", "skip", "target_model"]

SKIPPED = "lowbit_skipped"  # module attribute: {parameter name: why it was left as it is}
ALLOCATED = "lowbit_allocated"  # module attribute: {parameter name: (n_bits, bits_per_weight budget)}

MC = TypeVar("MC", bound=ModelConfig)
C = TypeVar("C", bound=ModuleConfig)


@dataclass(frozen=True)
class Target(Generic[C]):
    """One weight to compress: the module's qualified name, the module, the weight, and its config."""

    module_name: str
    module: nn.Module
    weight: ModuleWeight
    config: C

    @property
    def axis(self) -> int:
        """The weight's axis that LUT groups and vectors run along: its input axis when the config's
        ``channel_axis`` is 1, else its output axis."""
        return self.weight.input_axis if getattr(self.config, "channel_axis", 0) == 1 else self.weight.output_axis

    @property
    def name(self) -> str:
        return qualified_name(self.module_name, self.weight.name)


def target_model(model: nn.Module, inplace: bool) -> nn.Module:
    """The model a compressor works on: ``model`` itself when ``inplace``, else a deep copy. ``ValueError`` when a
    parameter is on the meta device (no values to compress), ``TypeError`` when ``inplace`` is not a bool."""
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            raise ValueError(
                f"parameter {name!r} is on the meta device: it has no values to compress; load the weights first"
            )
    return model if inplace else copy.deepcopy(model)


class CompressorBase(Generic[MC]):
    """Base of the post-training palettizers and :class:`~lowbit.torch.quantization.PostTrainingQuantizer`."""

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
        """The per-weight report of the model this compressor compressed last (see :func:`lowbit.torch.report`)."""
        from lowbit.torch.report import report

        return report(self._model)

    def _target_model(self, inplace: bool) -> nn.Module:
        return target_model(self._model, inplace)

    def _targets(self, model: nn.Module, record: bool = True) -> Iterator[Target]:
        """Every weight to compress, with its module's config; weights that cannot be are recorded as skipped
        (with a warning) when ``record``, else left out silently (a model that is only measured stays as it is)."""
        tied: dict[int, Target] = {}  # parameter -> the first target holding it
        for module_name, config in self._config.resolve(model, is_supported).items():
            module = model.get_submodule(module_name)
            for name, reason in computed_weights(module):
                if record:
                    qualified = qualified_name(module_name, name)
                    warn_skipped(qualified, SkipWeight(reason))
                    record_skip(module, name, reason)
            for weight in module_weights(module):
                target = Target(module_name, module, weight, config)
                try:
                    check_eligible(weight.parameter.shape, numpy_dtype(weight.parameter.dtype), 0)
                    first = tied.setdefault(id(weight.parameter), target)
                    if first is not target:
                        raise _tied(target, first)
                except SkipWeight as skipped:
                    if record:
                        skip(target, skipped)
                    continue
                yield target


def _tied(target: Target, first: Target) -> SkipWeight:
    """The skip of a weight tied to (the same parameter as) an earlier one: compressed once, under the first
    module's config in model order; a warning when the two configs differ."""
    differ = first.config != target.config or first.axis != target.axis
    reason = f"tied to {first.name!r} (one parameter): compressed once, as {first.name!r}"
    if differ:
        reason += (
            f", with that module's config ({target.name!r} asked for another; the first module in model order wins)"
        )
    return SkipWeight(reason, warn=differ)


def record_skip(module: nn.Module, name: str, reason: str) -> None:
    """Note on ``module`` why its weight ``name`` was left as it is (for the report)."""
    module.__dict__.setdefault(SKIPPED, {})[name] = reason


def skip(target: Target, skipped: SkipWeight) -> None:
    """Leave ``target`` as it is: a warning naming it and the reason (unless the skip is a quiet one), noted for
    the report."""
    warn_skipped(target.name, skipped)
    record_skip(target.module, target.weight.name, skipped.reason)
