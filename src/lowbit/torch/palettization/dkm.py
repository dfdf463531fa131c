"""DKMPalettizer: training-time palettization with differentiable k-means (DKM, Cho et al. 2022), with eDKM's
attention over unique weight values (``palett_unique``).

``prepare`` registers a :class:`FakePalettize` parametrization on each weight (``torch.nn.utils.parametrize``), so
optimizers, ``state_dict`` and DDP see ordinary parameters; each forward replaces the weight by its soft-assigned
reconstruction ``A @ C`` (see :mod:`lowbit.torch.palettization.fake_palettize`). With ``quantize_activations`` each
palettized module's output is fake-quantized too. ``finalize`` writes the hard-assigned LUT values back (at most
``2**n_bits`` distinct values per LUT), removes the parametrizations and records the palettization so
:func:`lowbit.torch.export_onnx` writes it as LUT + indices (and the activations' fake quantization as
QuantizeLinear / DequantizeLinear).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
from torch.nn.utils import parametrize

from lowbit.config import PalettizeConfig
from lowbit.errors import SkipWeight
from lowbit.report import CompressionReport
from lowbit.torch._compressor import target_model
from lowbit.torch.modules import computed_weights, is_supported, module_weights, numpy_dtype, qualified_name, to_numpy
from lowbit.torch.palettization.dkm_config import DKMPalettizerConfig, ModuleDKMPalettizerConfig, config_for_size
from lowbit.torch.palettization.fake_palettize import FakePalettize
from lowbit.torch.records import store_palettization
from lowbit.types import CompressionGranularity
from lowbit.weights import check_eligible, palettize_weight

__all__ = ["ACTIVATION_QUANTIZER", "DKMPalettizer", "FakePalettize"]

ACTIVATION_QUANTIZER = "activation_post_process"  # the child module fake-quantizing a palettized module's output


class DKMPalettizer:
    """Palettize a model while it trains: ``prepare`` / ``step`` / ``finalize`` / ``report``.

    ``DKMPalettizer(model, config)``; ``config`` defaults to DKM on every supported module (4 bits for Linear, 2
    otherwise, weights of at least 2048 elements).
    """

    def __init__(self, model: nn.Module, config: DKMPalettizerConfig | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        config = DKMPalettizerConfig() if config is None else config
        if not isinstance(config, DKMPalettizerConfig):
            raise TypeError(f"config must be a DKMPalettizerConfig, got {type(config).__name__}")
        self._model, self._config, self._steps = model, config, 0
        self._fakes: list[FakePalettize] = []

    def prepare(self, inplace: bool = False) -> nn.Module:
        """Register a :class:`FakePalettize` on every configured weight; returns the model (a deep copy unless
        ``inplace``). Weights below their config's ``weight_threshold`` stay as they are; a weight whose channels do
        not split into the configured groups and vectors is left with a ``UserWarning`` naming it. ``ValueError``
        when a parameter is on the meta device."""
        model = target_model(self._model, inplace)
        tied: dict[int, str] = {}
        for module_name, config in self._config.resolve(model, is_supported).items():
            module = model.get_submodule(module_name)
            for name, reason in computed_weights(module):
                warnings.warn(
                    f"weight {qualified_name(module_name, name)!r} skipped: {reason}", UserWarning, stacklevel=2
                )
            for weight in module_weights(module):
                chosen = config_for_size(config, weight.parameter.numel())
                if chosen is None:
                    continue
                qualified = qualified_name(module_name, weight.name)
                try:
                    axis = _grouping_axis(chosen, weight.parameter.dim(), weight.input_axis, weight.output_axis)
                    check_eligible(weight.parameter.shape, numpy_dtype(weight.parameter.dtype), 0)
                    first = tied.setdefault(id(weight.parameter), qualified)
                    if first != qualified:
                        raise SkipWeight(
                            f"tied to {first!r} (one parameter), which DKM palettizes: this module trains on the "
                            "dense weight until finalize() writes the palettized values into the shared parameter"
                        )
                    fake = FakePalettize(chosen, chosen.bits_for(module), weight.parameter, axis)
                except SkipWeight as skip:
                    warnings.warn(f"weight {qualified!r} skipped: {skip.reason}", UserWarning, stacklevel=2)
                    continue
                owner_name, _, name = weight.name.rpartition(".")  # an attention's out_proj.weight
                parametrize.register_parametrization(module.get_submodule(owner_name), name, fake)
                fake.cache_during(module)
                self._fakes.append(fake)
                if chosen.quantize_activations and not hasattr(module, ACTIVATION_QUANTIZER):
                    _quantize_output(module, chosen)
        self._model = model
        return model

    def step(self) -> None:
        """Advance the step count: palettization of a weight starts once it reaches the config's ``milestone``."""
        self._steps += 1
        for fake in self._fakes:
            if self._steps >= fake.config.milestone:
                fake.enabled.fill_(True)

    def finalize(self, model: nn.Module | None = None, inplace: bool = False) -> nn.Module:
        """Replace each palettized weight by its hard-assigned LUT values, remove the parametrizations and record
        each palettization (LUT + indices) for :func:`lowbit.torch.export_onnx`; returns the plain model."""
        model = self._model if model is None else model
        model = model if inplace else _independent_copy(model)
        finalized = 0
        for module_name, module in model.named_modules():
            if not parametrize.is_parametrized(module):
                continue
            lists: nn.ModuleDict = module.parametrizations  # type: ignore[assignment]
            for name in list(lists.keys()):
                chain: parametrize.ParametrizationList = lists[name]  # type: ignore[assignment]
                fakes = [p for p in chain if isinstance(p, FakePalettize)]
                if not fakes:
                    continue
                qualified = qualified_name(module_name, name)
                if not bool(fakes[0].enabled):
                    warnings.warn(
                        f"weight {qualified!r} is finalized before its milestone (step {self._steps} of "
                        f"{fakes[0].config.milestone}): it never trained palettized, its LUT is plain k-means",
                        UserWarning,
                        stacklevel=2,
                    )
                latent = chain.original.detach().clone()
                hard = fakes[0].hard(latent)
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                with torch.no_grad():
                    getattr(module, name).copy_(hard)
                _record_lut(module, name, qualified, fakes[0], latent)
                finalized += 1
        for module in model.modules():  # the activations' ranges stop moving: export writes them as Q / DQ
            if isinstance(quantizer := getattr(module, ACTIVATION_QUANTIZER, None), FakeQuantize):
                quantizer.disable_observer()
        if not finalized:
            warnings.warn(
                "finalize() found no weight DKM trains: call prepare() first (and train the model it returns)",
                UserWarning,
                stacklevel=2,
            )
        self._model = model
        return model

    def report(self) -> CompressionReport:
        """The per-weight report of the model: during training each weight's state and the error of its hard
        assignment now; after :meth:`finalize` what was recorded (see :func:`lowbit.torch.report`)."""
        from lowbit.torch.report import report

        return report(self._model)


def _independent_copy(model: nn.Module) -> nn.Module:
    """A deep copy of a prepared model that finalizing cannot reach back through: each parametrized module gets its
    own class (torch's parametrize shares one class between a module and its copies, and removing a parametrization
    edits that class), and tensors computed from the parametrizations (a recurrent layer's ``_flat_weights`` after a
    step), which cannot be deep-copied, are copied detached (the next forward recomputes them)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in module.__dict__.values():
            for tensor in value if isinstance(value, list) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
                    memo[id(tensor)] = tensor.detach()
    replica = copy.deepcopy(model, memo)
    for module in replica.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return replica


def _grouping_axis(config: ModuleDKMPalettizerConfig, rank: int, input_axis: int, output_axis: int) -> int:
    """The weight axis LUT groups and vectors run along: ``channel_axis`` (0: the output channels, 1: the input
    channels), or with ``cluster_permute`` its first axis, as coremltools partitions the permuted weight along its
    first dimension. :class:`SkipWeight` when ``cluster_permute`` is not a permutation of the weight's axes."""
    permute = config.cluster_permute
    if permute is None:
        return input_axis if config.channel_axis == 1 else output_axis
    if sorted(permute) != list(range(rank)):
        raise SkipWeight(f"cluster_permute {tuple(permute)} is not a permutation of the weight's {rank} axes")
    return int(permute[0])


def _quantize_output(module: nn.Module, config: ModuleDKMPalettizerConfig) -> None:
    """Fake-quantize ``module``'s output from now on (``quantize_activations``): per tensor, affine, ``quant_min`` ..
    ``quant_max`` of ``dtype``, the range a moving average of the batches' min / max (as coremltools' observer,
    but one scale for the tensor where coremltools keeps one per index of the output's first axis)."""
    observer = MovingAverageMinMaxObserver.with_args(
        averaging_constant=0.01,
        dtype=config.dtype,
        quant_min=config.quant_min,
        quant_max=config.quant_max,
        qscheme=torch.per_tensor_affine,
    )
    quantizer = FakeQuantize(observer=observer, quant_min=config.quant_min, quant_max=config.quant_max)
    device = next(module.parameters()).device
    module.add_module(ACTIVATION_QUANTIZER, quantizer.to(device))
    module.register_forward_hook(_fake_quantized_output)


def _fake_quantized_output(module: nn.Module, args: Any, output: Any) -> Any:
    quantizer = getattr(module, ACTIVATION_QUANTIZER, None)
    if quantizer is None or not isinstance(output, torch.Tensor):
        return output
    return quantizer(output)


def _record_lut(module: nn.Module, name: str, qualified: str, fake: FakePalettize, latent: torch.Tensor) -> None:
    """Record the finalized weight's LUTs and indices: its values are exactly the LUT entries, so the weight layer's
    ``unique`` mode recovers them bit for bit; the recorded error is the hard assignment's against ``latent``, the
    weight as trained."""
    param = getattr(module, name)
    per_group = fake.config.group_size
    config = PalettizeConfig(
        n_bits=fake.n_bits,
        granularity=CompressionGranularity.PER_GROUPED_CHANNEL if per_group else CompressionGranularity.PER_TENSOR,
        group_size=per_group or 1,
        cluster_dim=fake.cluster_dim,
        weight_num_threshold=0,
        mode="unique",
    )
    try:
        if fake.config.enable_per_channel_scale:
            raise SkipWeight("a per-channel scale makes more than 2**n_bits distinct values per LUT")
        exact = palettize_weight(to_numpy(param), fake.axis, config)
    except SkipWeight as skip:
        warnings.warn(
            f"weight {qualified!r}: its palettization is not recorded ({skip.reason})", UserWarning, stacklevel=3
        )
        return
    dense, hard = latent.detach().double(), param.detach().double()
    error = float(((hard - dense) ** 2).sum())
    palettized = dataclasses.replace(exact.palettized, squared_error=error, energy=float((dense**2).sum()))
    store_palettization(module, name, dataclasses.replace(exact, palettized=palettized))
