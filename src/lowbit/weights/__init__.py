"""The weight layer: everything about compressing one weight, given as an array and its channel axes.

Both front ends call it: the ONNX passes (discover -> read -> here -> write) and the torch palettizers (modules ->
here -> parameters). It decides the LUT groups and the layout the kernels see, the per-weight seed, the checks that
refuse a weight (always a :class:`~lowbit.errors.SkipWeight`), and the relative error that goes into the report.
It imports neither onnx nor torch, so the same array gives the same bytes through either door. One module per
compression: :mod:`.palettize`, :mod:`.quantize`, :mod:`.sparsify`; what they share in :mod:`.common`.
"""

from lowbit.weights.common import check_eligible, moved_axis_perms
from lowbit.weights.palettize import PalettizedWeight, palettize_weight
from lowbit.weights.quantize import QuantizedWeight, quantize_weight
from lowbit.weights.sparsify import SparsifiedWeight, sparsify_weight

__all__ = [
    "PalettizedWeight",
    "QuantizedWeight",
    "SparsifiedWeight",
    "check_eligible",
    "moved_axis_perms",
    "palettize_weight",
    "quantize_weight",
    "sparsify_weight",
]
