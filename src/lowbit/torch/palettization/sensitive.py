"""SKMPalettizer: sensitive k-means (SqueezeLLM) — k-means weighted by each element's diagonal Fisher information."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.budget import check_bits_per_weight
from lowbit.config import check_int
from lowbit.torch.config import ModelConfig, ModuleConfig
from lowbit.torch.modules import to_numpy
from lowbit.torch.palettization._base import (
    KMeansModuleConfig,
    PalettizerBase,
    Target,
    allocated_widths,
    write_palettized,
)

__all__ = ["ModuleSKMPalettizerConfig", "SKMPalettizer", "SKMPalettizerConfig"]


@dataclass(frozen=True)
class ModuleSKMPalettizerConfig(KMeansModuleConfig):
    """How the weights of one module are palettized by :class:`SKMPalettizer`: the options of
    :class:`~lowbit.torch.palettization._base.KMeansModuleConfig` (those of
    ``ModulePostTrainingPalettizerConfig`` without the fast-mode ones), and one of lowbit's own:

    sensitivity_damping : float >= 0 (default 0.01): each LUT group's mean sensitivity times this is added to every
        element's, so that a few outlying sensitivities cannot pull every centroid to themselves. What suits depends
        on how noisy the sensitivities are (measured, ``benchmarks/torch_palettize.py``): SmolLM2-135M, 8 x 256
        calibration tokens, 4-bit per tensor: perplexity 47.6 / 47.4 / 48.4 / 54.0 at 0 / 0.01 / 0.1 / 1.0;
        all-MiniLM-L6-v2 from 32 calibration sentences (a sentence-embedding loss): at 0.1 sensitive k-means lost to
        plain k-means at 3 bits per tensor (mean cosine 0.79 vs 0.82), at 0.3 to 3 it won at 3 and 4 bits, per
        tensor and grouped. Few or noisy calibration samples want more damping.

    Sensitivities are summed per fp16 value and the exact weighted k-means runs over those (the fp16 rounding of
    float32 weights moves them by < 1e-3 of a step of any LUT).
    """

    sensitivity_damping: float = 0.01

    def __post_init__(self) -> None:
        damping = self.sensitivity_damping
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
            raise ValueError(f"sensitivity_damping must be a number >= 0, got {damping!r}")
        super().__post_init__()

    def importance_damping(self) -> float:
        return float(self.sensitivity_damping)


@dataclass
class SKMPalettizerConfig(ModelConfig[ModuleSKMPalettizerConfig]):
    """Per-module configs for :class:`SKMPalettizer` (names in ``module_name_configs`` may be regular expressions),
    and ``calibration_nsamples`` (default 128): how many dataloader items the sensitivities are averaged over."""

    module_config: ClassVar[type[ModuleConfig]] = ModuleSKMPalettizerConfig
    calibration_nsamples: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("calibration_nsamples", self.calibration_nsamples, 1)


class SKMPalettizer(PalettizerBase[SKMPalettizerConfig]):
    """Sensitive k-means palettization (SqueezeLLM): each weight element's squared error counts in proportion to its
    diagonal Fisher information, the mean squared gradient of the loss over calibration samples; the weighted k-means
    is exact (the same dynamic program as :class:`PostTrainingPalettizer`, over importance-weighted histograms)."""

    config_class = SKMPalettizerConfig

    def compress(
        self,
        dataloader: Iterable[Any] | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        sensitivity_path: str | os.PathLike | None = None,
        num_kmeans_workers: int = 1,
        num_sensitivity_workers: int = 1,
        inplace: bool = False,
        fsdp_auto_wrap_policy: Any = None,
        bits_per_weight: float | None = None,
    ) -> nn.Module:
        """Measure sensitivities (or load them) and palettize; returns a deep copy (default) or the model itself.

        Parameters
        ----------
        dataloader, loss_fn : calibration data and ``loss_fn(model, item)`` -> scalar loss; see
            :meth:`compute_sensitivity`. Not needed when ``sensitivity_path`` names a saved sensitivity file.
        sensitivity_path : a file :meth:`compute_sensitivity` saved: when it exists it is used instead of
            calibrating (as coremltools does, even with a dataloader); when it does not, the sensitivities are
            computed from the dataloader and saved there.
        num_kmeans_workers : threads for each weight's per-group k-means (default 1; results do not depend on it).
        num_sensitivity_workers, fsdp_auto_wrap_policy : see :meth:`compute_sensitivity`.
        inplace : palettize ``model`` itself (default False: a deep copy).
        bits_per_weight : lowbit's extension, mixed bits (default None: every weight at its ``n_bits``): each weight
            palettized at 2, 3, 4, 6 and 8 bits, its sensitivity-weighted error measured at each, and the widths
            chosen so that the palettized weights take at most this many bits per element (LUTs included) with the
            smallest summed error; the report notes each weight's width.

        Raises ``ValueError`` when a parameter is on the meta device, the dataloader yields nothing, the
        sensitivity file lacks a weight, or ``bits_per_weight`` is not above 2 or below what 2 bits everywhere
        take; ``TypeError`` when neither calibration data nor a sensitivity file is given.
        """
        budget = check_bits_per_weight(bits_per_weight)
        model = self._target_model(inplace)
        targets = list(self._targets(model))
        if not targets:  # nothing to palettize (every config None, no float weight): nothing to calibrate
            self._model = model
            return model
        if sensitivity_path is not None and (dataloader is None or Path(sensitivity_path).is_file()):
            sensitivities = torch.load(sensitivity_path, map_location="cpu", weights_only=True)
        else:
            sensitivities = self._sensitivities(
                model, targets, dataloader, loss_fn, num_sensitivity_workers, fsdp_auto_wrap_policy
            )
            if sensitivity_path is not None:
                torch.save(sensitivities, sensitivity_path)
        missing = [t.name for t in targets if t.name not in sensitivities]
        if missing:
            raise ValueError(f"the sensitivities hold no entry for weight {missing[0]!r}")
        with torch.no_grad():
            sensitivity = lambda target: to_numpy(sensitivities[target.name])  # noqa: E731
            widths = allocated_widths(targets, sensitivity, num_kmeans_workers, {}, budget)
            write_palettized(self._palettized(targets, sensitivity, num_kmeans_workers, None, widths, budget))
        self._model = model
        return model

    def compute_sensitivity(
        self,
        dataloader: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        sensitivity_path: str | os.PathLike | None = None,
        num_sensitivity_workers: int = 1,
        fsdp_auto_wrap_policy: Any = None,
    ) -> dict[str, torch.Tensor]:
        """Each palettized weight's per-element sensitivity: the mean over ``calibration_nsamples`` calibration
        items of the squared gradient of ``loss_fn(model, item)`` (the diagonal of the empirical Fisher information
        when each item is one sample). The model's weights are left as they are.

        Parameters
        ----------
        dataloader : an iterable of calibration items; the first ``calibration_nsamples`` are used. Each item is
            one gradient, so a dataloader of single samples measures the per-sample Fisher (recommended), a batched
            one the Fisher of batch means.
        loss_fn : ``loss_fn(model, item)`` -> a scalar tensor.
        sensitivity_path : also save the result there (``torch.save``), for :meth:`compress` to reuse.
        num_sensitivity_workers, fsdp_auto_wrap_policy : lowbit calibrates in this process: a value other than 1
            / None draws a warning saying so.

        The accumulators take one float32 copy of the weights being palettized: each gradient is squared into them
        as soon as autograd has accumulated it, then freed; other parameters get no gradient. The model runs in
        eval mode; its modes, ``requires_grad`` flags and existing gradients are restored afterwards.

        Returns ``{fully qualified weight name: float32 tensor of the weight's shape}``.
        """
        targets = list(self._targets(self._model, record=False))
        sensitivities = self._sensitivities(
            self._model, targets, dataloader, loss_fn, num_sensitivity_workers, fsdp_auto_wrap_policy
        )
        if sensitivity_path is not None:
            torch.save(sensitivities, sensitivity_path)
        return sensitivities

    def _sensitivities(self, model, targets: list[Target], dataloader, loss_fn, workers, fsdp_policy):
        if dataloader is None or loss_fn is None:
            raise TypeError("SKMPalettizer needs dataloader and loss_fn (or a sensitivity_path to load)")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, item), got {type(loss_fn).__name__}")
        if workers != 1 or fsdp_policy is not None:
            warnings.warn(
                "num_sensitivity_workers / fsdp_auto_wrap_policy: lowbit computes sensitivities in this process, "
                "on the model's own device",
                UserWarning,
                stacklevel=3,
            )
        params = {id(t.weight.parameter): t.weight.parameter for t in targets}
        fisher = {key: torch.zeros_like(p, dtype=torch.float32) for key, p in params.items()}

        def accumulate(param: torch.Tensor) -> None:
            assert param.grad is not None
            grad = param.grad.float()
            fisher[id(param)].addcmul_(grad, grad)
            param.grad = None

        with _only_grads_for(model, params.values()):
            hooks = [p.register_post_accumulate_grad_hook(accumulate) for p in params.values()]
            try:
                items = self._calibrate(model, dataloader, loss_fn)
            finally:
                for hook in hooks:
                    hook.remove()
        if items == 0:
            raise ValueError("dataloader yielded nothing: SKMPalettizer needs calibration data")
        return {t.name: fisher[id(t.weight.parameter)].div_(items) for t in targets}

    def _calibrate(self, model: nn.Module, dataloader, loss_fn) -> int:
        """Run forward and backward on up to ``calibration_nsamples`` items; returns how many."""
        items = 0
        for item in dataloader:
            loss = loss_fn(model, item)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss_fn(model, item) must return a scalar tensor")
            loss.backward()
            items += 1
            if items == self._config.calibration_nsamples:
                break
        return items


class _only_grads_for:
    """Within the block: the model in eval mode, gradients only for ``params``; flags restored on exit."""

    def __init__(self, model: nn.Module, params: Iterable[nn.Parameter]) -> None:
        self.model, self.params = model, {id(p) for p in params}

    def __enter__(self) -> None:
        self.training = [(m, m.training) for m in self.model.modules()]
        self.flags = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _, _ in self.flags:
            p.grad = None
            p.requires_grad_(id(p) in self.params)

    def __exit__(self, *exc: object) -> None:
        for m, training in self.training:
            m.training = training
        for p, flag, grad in self.flags:
            p.requires_grad_(flag)
            p.grad = grad
