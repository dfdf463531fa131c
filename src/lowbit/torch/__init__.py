"""lowbit's PyTorch front end: palettizers and a linear quantizer over the same weight layer and kernels as the graph
path, a report of a compressed model, and export to ONNX and Core AI with the palettes and codes intact. Imports
torch; the rest of lowbit does not."""

from lowbit.torch.casting import cast_to_16_bit_precision
from lowbit.torch.export import export_onnx
from lowbit.torch.export_coreai import export_coreai
from lowbit.torch.palettization import load_state_dict, palettization_of
from lowbit.torch.quantization import quantization_of
from lowbit.torch.report import report

__all__ = [
    "cast_to_16_bit_precision",
    "export_coreai",
    "export_onnx",
    "load_state_dict",
    "palettization_of",
    "quantization_of",
    "report",
]
