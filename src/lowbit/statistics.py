"""Per-weight statistics from calibration data, in one slot every algorithm reads (issue 26): each front end
(ONNX Runtime on the graph path, forward hooks on torch) fills it, the weight layer uses it.

The statistic: the diagonal of ``X^T X`` of a weight's input activations, one entry per input channel (the
weight's input axis), accumulated over the calibration rows. It says how much each input channel's weights move the
layer's output: the squared output error of a weight change ``dW`` is ``sum_k (X^T X)_kk dW_k^2`` when the
channels are uncorrelated, so palettization weighted by it minimizes the output error rather than the weight error
(the activation-aware weighting of AWQ / SqueezeLLM, from activations instead of gradients). The whole ``X^T X`` is
kept where the error feedback needs it. An embedding table's input is one-hot (a lookup reads one row), so its
``X^T X`` is diagonal: each row's lookup count, along the table's rows (:meth:`InputMoments.lookups`). A
convolution's rows are its input's windows (:func:`lowbit.kernels.patches.patches`): its channels are the (input
channel, kernel position) pairs, as its weight ``[out, in, *kernel]`` flattens them. Imports neither onnx nor torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ACTIVATION_DAMPING", "InputMoments"]

# k-means weighted by activations: 1 % of each LUT group's mean weight is added to every element's, so that no input
# channel drops out (measured on MiniLM 4-bit grouped(16): 0.01 / 0.1 / 1.0 give cosine 0.9651 / 0.9654 / 0.9612
# with the weighting alone; on a layer with 100x channel scales 0.01 halves 0.1's output error)
ACTIVATION_DAMPING = 0.01
GRAM_CHUNK = 1024  # rows of X whose X^T X is taken in one product before it is added to the sum
# activations above this magnitude turn X^T X to float64: their squares, summed over up to 1e8 rows, could overflow
# float32 (3.4e38)
FLOAT32_SAFE = 1e15


@dataclass
class InputMoments:
    """Running ``sum_rows x_k^2`` per input channel ``k`` of a weight (an embedding table's: per row, how often it
    was looked up), and how many rows were seen."""

    squares: np.ndarray  # float64 [input channels]
    rows: int = 0
    # [input channels, input channels]: the whole X^T X, when kept; float32 (float64 once activations exceed
    # FLOAT32_SAFE): the feedback damps it by 1 % of its diagonal, far above float32's rounding, and a model's
    # matrices, all held until the compression, take half the memory (SmolLM2-135M: 400 MB, not 800)
    gram: np.ndarray | None = None
    # the weight axis the channels index when it is not the weight's input axis: an embedding table's rows, which a
    # Gather looks up (its X is one-hot, so X^T X is diagonal: each row's lookup count)
    axis: int | None = None
    # a convolution's kernel: the channels are (input channel, kernel position) pairs, channel-major, and index the
    # weight's input axis and the kernel axes after it
    kernel: tuple[int, ...] = ()
    # a grouped convolution's groups: each group of output channels reads its own input channels, so X^T X is kept
    # as its diagonal blocks, [groups, channels / groups, channels / groups] (the pairs of a depthwise 3 x 3: 9 x 9)
    groups: int = 1

    @classmethod
    def lookups(cls, rows: int) -> InputMoments:
        """No lookups yet into an embedding table of ``rows`` rows (its axis 0): see :meth:`add_lookups`."""
        return cls(np.zeros(rows, np.float64), 0, None, axis=0)

    @classmethod
    def empty(cls, channels: int, full: bool = False, kernel: tuple[int, ...] = (), groups: int = 1) -> InputMoments:
        """No rows yet for ``channels`` input channels (times the positions of a convolution's ``kernel``; read by
        ``groups`` groups of output channels); ``full`` also keeps the whole ``X^T X`` (for error feedback; a grouped
        convolution's diagonal blocks)."""
        n = channels * math.prod(kernel)
        block = n // groups
        gram = np.zeros((block, block), np.float32) if groups == 1 else np.zeros((groups, block, block), np.float32)
        return cls(np.zeros(n, np.float64), 0, gram if full else None, kernel=tuple(kernel), groups=groups)

    def add(self, activations: np.ndarray, channel_axis: int) -> None:
        """Accumulate a batch of activations whose ``channel_axis`` holds the input channels. ``X^T X`` is summed
        over chunks of :data:`GRAM_CHUNK` rows, in float32 unless the activations exceed :data:`FLOAT32_SAFE`."""
        x = np.moveaxis(np.asarray(activations), channel_axis, -1)
        x = x.reshape(-1, x.shape[-1])
        wide = x.astype(np.float64)
        self.squares += np.einsum("ij,ij->j", wide, wide)
        if self.gram is not None:
            self._widen(np.abs(wide).max(initial=0.0) > FLOAT32_SAFE)
            narrow = x.astype(self.gram.dtype)
            for start in range(0, len(narrow), GRAM_CHUNK):
                chunk = narrow[start : start + GRAM_CHUNK]
                if self.groups == 1:
                    self.gram += np.ascontiguousarray(chunk.T) @ chunk
                else:  # each group's block: its input channels' pairs against each other
                    blocks = chunk.reshape(len(chunk), self.groups, -1).transpose(1, 0, 2)
                    self.gram += np.ascontiguousarray(blocks.transpose(0, 2, 1)) @ blocks
        self.rows += x.shape[0]

    def merge(self, other: InputMoments) -> None:
        """Add ``other``'s rows (the same input channels, and a whole ``X^T X`` where this one keeps it)."""
        self.squares += other.squares
        if self.gram is not None:
            assert other.gram is not None
            self._widen(other.gram.dtype == np.float64)
            self.gram += other.gram
        self.rows += other.rows

    def merge_blocks(self, other: InputMoments) -> None:
        """Add a grouped ``other``'s rows (the same input channels; its ``X^T X`` kept as its groups' blocks) to
        this one's whole ``X^T X``, its blocks on the diagonal (a grouped transposed convolution's: the rest zero)."""
        assert self.gram is not None and other.gram is not None and other.gram.ndim == 3
        self.squares += other.squares
        self._widen(other.gram.dtype == np.float64)
        n = other.gram.shape[1]
        for g, block in enumerate(other.gram):
            self.gram[g * n : (g + 1) * n, g * n : (g + 1) * n] += block
        self.rows += other.rows

    def _widen(self, needed: bool) -> None:
        """Hold ``X^T X`` in float64 from now on, when ``needed``."""
        if needed and self.gram is not None and self.gram.dtype != np.float64:
            self.gram = self.gram.astype(np.float64)

    def weighting(self, shape: tuple[int, ...], input_axis: int) -> tuple[np.ndarray, float]:
        """(each element's weight in the k-means, :meth:`importance`, and the damping that goes with it,
        :data:`ACTIVATION_DAMPING`): what palettization reads from calibration, on every door."""
        return self.importance(shape, input_axis), ACTIVATION_DAMPING

    def channel_weights(self) -> np.ndarray:
        """Each channel's summed squares (a looked-up row's count, plus :data:`ACTIVATION_DAMPING` of the mean
        count, so that rows no calibration item looked up still count)."""
        if self.axis is None:
            return self.squares
        return self.squares + ACTIVATION_DAMPING * self.squares.mean()

    def channel_axis(self, input_axis: int) -> int:
        """The axis of the weight these statistics' channels index: its input axis, or :attr:`axis`."""
        return input_axis if self.axis is None else self.axis

    def importance(self, shape: tuple[int, ...], input_axis: int) -> np.ndarray:
        """Each element's weight in the k-means, ``shape``-shaped: its channel's :meth:`channel_weights` over the
        rows seen (an input channel's mean squared activation, a convolution's per kernel position too; a table
        row's share of the lookups)."""
        axis = self.channel_axis(input_axis) % len(shape)
        mean = self.channel_weights() / max(self.rows, 1)
        axes = self._channel_axes(shape, axis)
        if self.groups > 1:  # output channel o reads its group's channels: [out, in / groups, *kernel]
            return np.repeat(mean.reshape(self.groups, *shape[1:]), shape[0] // self.groups, axis=0)
        view = [n if a in axes else 1 for a, n in enumerate(shape)]
        return np.broadcast_to(mean.reshape(view), shape)

    def _channel_axes(self, shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
        """The weight axes these statistics' channels index, in their order: ``axis``, then a convolution's kernel
        axes (the last ones: ``[out, in, *kernel]``, a transposed one's ``[in, out, *kernel]``); ``ValueError`` when
        their count is not those axes' size."""
        kernel_axes = tuple(range(len(shape) - len(self.kernel), len(shape))) if self.kernel else ()
        axes = (axis, *kernel_axes)
        size = math.prod(shape[a] for a in axes) * self.groups
        fits = not kernel_axes or axis < kernel_axes[0]
        if (
            not fits
            or tuple(shape[a] for a in kernel_axes) != self.kernel
            or self.squares.size != size
            or shape[0] % self.groups
        ):
            what = f"{shape[axis]} channels" + (f" and a {self.kernel} kernel" if self.kernel else "")
            what += f" in {self.groups} groups" if self.groups > 1 else ""
            raise ValueError(f"statistics of {self.squares.size} channels for a weight of {what}, shape {shape}")
        return axes

    def channels_first(self, values: np.ndarray, input_axis: int) -> np.ndarray:
        """``values`` (a weight's shape, or a change of it) as ``[these statistics' channels, the rest]``: the
        rows ``X^T X`` multiplies (a grouped convolution's: ``[groups, its pairs, its output channels]``, each group
        under its block)."""
        axis = self.channel_axis(input_axis) % values.ndim
        axes = self._channel_axes(values.shape, axis)
        if self.groups > 1:
            return values.reshape(self.groups, values.shape[0] // self.groups, -1).transpose(0, 2, 1)
        moved = np.moveaxis(values, axes, tuple(range(len(axes))))
        return moved.reshape(self.squares.size, -1)

    def add_lookups(self, indices: np.ndarray) -> None:
        """Accumulate a batch of a Gather's ``indices`` into a table of ``len(squares)`` rows (negative indices count
        from the end). ``ValueError`` for an index outside the table."""
        flat = np.asarray(indices).reshape(-1).astype(np.int64)
        rows = len(self.squares)
        if flat.size and (flat.min() < -rows or flat.max() >= rows):
            raise ValueError(f"an index outside its {rows} rows")
        self.squares += np.bincount(flat % rows, minlength=rows)
        self.rows += flat.size
