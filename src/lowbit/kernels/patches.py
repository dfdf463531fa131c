"""A convolution's input as the rows its weight multiplies (im2col): each output position's window of every input
channel, one row, so that the convolution is ``patches(x) @ W.reshape(out_channels, -1).T`` for a weight laid out
``[out, in, *kernel]`` (ONNX's and PyTorch's). Calibration takes a convolution's ``X^T X`` over these rows: the
error feedback and the importance of each (input channel, kernel position) read it as a Linear's.

A transposed convolution (weight ``[in, out, *kernel]``) is the convolution of its input with the stride's zeros
put between the values (and the padding turned around) by the kernel flipped: its rows are that input's windows,
each window's kernel positions flipped back, so that ``patches(x) @ W.swapaxes(0, 1).reshape(out, -1).T`` is its
output (a ``Window`` with ``transposed``)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["BLOCK_ELEMENTS", "PAD_MODES", "Window", "patch_blocks", "patches"]

PAD_MODES = ("constant", "reflect", "edge", "wrap")  # numpy's names: zeros, reflection, replication, circular


@dataclass(frozen=True)
class Window:
    """How a convolution slides its kernel over the spatial axes of its input (the axes after the channels): per
    spatial axis the kernel size, stride, dilation and padding (before, after); ``same`` ("upper" / "lower") pads so
    that the output has ``ceil(size / stride)`` positions, the odd padding element after / before (ONNX's
    ``SAME_UPPER`` / ``SAME_LOWER``; PyTorch's ``padding="same"`` is "upper"), ``pads`` then ignored; ``pad_mode``:
    what the padding holds (:data:`PAD_MODES`, numpy's names). ``transposed``: a transposed convolution's window
    (``pads`` taken off its full output, ``output_padding`` positions added after, zeros only); with ``same`` or
    ``output_shape`` (its output's spatial size) the pads are what the output's size leaves, the odd one before
    ("lower") or after ("upper"), as ONNX Runtime takes ``auto_pad`` and ``output_shape`` (``output_shape``
    alone: "lower"), and an output larger than the full one has zeros added after."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    same: str = ""
    pad_mode: str = "constant"
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        rank = len(self.kernel)
        if not rank or any(len(v) != rank for v in (self.strides, self.dilations, self.pads)):
            raise ValueError(f"a window's kernel, strides, dilations and pads need one entry per spatial axis: {self}")
        if min(*self.kernel, *self.strides, *self.dilations) < 1 or min(p for pair in self.pads for p in pair) < 0:
            raise ValueError(f"a window's sizes must be positive and its pads non-negative: {self}")
        if self.same not in ("", "upper", "lower") or self.pad_mode not in PAD_MODES:
            raise ValueError(f"a window's same must be '', 'upper' or 'lower', its pad_mode one of {PAD_MODES}")
        for name in ("output_padding", "output_shape"):
            values = getattr(self, name)
            if values and (not self.transposed or len(values) != rank or min(values) < 0):
                raise ValueError(f"{name} is a transposed window's, one entry >= 0 per spatial axis: {self}")
        if self.transposed and self.pad_mode != "constant":
            raise ValueError(f"a transposed window pads with zeros: {self}")

    @property
    def size(self) -> int:
        """Kernel positions per input channel."""
        return math.prod(self.kernel)

    def padding(self, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
        """(before, after) per spatial axis for an input of ``spatial`` size (a transposed window's: taken off its
        full output, negative after: zeros added)."""
        if self.transposed and (self.same or self.output_shape):
            return self._transposed_padding(spatial)
        if not self.same:
            return list(self.pads)
        pairs = []
        for n, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations, strict=True):
            total = max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
            small = total // 2
            pairs.append((small, total - small) if self.same == "upper" else (total - small, small))
        return pairs

    def _transposed_padding(self, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
        """What a transposed window's output size leaves of its full output, split by :attr:`same`: the size
        :attr:`output_shape` says (a larger one: zeros after), or ``size * stride`` (at most the full output)."""
        outputs = self.output_shape or tuple(n * s for n, s in zip(spatial, self.strides, strict=True))
        extra = self.output_padding or (0,) * len(spatial)
        pairs = []
        for n, k, s, d, more, out in zip(
            spatial, self.kernel, self.strides, self.dilations, extra, outputs, strict=True
        ):
            total = (n - 1) * s + more + (k - 1) * d + 1 - out
            if total < 0:
                pairs.append((0, total) if self.output_shape else (0, 0))
                continue
            small = total // 2
            pairs.append((small, total - small) if self.same == "upper" else (total - small, small))
        return pairs


BLOCK_ELEMENTS = 1 << 24  # a block of rows holds at most this many values (64 MB in float32)


def patches(x: np.ndarray, window: Window) -> np.ndarray:
    """The rows a convolution of ``window`` multiplies its weight by, from its input ``x`` ``[batch, channels,
    *spatial]``: ``[batch * output positions, channels * window.size]``, channel-major then kernel positions in C
    order (a weight ``[out, channels, *kernel]`` reshaped ``[out, -1]``). ``ValueError`` when ``x`` has not the
    window's spatial rank or is smaller than the (dilated) kernel after padding."""
    return np.concatenate(list(patch_blocks(x, window)))


def patch_blocks(x: np.ndarray, window: Window, elements: int = BLOCK_ELEMENTS) -> Iterator[np.ndarray]:
    """:func:`patches`' rows in order, a slab of output positions (along the first spatial axis, batch item by
    batch item) at a time, each block at most ``elements`` values (or one line of positions): a high-resolution
    input's rows (a 3 x 3 conv's are 9 times its input) are never all held at once."""
    views = _windows(x, window)  # [batch, channels, *positions, *kernel], a view
    rank = len(window.kernel)
    positions = views.shape[2 : 2 + rank]
    columns = x.shape[1] * window.size
    line = math.prod(positions[1:]) * columns  # the values of one position along the first spatial axis
    step = max(1, elements // max(line, 1))
    order = (0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank))  # positions first
    for item in range(views.shape[0]):
        for start in range(0, positions[0], step):
            slab = views[item : item + 1, :, start : start + step]
            yield slab.transpose(order).reshape(-1, columns)


def _windows(x: np.ndarray, window: Window) -> np.ndarray:
    """``[batch, channels, *output positions, *kernel]``: each output position's window, a view of ``x`` padded."""
    rank = len(window.kernel)
    if x.ndim != rank + 2:
        raise ValueError(f"a convolution input of {rank} spatial axes must have {rank + 2} axes, got shape {x.shape}")
    if window.transposed:
        return _transposed_windows(x, window)
    padded = np.pad(x, [(0, 0), (0, 0), *window.padding(x.shape[2:])], mode=window.pad_mode)  # type: ignore[call-overload]
    return _strided(padded, window)


def _strided(padded: np.ndarray, window: Window) -> np.ndarray:
    """The windows of an input already padded: ``[batch, channels, *output positions, *kernel]``, a view."""
    spatial = tuple(range(2, padded.ndim))
    spans = tuple((k - 1) * d + 1 for k, d in zip(window.kernel, window.dilations, strict=True))
    if any(n < span for n, span in zip(padded.shape[2:], spans, strict=True)):
        raise ValueError(f"a convolution input padded to {padded.shape[2:]} is smaller than its kernel {spans}")
    views = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=spatial)  # [b, c, *positions, *spans]
    steps = [slice(None), slice(None), *(slice(None, None, s) for s in window.strides)]
    return views[tuple(steps + [slice(None, None, d) for d in window.dilations])]


def _transposed_windows(x: np.ndarray, window: Window) -> np.ndarray:
    """A transposed convolution's windows: ``x`` with ``stride - 1`` zeros between its values, ``dilation *
    (kernel - 1)`` zeros around less the pads (a pad past them crops), ``output_padding`` more after, windowed at
    stride 1 with the window's dilation, each window's kernel positions flipped."""
    rank = len(window.kernel)
    sizes = [(n - 1) * s + 1 for n, s in zip(x.shape[2:], window.strides, strict=True)]
    stuffed = np.zeros((*x.shape[:2], *sizes), x.dtype)
    every = [slice(None)] * 2
    stuffed[tuple(every + [slice(None, None, s) for s in window.strides])] = x
    extra = window.output_padding or (0,) * rank
    pads = window.padding(x.shape[2:])
    around = [
        (d * (k - 1) - before, d * (k - 1) - after + more)
        for k, d, (before, after), more in zip(window.kernel, window.dilations, pads, extra, strict=True)
    ]
    kept = [slice(max(0, -a), n - max(0, -b)) for (a, b), n in zip(around, sizes, strict=True)]
    padded = np.pad(stuffed[tuple(every + kept)], [(0, 0), (0, 0)] + [(max(0, a), max(0, b)) for a, b in around])
    forward = Window(window.kernel, (1,) * rank, window.dilations, ((0, 0),) * rank)
    views = _strided(padded, forward)
    return views[tuple(every + [slice(None)] * rank + [slice(None, None, -1)] * rank)]
