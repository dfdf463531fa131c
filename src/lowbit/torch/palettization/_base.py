"""What every post-training palettizer shares: pick each module's config, hand each weight to the weight layer,
write the palettized values back into the parameter, and record what was done on the module."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from lowbit.budget import BUDGET_BITS, Choice, Measurable, allocate, allocate_measuring, measured_together
from lowbit.config import PalettizeConfig, check_choice, check_int, integral
from lowbit.errors import SkipWeight
from lowbit.statistics import ACTIVATION_DAMPING, InputMoments
from lowbit.torch._compressor import ALLOCATED, CompressorBase, Target, skip
from lowbit.torch.config import ModelConfig, ModuleConfig
from lowbit.torch.modules import from_numpy, to_numpy
from lowbit.torch.records import store_palettization
from lowbit.types import CompressionGranularity, DType
from lowbit.weights import PalettizedWeight, palettize_weight
from lowbit.weights.palettize import lut_groups

__all__ = [
    "KMeansModuleConfig",
    "KeptWidths",
    "Measured",
    "Outcome",
    "PalettizerBase",
    "Target",
    "allocate_widths",
    "allocated_widths",
    "measured_widths",
    "write_palettized",
]

MC = TypeVar("MC", bound=ModelConfig)  # whose module configs are KMeansModuleConfig


GRANULARITIES = ("per_tensor", "per_grouped_channel")
LUT_DTYPES = {None: None, "int8": DType.INT8, "uint8": DType.UINT8}


def lut_dtype_of(value: Any) -> DType | None:
    """The :class:`DType` of a ``lut_dtype`` option: None, ``torch.int8`` / ``torch.uint8`` or their names."""
    key = str(value).removeprefix("torch.").lower() if value is not None else None
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
    group_size : channels per LUT with ``"per_grouped_channel"`` (required there, None otherwise); when the
        channel count does not divide by it, the last LUT serves fewer channels.
    channel_axis : 0 (default: the module's output channels) or 1 (its input channels): the axis that groups and
        vectors run along. A transposed convolution's output channels are its weight's axis 1, so 0 and 1 keep
        meaning output and input channels for every module.
    cluster_dim : None or 1 (scalar, exact k-means) or ``> 1``: LUT entries are vectors of this many channels
        along ``channel_axis``. Not with ``enable_per_channel_scale``.
    enable_per_channel_scale : divide each channel by its max-abs before clustering (default False).
    outlier_fraction : lowbit's extension (default 0): this fraction (up to 0.1) of the weight's elements, those
        the LUTs serve worst (weighted by sensitivity or activation energy where known), kept exact beside the LUTs;
        recorded with the palettization and written by ``export_onnx``.

    Raises ``ValueError`` / ``TypeError`` naming the option and its allowed values.
    """

    n_bits: int = 4
    lut_dtype: Any = None
    granularity: str = "per_tensor"
    group_size: int | None = None
    channel_axis: int = 0
    cluster_dim: int | None = None
    enable_per_channel_scale: bool = False
    outlier_fraction: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_bits", integral("n_bits", self.n_bits))
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

    def importance_damping(self) -> float:
        """How much of each LUT group's mean importance is added to every element's (sensitive k-means only)."""
        return 0.0

    def weight_config(self) -> PalettizeConfig:
        """The weight layer's :class:`~lowbit.config.PalettizeConfig` of this module config."""
        return PalettizeConfig(
            lut_dtype=lut_dtype_of(self.lut_dtype),
            n_bits=self.n_bits,
            granularity=CompressionGranularity[self.granularity.upper()],
            group_size=self.group_size or 1,
            cluster_dim=self.cluster_dim or 1,
            enable_per_channel_scale=self.enable_per_channel_scale,
            outlier_fraction=self.outlier_fraction,
            weight_num_threshold=0,
            **self._kmeans_options(),
        )


# a palettized target not yet written: (target, result, its (width, budget) when chosen for a budget)
Outcome = tuple[Target, PalettizedWeight, tuple[int, float | None] | None]


class PalettizerBase(CompressorBase[MC]):
    """Base of :class:`PostTrainingPalettizer` and :class:`SKMPalettizer`."""

    def _palettized(
        self,
        targets: list[Target],
        importance: Callable[[Target], np.ndarray | None],
        threads: int,
        statistics: Mapping[str, InputMoments] | None = None,
        widths: Mapping[str, int] | None = None,
        bits_per_weight: float | None = None,
    ) -> Iterator[Outcome]:
        """Each target palettized, its k-means on ``threads`` threads, not yet written: (target, result, its
        (width, budget) when chosen for a budget). A target with ``statistics`` (calibration) gets
        activation-weighted k-means and error feedback on its codes; one in ``widths`` (chosen for the
        ``bits_per_weight`` budget, see :func:`allocated_widths`) gets that width. A target that cannot be
        palettized is skipped (:func:`_skip`)."""
        check_int("num_kmeans_workers", threads, 1)
        statistics, widths = statistics or {}, widths or {}
        for target in targets:
            param = target.weight.parameter
            stats = statistics.get(target.name)
            weights, damping = _weighting(target, importance, stats)
            config = target.config.weight_config()
            if target.name in widths:
                config = dataclasses.replace(config, n_bits=widths[target.name])
            try:
                result = palettize_weight(
                    to_numpy(param),
                    target.axis,
                    config,
                    name=target.name,
                    importance=weights,
                    threads=threads,
                    damping=damping,
                    gram=None if stats is None else stats.gram,
                    input_axis=target.weight.input_axis,
                )
            except SkipWeight as skipped:
                skip(target, skipped)
                continue
            yield target, result, (config.n_bits, bits_per_weight) if target.name in widths else None


def write_palettized(outcomes: Iterable[Outcome]) -> None:
    """Write each palettization of :meth:`PalettizerBase._palettized` into its parameter and record it on its
    module."""
    for target, result, allocated in outcomes:
        _write(target.weight.parameter, result)
        store_palettization(target.module, target.weight.name, result)
        if allocated is not None:
            target.module.__dict__.setdefault(ALLOCATED, {})[target.weight.name] = allocated


def _weighting(
    target: Target, importance: Callable[[Target], np.ndarray | None], stats: InputMoments | None
) -> tuple[np.ndarray | None, float]:
    """The k-means weights of ``target`` and their damping: its activation statistics when calibrated, else the
    palettizer's ``importance`` (SKM's sensitivity), else none (the damping then weighs the outliers in the LUTs'
    refit, as on the graph door)."""
    if stats is not None:
        return stats.weighting(tuple(target.weight.parameter.shape), target.weight.input_axis)
    weights = importance(target)
    return weights, ACTIVATION_DAMPING if weights is None else target.config.importance_damping()


def allocated_widths(
    targets: list[Target],
    importance: Callable[[Target], np.ndarray | None],
    threads: int,
    statistics: Mapping[str, InputMoments],
    bits_per_weight: float | None,
) -> dict[str, int]:
    """Each target's width for the ``bits_per_weight`` budget (None: no budget, ``{}``): every target measured at
    each width (:func:`measured_widths`), then :func:`allocate_widths`."""
    if bits_per_weight is None:
        return {}
    return allocate_widths(measured_widths(targets, importance, threads, statistics), bits_per_weight)


# one target measured at every width: (its name, its element count, the choices)
Measured = tuple[str, int, tuple[Choice, ...]]


class KeptWidths:
    """Each measured width's palettization of ``targets`` kept on disk (a temporary directory under ``TMPDIR``,
    removed on exit) until the budget has chosen: the chosen one is then written as it was measured, not palettized
    again (five widths take 3 bytes per weight, 6 with per-channel LUTs: 0.6 GB for SmolLM2-135M; a ``TMPDIR`` on
    tmpfs holds them in memory). ``OSError`` (ENOSPC) at once when the disk has less room than they may take."""

    def __init__(self, targets: Iterable[Target]) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="lowbit-widths-")
        self._files: dict[str, int] = {}
        needed, free = _kept_bytes(targets), shutil.disk_usage(self._directory.name).free
        if free < needed:
            self._directory.cleanup()
            raise OSError(
                errno.ENOSPC,
                f"bits_per_weight with loss_fn keeps every width on disk until it chooses: {needed / 2**30:.1f} GiB "
                f"needed under {tempfile.gettempdir()}, {free / 2**30:.1f} GiB free (set TMPDIR to a larger disk)",
            )

    def __enter__(self) -> KeptWidths:
        return self

    def __exit__(self, *exc: object) -> None:
        self._directory.cleanup()

    def _path(self, name: str, n_bits: int) -> Path:
        return Path(self._directory.name) / f"{self._files[name]}-{n_bits}.pickle"

    def keeper(self, name: str) -> Callable[[int, PalettizedWeight], None]:
        """``keep(n_bits, result)`` for the weight ``name`` (:func:`lowbit.budget.measured_choices`'s ``keep``)."""
        self._files.setdefault(name, len(self._files))

        def keep(n_bits: int, result: PalettizedWeight) -> None:
            with self._path(name, n_bits).open("wb") as file:
                pickle.dump(result, file, protocol=pickle.HIGHEST_PROTOCOL)

        return keep

    def chosen(self, targets: Iterable[Target], widths: Mapping[str, int], bits_per_weight: float) -> Iterator[Outcome]:
        """Each target of ``widths`` with the palettization kept at its width, as
        :meth:`PalettizerBase._palettized` gives it."""
        for target in targets:
            if target.name in widths:
                with self._path(target.name, widths[target.name]).open("rb") as file:
                    result = pickle.load(file)  # written by this process, in its own temporary directory
                yield target, result, (widths[target.name], bits_per_weight)


def _kept_bytes(targets: Iterable[Target]) -> int:
    """At most what :class:`KeptWidths` writes for ``targets``: every width's packed codes and LUTs (entries in the
    weight's dtype and their quantized copy, a scale and zero point per LUT), and a file's framing."""
    total = 0
    for target in targets:
        param, config = target.weight.parameter, target.config.weight_config()
        with contextlib.suppress(SkipWeight):  # a weight the measure will skip keeps nothing
            luts = lut_groups(param.shape[target.axis], config)[0]
            entries = sum(1 << bits for bits in BUDGET_BITS) * config.cluster_dim
            per_lut = entries * (param.element_size() + 1) + len(BUDGET_BITS) * 16
            total += param.numel() * sum(BUDGET_BITS) // 8 + luts * per_lut + len(BUDGET_BITS) * 1024
    return total


# targets measured on one pool at once (a transformer block's Linear weights): their arrays are held together (a
# weight off the CPU as a copy), the pool's threads balanced across them (lowbit.budget.measured_together)
MEASURED_TOGETHER = 8


def measured_widths(
    targets: list[Target],
    importance: Callable[[Target], np.ndarray | None],
    threads: int,
    statistics: Mapping[str, InputMoments],
    output_weights: Mapping[str, np.ndarray] | None = None,
    kept: KeptWidths | None = None,
    widths: tuple[int, ...] = BUDGET_BITS,
    deferred: tuple[int, ...] = (),
) -> Iterator[Measured]:
    """Each target palettized at the ``widths`` of the budget (default every one: see
    :func:`lowbit.budget.measured_together`), its error weighted by its statistics or sensitivity; with
    ``output_weights`` (each output channel's mean squared loss gradient, by weight name) and the whole ``X^T X``,
    the loss change. With ``kept``, each width gets the error feedback the compression gives it (but the
    ``deferred`` ones: their error bounded, see :class:`lowbit.budget.Measurable`) and is kept there, and a target
    that cannot be palettized is skipped with its warning (:func:`skip`); without, such a target is left out here
    (it keeps its width) and the compression itself warns."""
    for start in range(0, len(targets), MEASURED_TOGETHER):
        window = targets[start : start + MEASURED_TOGETHER]
        weights = [
            _measurable(t, importance, statistics.get(t.name), output_weights, kept, widths, deferred) for t in window
        ]
        for target, choices in zip(window, measured_together(weights, threads), strict=True):
            if isinstance(choices, SkipWeight):
                if kept is not None:
                    skip(target, choices)
                continue
            yield target.name, target.weight.parameter.numel(), choices


def _measurable(
    target: Target,
    importance: Callable[[Target], np.ndarray | None],
    stats: InputMoments | None,
    output_weights: Mapping[str, np.ndarray] | None,
    kept: KeptWidths | None,
    widths: tuple[int, ...],
    deferred: tuple[int, ...],
) -> Measurable:
    """``target`` as :func:`measured_widths` measures it, at ``widths`` (``deferred`` among them put off)."""
    sensitivity, damping = (None, 0.0) if stats is not None else _weighting(target, importance, None)
    return Measurable(
        to_numpy(target.weight.parameter),
        target.axis,
        target.weight.input_axis,
        target.config.weight_config(),
        name=target.name,
        stats=stats,
        sensitivity=sensitivity,
        damping=damping,
        output_weights=(output_weights or {}).get(target.name),
        feedback=kept is not None,
        keep=None if kept is None else kept.keeper(target.name),
        widths=widths,
        deferred=deferred,
    )


def allocate_widths(
    measured: Iterable[Measured],
    bits_per_weight: float,
    measure: Callable[[list[str]], Iterable[Measured]] | None = None,
) -> dict[str, int]:
    """The widths :func:`lowbit.budget.allocate` chooses for the measured targets within ``bits_per_weight``
    times their element count; with ``measure`` (the targets of the names given measured at their deferred widths),
    :func:`lowbit.budget.allocate_measuring`."""
    choices, numel = {}, 0
    for name, count, options in measured:
        choices[name] = options
        numel += count
    if measure is None:
        return allocate(choices, bits_per_weight * numel / 8)
    return allocate_measuring(
        choices, bits_per_weight * numel / 8, lambda names: {name: found for name, _, found in measure(names)}
    )


def _write(param: nn.Parameter, result: PalettizedWeight) -> None:
    """Put the palettized values into ``param``: decoded straight into its memory when it is a plain CPU tensor."""
    with torch.no_grad():
        if param.device.type == "cpu" and param.is_contiguous() and param.dtype != torch.bfloat16:
            result.decode_into(param.detach().numpy())
        else:
            param.copy_(from_numpy(result.decode(), param))
