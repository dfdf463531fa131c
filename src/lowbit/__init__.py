"""lowbit: make neural-network weights small (palettization, quantization, sparsification) for ONNX and PyTorch."""

from lowbit.errors import LowbitError, ModelLoadError
from lowbit.onnx.decompress import decompress_weights
from lowbit.onnx.discovery import WeightRef
from lowbit.onnx.palettize import palettize_weights
from lowbit.onnx.program import Program, load
from lowbit.onnx.quantize import quantize_weights
from lowbit.onnx.sparsify import sparsify_weights
from lowbit.types import CompressionGranularity, DType, QScheme

__all__ = [
    "CompressionGranularity",
    "DType",
    "LowbitError",
    "ModelLoadError",
    "Program",
    "QScheme",
    "WeightRef",
    "decompress_weights",
    "load",
    "palettize_weights",
    "quantize_weights",
    "sparsify_weights",
]

__version__ = "0.1.0"
