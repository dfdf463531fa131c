"""SKMPalettizer: sensitive k-means (SqueezeLLM) — k-means weighted by each element's diagonal Fisher information."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.config import PalettizeConfig, check_int
from lowbit.torch.config import ModelConfig, ModuleConfig
from lowbit.torch.modules import to_numpy
from lowbit.torch.palettization._base import PalettizerBase, Target
from lowbit.torch.palettization.post_training import ModulePostTrainingPalettizerConfig

__all__ = ["ModuleSKMPalettizerConfig", "SKMPalettizer", "SKMPalettizerConfig"]


@dataclass(frozen=True)
class ModuleSKMPalettizerConfig(ModuleConfig):
    """How the weights of one module are palettized by :class:`SKMPalettizer`: the options of
    :class:`ModulePostTrainingPalettizerConfig` without the fast-mode ones (``n_bits=4``, ``lut_dtype=None``,
    ``granularity="per_tensor"``, ``group_size=None``, ``channel_axis=0``, ``cluster_dim=None``,
    ``enable_per_channel_scale=False``, ``num_kmeans_workers=1``).

    Raises ``ValueError`` / ``TypeError`` naming the option and its allowed values.
    """

    n_bits: int = 4
    lut_dtype: Any = None
    granularity: str = "per_tensor"
    group_size: int | None = None
    channel_axis: int = 0
    cluster_dim: int | None = None
    enable_per_channel_scale: bool = False
    num_kmeans_workers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "granularity", self._plain().granularity)

    def _plain(self) -> ModulePostTrainingPalettizerConfig:
        return ModulePostTrainingPalettizerConfig(**self.as_dict())

    def weight_config(self) -> PalettizeConfig:
        """The weight layer's config. Sensitivities are summed per fp16 value, the exact weighted k-means then runs
        over those (the fp16 rounding of float32 weights moves them by < 1e-3 of a step of any LUT)."""
        return self._plain().weight_config()


@dataclass
class SKMPalettizerConfig(ModelConfig[ModuleSKMPalettizerConfig]):
    """Per-module configs for :class:`SKMPalettizer` (names in ``module_name_configs`` may be regular expressions),
    and ``calibration_nsamples`` (default 128): how many samples the sensitivities are averaged over."""

    module_config: ClassVar[type[ModuleConfig]] = ModuleSKMPalettizerConfig
    calibration_nsamples: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("calibration_nsamples", self.calibration_nsamples, 1)


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the leading size of its first tensor (1 when it holds none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values: Iterable[Any] = (
        batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    )
    for value in values:
        size = _batch_size(value)
        if size:
            return size
    return 1


class SKMPalettizer(PalettizerBase[SKMPalettizerConfig]):
    """Sensitive k-means palettization (SqueezeLLM): each weight element's squared error counts in proportion to its
    diagonal Fisher information, the mean squared gradient of the loss over calibration samples; the weighted k-means
    is exact (the same dynamic program as :class:`PostTrainingPalettizer`, over importance-weighted histograms)."""

    config_class = SKMPalettizerConfig

    def compress(
        self,
        dataloader: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        inplace: bool = False,
    ) -> nn.Module:
        """Measure sensitivities on ``dataloader`` and palettize; returns a deep copy (default) or the model itself.

        Parameters
        ----------
        dataloader : an iterable of batches; batches are drawn until ``calibration_nsamples`` samples (the leading
            size of a batch's first tensor) have been seen.
        loss_fn : ``loss_fn(model, batch)`` -> a scalar tensor whose gradients measure sensitivity.
        inplace : palettize ``model`` itself (default False: a deep copy).

        The accumulators take one float32 copy of the weights being palettized: each gradient is squared into them
        as soon as autograd has accumulated it, then freed. Other parameters do not get gradients. The model is run
        in eval mode and its training mode and ``requires_grad`` flags are restored afterwards.

        Raises ``ValueError`` when a parameter is on the meta device or the dataloader yields no batch;
        ``TypeError`` when ``loss_fn`` is not callable.
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        model = self._target_model(inplace)
        targets = list(self._targets(model))
        fisher = self._sensitivities(model, targets, dataloader, loss_fn)
        with torch.no_grad():
            self._palettize(targets, lambda target: to_numpy(fisher[id(target.weight.parameter)]))
        return model

    def _sensitivities(self, model, targets: list[Target], dataloader, loss_fn) -> dict[int, torch.Tensor]:
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
                batches = sum(1 for _ in self._calibrate(model, dataloader, loss_fn))
            finally:
                for hook in hooks:
                    hook.remove()
        if batches == 0:
            raise ValueError("dataloader yielded no batch: SKMPalettizer needs calibration data")
        for acc in fisher.values():
            acc.div_(batches)
        return fisher

    def _calibrate(self, model: nn.Module, dataloader, loss_fn) -> Iterator[None]:
        seen = 0
        for batch in dataloader:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss_fn(model, batch) must return a scalar tensor")
            loss.backward()
            yield
            seen += _batch_size(batch)
            if seen >= self._config.calibration_nsamples:
                return


class _only_grads_for:
    """Within the block: the model in eval mode, gradients only for ``params``; flags restored on exit."""

    def __init__(self, model: nn.Module, params: Iterable[nn.Parameter]) -> None:
        self.model, self.params = model, {id(p) for p in params}

    def __enter__(self) -> None:
        self.training = [(m, m.training) for m in self.model.modules()]
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.flags:
            p.requires_grad_(id(p) in self.params)

    def __exit__(self, *exc: object) -> None:
        for m, training in self.training:
            m.training = training
        for p, flag in self.flags:
            p.requires_grad_(flag)
