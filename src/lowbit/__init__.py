"""lowbit: make neural-network weights small (palettization, quantization, sparsification) for ONNX and PyTorch.

The graph-path names are imported on first use, so that ``import lowbit.kernels`` or ``import lowbit.weights``
(the layers under both front ends) loads neither onnx nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lowbit.errors import LowbitError, ModelLoadError, SkipWeight
from lowbit.types import CompressionGranularity, DType, QScheme

if TYPE_CHECKING:
    from lowbit.onnx.decompress import decompress_weights
    from lowbit.onnx.discovery import WeightRef
    from lowbit.onnx.palettize import palettize_weights
    from lowbit.onnx.program import Program, load
    from lowbit.onnx.quantize import quantize_weights
    from lowbit.onnx.sparsify import sparsify_weights

_LAZY = {
    "Program": "lowbit.onnx.program",
    "load": "lowbit.onnx.program",
    "WeightRef": "lowbit.onnx.discovery",
    "decompress_weights": "lowbit.onnx.decompress",
    "palettize_weights": "lowbit.onnx.palettize",
    "quantize_weights": "lowbit.onnx.quantize",
    "sparsify_weights": "lowbit.onnx.sparsify",
}

__all__ = [
    "CompressionGranularity",
    "DType",
    "LowbitError",
    "ModelLoadError",
    "Program",
    "QScheme",
    "SkipWeight",
    "WeightRef",
    "decompress_weights",
    "load",
    "palettize_weights",
    "quantize_weights",
    "sparsify_weights",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
