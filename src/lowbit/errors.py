"""Exceptions lowbit raises for bad input that is the user's to fix."""

from __future__ import annotations

__all__ = ["LowbitError", "ModelLoadError"]


class LowbitError(Exception):
    """Base class of lowbit's own errors; the CLI prints the message as one line and exits 2."""


class ModelLoadError(LowbitError, ValueError):
    """A file that is missing, not an ONNX model, truncated, or otherwise unreadable."""
