"""Exceptions lowbit raises: bad input that is the user's to fix, and the one way a weight is refused."""

from __future__ import annotations

__all__ = ["LowbitError", "ModelLoadError", "SkipWeight"]


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
