"""Calibration, backend-neutral: the user's feeds, where each weight's input activations are read (a :class:`Tap`),
and the loop that streams a program's runs into each weight's :class:`~lowbit.statistics.InputMoments` (only the
running sums are kept, never the activations of more than one feed). The ONNX and Core AI backends say where the
taps are and run the program (``lowbit.onnx.calibration``, ``lowbit.coreai.calibration``); imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.kernels.patches import Window, patch_blocks
from lowbit.statistics import InputMoments

__all__ = [
    "CONV_GRAM_COLUMNS",
    "MomentSums",
    "Run",
    "Tap",
    "accumulate_moments",
    "check_source",
    "checked_feed",
    "empty_moments",
    "feeds_of",
    "keeps_gram",
]

# a convolution keeps its whole X^T X (its error feedback) up to this many (input channel, kernel position) pairs:
# 256 channels of 3 x 3, 21 MB in float32; a wider one keeps the diagonal only. The feedback factors each matrix in
# float64 with a few copies at once: ResNet-18's shapes (224 x 224, 16 images), 4-bit calibrated, took 25.7 s and
# 3.0 GiB more memory with its 512-channel 3 x 3 convs fed back (a limit of 4608), 8.0 s and 984 MiB at 2304
CONV_GRAM_COLUMNS = 2304

# (a feed, its index) -> the values the taps name, by name (``ValueError`` with a one-line reason when the program
# cannot run on the feed)
Run = Callable[[Mapping[str, Any], int], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Tap:
    """Where a weight's input activations are read: the value's name and its input-channel axis (a convolution's:
    axis 1, and its :class:`~lowbit.kernels.patches.Window` over the axes after it)."""

    weight: str
    activation: str
    channel_axis: int
    channels: int
    full: bool = False  # keep the whole X^T X: a 2-D weight's error feedback needs it
    lookup: bool = False  # the indices a lookup reads the weight's rows by (one-hot X: each row's count)
    window: Window | None = None  # a convolution's: X's rows are its input's windows
    groups: int = 1  # a grouped convolution's: X^T X kept as its groups' diagonal blocks

    @property
    def key(self) -> tuple[str, int, int, bool, bool, Window | None, int]:
        """Taps with the same key read the same statistics (q / k / v, gate / up share one accumulator)."""
        return (self.activation, self.channel_axis, self.channels, self.full, self.lookup, self.window, self.groups)


def _blocks(window: Window | None, groups: int) -> int:
    """How many diagonal blocks a weight's ``X^T X`` is kept as: a grouped convolution's groups (each group of output
    channels reads its own input channels); one matrix for anything else, a grouped transposed convolution's too
    (its rows each hold one output channel of every group: the blocks across groups stay zero)."""
    return 1 if window is None or window.transposed else groups


def keeps_gram(channels: int, window: Window | None, groups: int = 1) -> bool:
    """Whether a weight of ``channels`` input channels (a convolution's, with its ``window`` and ``groups``) keeps
    its whole ``X^T X``: a Linear's always, a convolution's up to :data:`CONV_GRAM_COLUMNS` columns (a grouped one's
    blocks: a group's columns; a grouped transposed one's: all its columns)."""
    return window is None or channels // _blocks(window, groups) * window.size <= CONV_GRAM_COLUMNS


def empty_moments(channels: int, full: bool, window: Window | None = None, groups: int = 1) -> InputMoments:
    """No rows yet for a weight of ``channels`` input channels (a convolution's: with its ``window`` and
    ``groups``); ``full`` also keeps its whole ``X^T X`` (a grouped convolution's blocks; a grouped transposed one's
    as one matrix, see :func:`add_activations`)."""
    kernel = () if window is None else window.kernel
    return InputMoments.empty(channels, full, kernel, _blocks(window, groups))


def check_source(calibration_data: Any) -> None:
    """``TypeError`` unless ``calibration_data`` is an iterable (not a dict) or has ``get_next()``: checked before a
    backend starts its runtime."""
    if hasattr(calibration_data, "get_next"):
        return
    if isinstance(calibration_data, Mapping) or not isinstance(calibration_data, Iterable):
        raise TypeError(
            "calibration_data must be an iterable of {input name: array} dicts or a CalibrationDataReader, "
            f"got {type(calibration_data).__name__}"
        )


def feeds_of(calibration_data: Any) -> Iterator[Mapping[str, np.ndarray]]:
    """The feeds of ``calibration_data``: an iterable of ``{input name: array}`` dicts, or an ONNX Runtime
    ``CalibrationDataReader`` (anything with ``get_next()`` returning a dict, then None). ``TypeError`` for
    anything else (:func:`check_source`), or for a feed that is not a dict."""
    check_source(calibration_data)
    if hasattr(calibration_data, "get_next"):
        while (feed := calibration_data.get_next()) is not None:
            yield feed
        return
    for feed in calibration_data:
        if not isinstance(feed, Mapping):
            raise TypeError(f"calibration_data must yield {{input name: array}} dicts, got {type(feed).__name__}")
        yield feed


def checked_feed(feed: Mapping[str, Any], inputs: set[str]) -> dict[str, np.ndarray]:
    """``feed`` as arrays; ``ValueError`` naming the model's inputs when it misses one or names another."""
    unknown, missing = sorted(set(feed) - inputs), sorted(inputs - set(feed))
    if unknown or missing:
        problem = f"has no model input named {unknown[0]!r}" if unknown else f"lacks the model input {missing[0]!r}"
        raise ValueError(f"a calibration feed {problem}; the model's inputs: {', '.join(sorted(inputs))}")
    return {k: np.asarray(v) for k, v in feed.items()}


class MomentSums:
    """Each tap's weight's running :class:`InputMoments`, fed one feed's tapped values at a time (:meth:`add`);
    taps with the same :attr:`Tap.key` share one accumulator."""

    def __init__(self, taps: list[Tap]) -> None:
        self.taps, self.feeds = taps, 0
        self.shared: dict[tuple[str, int, int, bool, bool, Window | None, int], InputMoments] = {}
        for t in taps:
            if t.lookup:
                moments = InputMoments.lookups(t.channels)
            else:
                moments = empty_moments(t.channels, t.full, t.window, t.groups)
            self.shared.setdefault(t.key, moments)

    def add(self, values: Mapping[str, np.ndarray], index: int) -> None:
        """Add feed ``index``'s tapped values (by name). ``ValueError`` when activations do not have the weight's
        input channels or are not finite."""
        for (activation, axis, channels, _, lookup, window, groups), moments in self.shared.items():
            x = values[activation]
            if lookup:  # the runtime has checked the indices against the table (tables of one size share them)
                moments.add_lookups(x)
                continue
            if x.shape[axis] != channels or not np.isfinite(x).all():
                tap = next(t for t in self.taps if t.activation == activation)
                problem = "are not finite" if x.shape[axis] == channels else f"have {x.shape[axis]} channels"
                raise ValueError(f"activations of {tap.weight!r} {problem} on calibration feed {index}")
            add_activations(moments, x, axis, window, groups)
        self.feeds += 1

    def result(self) -> dict[str, InputMoments]:
        """The statistics by weight name. ``ValueError`` when no feed was added."""
        if self.feeds == 0:
            raise ValueError("calibration_data yielded no feed")
        return {t.weight: self.shared[t.key] for t in self.taps}


def add_activations(moments: InputMoments, x: np.ndarray, axis: int, window: Window | None, groups: int = 1) -> None:
    """Add the activations ``x`` (channels on ``axis``) to ``moments``; a convolution's (``window``) as its windows,
    a block of rows at a time (:func:`~lowbit.kernels.patches.patch_blocks`: a window's rows take ``window.size``
    times the input's memory). A transposed convolution of ``groups`` groups (its weight ``[in, out / groups,
    *kernel]`` read with its output channels first, each group's output channels under one row) keeps its groups'
    diagonal blocks of ``X^T X``, the rest zero: its output error is then the error of those rows, exactly."""
    if window is None:
        moments.add(x, axis)
        return
    by_groups = window.transposed and groups > 1 and moments.gram is not None
    into = (
        InputMoments.empty(moments.squares.size // window.size, True, window.kernel, groups) if by_groups else moments
    )
    for rows in patch_blocks(np.asarray(x), window):
        into.add(rows, -1)  # a grouped one's blocks alone (a depthwise 3 x 3's: 9 x 9 each, not the whole matrix)
    if into is not moments:
        moments.merge_blocks(into)


def accumulate_moments(taps: list[Tap], run: Run, calibration_data: Any) -> dict[str, InputMoments]:
    """Each tap's weight's :class:`InputMoments` over ``calibration_data`` (see :func:`feeds_of`), ``run`` computing
    the tapped values one feed at a time. ``ValueError`` as :class:`MomentSums`, and when the data holds no feed."""
    sums = MomentSums(taps)
    for index, feed in enumerate(feeds_of(calibration_data)):
        sums.add(run(feed, index), index)
    return sums.result()
