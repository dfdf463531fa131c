"""PostTrainingPalettizer: k-means palettization of a torch model's weights, no data needed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.budget import BUDGET_BITS, DEFERRED_BITS, check_bits_per_weight
from lowbit.config import check_bool, check_int
from lowbit.statistics import InputMoments
from lowbit.torch.calibration import collect_module_moments, collect_output_gradients
from lowbit.torch.config import ModelConfig, ModuleConfig
from lowbit.torch.palettization._base import (
    KeptWidths,
    KMeansModuleConfig,
    Measured,
    Outcome,
    PalettizerBase,
    Target,
    allocate_widths,
    allocated_widths,
    measured_widths,
    write_palettized,
)
from lowbit.torch.sequential import calibrated_modules, calibration_items, compressed_in_sequence

__all__ = [
    "ModulePostTrainingPalettizerConfig",
    "PostTrainingPalettizer",
    "PostTrainingPalettizerConfig",
]


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

    def compress(
        self,
        num_kmeans_workers: int = 1,
        inplace: bool = False,
        calibration_data: Iterable[Any] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        bits_per_weight: float | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> nn.Module:
        """Palettize and return the model: a deep copy (default) or, with ``inplace=True``, the model itself.

        ``num_kmeans_workers`` threads share each weight's per-group k-means (the compiled kernel releases the
        GIL), or with ``bits_per_weight`` its widths; the result does not depend on it.

        ``calibration_data`` (lowbit's extension; default None: data-free, as coremltools): items run through
        ``forward_fn(model, item)`` (default ``model(**item)`` / ``model(*item)`` / ``model(item)``) while forward
        hooks collect each palettized ``nn.Linear`` weight's input ``X^T X``; those weights then get
        activation-weighted k-means and error feedback on their codes (see the README's "Data-aware compression").
        Convolutions get the same over their input's windows (a grouped one's per group, as on the graph door; not a
        subclass with its own ``forward``). Other weights are palettized data-free.

        ``bits_per_weight`` (lowbit's extension; default None: every weight at its ``n_bits``): mixed bits. Each
        weight is palettized at 2, 3, 4, 6 and 8 bits, its relative error measured at each (of the layer's output
        with ``calibration_data``, else of the weight), and the widths chosen so that the palettized weights take at
        most this many bits per element (LUTs included) with the smallest summed error. The report notes each
        weight's width.

        ``loss_fn`` (lowbit's extension, with ``calibration_data`` and ``bits_per_weight`` only; default None):
        ``loss_fn(model, item)`` -> scalar loss (e.g. a causal LM's ``model(input_ids=ids, labels=ids).loss``). Each
        item then also runs backward once, and each Linear weight's error at a width is the loss change its output
        error makes, ``sum_n s_n dW_n X^T X dW_n`` (``s_n``: the mean squared loss gradient at output channel
        ``n``), not its relative output error, of the codes the error feedback writes at that width: layers are
        then compared by what they cost the loss. Each width's palettization is kept on disk meanwhile (under
        ``TMPDIR``: 3 bytes per weight, 6 with per-channel LUTs; ``OSError`` before any work when that much is not
        free) and the chosen one written.

        Raises ``ValueError`` when a parameter is on the meta device, ``bits_per_weight`` is not above 2 or below
        what 2 bits everywhere take, or ``loss_fn`` comes without ``calibration_data`` and ``bits_per_weight``;
        ``TypeError`` when ``loss_fn`` is not callable or does not return a scalar tensor. A weight that cannot be
        palettized as configured (channels that do not divide by cluster_dim, NaN / Inf values, an integer dtype)
        is left as it is with a ``UserWarning`` naming it and the reason.
        """
        budget = check_bits_per_weight(bits_per_weight)
        if loss_fn is not None and (calibration_data is None or budget is None):
            raise ValueError("loss_fn weighs the layers for bits_per_weight: give calibration_data and bits_per_weight")
        model = self._target_model(inplace)
        targets = list(self._targets(model))
        with torch.no_grad():
            if calibration_data is None:
                widths = allocated_widths(targets, _data_free, num_kmeans_workers, {}, budget)
                write_palettized(self._palettized(targets, _data_free, num_kmeans_workers, None, widths, budget))
            else:
                self._calibrated(model, targets, calibration_data, forward_fn, num_kmeans_workers, budget, loss_fn)
        self._model = model
        return model

    def _calibrated(
        self,
        model: nn.Module,
        targets: list[Target],
        calibration_data: Iterable[Any],
        forward_fn: Callable[[nn.Module, Any], Any] | None,
        threads: int,
        budget: float | None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> None:
        """Palettize ``targets`` block after block (:mod:`lowbit.torch.sequential`), each block's Linear weights
        from the statistics of the dense model's activations, only one block's ``X^T X`` held at a time; the
        palettized weights are written once every block is done. With a budget, the widths are chosen first
        (:func:`_widths`); weighed by ``loss_fn``, in the same pass as the palettizations written."""
        check_int("num_kmeans_workers", threads, 1)
        items = calibration_items(calibration_data)
        if budget is not None and loss_fn is not None:
            with KeptWidths(targets) as kept:
                widths = _widths(model, targets, items, forward_fn, threads, budget, (loss_fn, kept))
                write_palettized(kept.chosen(targets, widths, budget))
            return
        widths = {} if budget is None else _widths(model, targets, items, forward_fn, threads, budget)

        def palettized(chosen: list[Target], statistics: Mapping[str, InputMoments]) -> Iterable[Outcome]:
            return self._palettized(chosen, _data_free, threads, statistics, widths, budget)

        write_palettized(compressed_in_sequence(model, targets, items, forward_fn, palettized))


def _widths(
    model: nn.Module,
    targets: list[Target],
    items: Sequence[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    threads: int,
    budget: float,
    weighed: tuple[Callable[[nn.Module, Any], torch.Tensor], KeptWidths] | None = None,
) -> dict[str, int]:
    """Each target's width for the ``budget``, measured on the dense model: weighed by each input channel's
    activation energy, from one forward per item (the diagonals of ``X^T X`` only); with ``weighed`` (``loss_fn``,
    ``kept``), by the loss change: one forward and backward per item (each Linear's output gradients), then block
    after block (each block's whole ``X^T X``, one block's at a time, as the compression takes them) every width
    palettized with its error feedback and put in ``kept``; the widest widths' feedback (:data:`DEFERRED_BITS`) is put
    off until an allocation gives a weight one (or passes over one that does: the blocks then run again up to the
    last such weight's, only those measured; a round each time), the same allocation as with every width measured
    first."""
    if weighed is None:
        diagonals = collect_module_moments(model, calibrated_modules(targets, model), items, forward_fn, full=False)
        return allocated_widths(targets, _data_free, threads, diagonals, budget)
    loss_fn, kept = weighed
    linears = {name: m for name, m in calibrated_modules(targets, model).items() if isinstance(m, nn.Linear)}
    outputs = collect_output_gradients(model, linears, items, loss_fn)

    def measured(widths: tuple[int, ...], deferred: tuple[int, ...], only: list[str] | None = None) -> list[Measured]:
        def measure(block: list[Target], statistics: Mapping[str, InputMoments]) -> Iterable[Measured]:
            return measured_widths(block, _data_free, threads, statistics, outputs, kept, widths, deferred)

        return compressed_in_sequence(model, targets, items, forward_fn, measure, only)

    def deferred(names: list[str]) -> list[Measured]:
        """The widths put off, of the named targets (the allocation gave them one): the blocks run again up to the
        last one holding such a target, only those measured."""
        return measured(DEFERRED_BITS, (), names)

    return allocate_widths(measured(BUDGET_BITS, DEFERRED_BITS), budget, deferred)


def _data_free(target: Target) -> None:
    """No per-element importance: plain k-means (or, with calibration, the activation statistics)."""
    return None
