"""Exceptions lowbit raises: bad input that is the user's to fix, and the one way a weight is refused."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

__all__ = ["LowbitError", "ModelLoadError", "SkipWeight", "one_line", "warn_skipped"]

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep


class LowbitError(Exception):
    """Base class of lowbit's own errors; the CLI prints the message as one line and exits 2."""


class ModelLoadError(LowbitError, ValueError):
    """A file that is missing, not an ONNX model or Core AI asset, truncated, or otherwise unreadable."""


class SkipWeight(ValueError):
    """Why a weight is left as it is: the one way every layer (kernels, the weight layer, the ONNX passes, the
    torch palettizers) refuses a weight. The front ends record ``reason`` in the report and warn with it unless
    ``warn`` is False (a weight below the size threshold is expected, not news)."""

    def __init__(self, reason: str, warn: bool = True) -> None:
        super().__init__(reason, warn)  # both in args: the refusal survives pickling across a process pool
        self.reason = reason
        self.warn = warn

    def __str__(self) -> str:
        return self.reason


def one_line(err: BaseException) -> str:
    """``err``'s message cut to its first line (its type's name when it has none): how a runtime's error is quoted in
    lowbit's own one-line messages."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def warn_skipped(name: str, skipped: SkipWeight) -> None:
    """Warn that the weight ``name`` was left as it is, unless the skip is a quiet one; the warning points at the
    user's line that called lowbit, however deep in lowbit the weight was refused."""
    if skipped.warn:
        warnings.warn(f"weight {name!r} skipped: {skipped.reason}", UserWarning, stacklevel=_outside_lowbit())


def _outside_lowbit() -> int:
    """The ``stacklevel``, for a ``warnings.warn`` in the function that calls this one, of the first frame that is
    not lowbit's own."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _in_lowbit(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


@functools.lru_cache(maxsize=256)
def _in_lowbit(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_PACKAGE)
