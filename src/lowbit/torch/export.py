"""Export a palettized torch model to ONNX with its palettes intact."""

from __future__ import annotations

import functools
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lowbit.report import CompressionReport, WeightResult
from lowbit.torch.palettization._base import palettization_of
from lowbit.weights import PalettizedWeight

if TYPE_CHECKING:
    from lowbit.onnx.discovery import WeightRef
    from lowbit.onnx.program import Program

__all__ = ["export_onnx"]


class _Palettized:
    """A recorded palettization, decoded on first use, with a cheap order-independent fingerprint."""

    def __init__(self, name: str, weight: PalettizedWeight) -> None:
        self.name, self.weight = name, weight

    @property
    def size(self) -> int:
        return math.prod(self.weight.shape)

    @functools.cached_property
    def dense(self) -> np.ndarray:
        return self.weight.decode()

    @functools.cached_property
    def abs_sum(self) -> float:
        return _abs_sum(self.dense)

    def layout_of(self, array: np.ndarray) -> tuple[int, ...] | None:
        """The perm ``p`` with ``dense.transpose(p)`` bit-identical to ``array`` (the exporter may keep a weight
        or store its transpose, e.g. a Linear's as a MatMul operand), or None."""
        rank = self.dense.ndim
        for perm in dict.fromkeys([tuple(range(rank)), tuple(reversed(range(rank)))]):
            candidate = self.dense.transpose(perm)
            same_type = candidate.shape == array.shape and candidate.dtype == array.dtype
            if same_type and _same_bits(candidate, array):
                return perm
        return None


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (NaN payloads and signed zeros included)."""
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def _abs_sum(array: np.ndarray) -> float:
    """A fingerprint that does not depend on the layout (up to float64 rounding)."""
    return float(np.abs(array.astype(np.float64)).sum())


def _records(model: nn.Module) -> Iterator[_Palettized]:
    for module_name, module in model.named_modules():
        for param_name, weight in palettization_of(module).items():
            yield _Palettized(f"{module_name}.{param_name}" if module_name else param_name, weight)


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    opset_version: int = 17,
    dynamo: bool = False,
    **export_kwargs: Any,
) -> Program:
    """Export ``model`` with ``torch.onnx.export`` and write each palettized weight as ``lowbit.LutToDense``: the
    same LUTs, indices and scales the palettizer recorded, so the file has a palettized file's size and ONNX
    Runtime computes what the torch model computes.

    Parameters
    ----------
    model : a model palettized by :class:`~lowbit.torch.palettization.PostTrainingPalettizer` or
        :class:`~lowbit.torch.palettization.SKMPalettizer` (plain weights are exported dense).
    example_inputs : the inputs ``torch.onnx.export`` traces with (a tensor or a tuple).
    path : the ``.onnx`` file to write (atomically).
    opset_version : the ONNX opset of the export (default 17).
    dynamo : False (default) uses torch's TorchScript exporter (its deprecation warnings are silenced: lowbit chose
        it, as it needs no extra package and keeps weights as initializers); True the ``torch.export`` one (needs
        ``onnxscript``).
    export_kwargs : passed on to ``torch.onnx.export`` (``input_names``, ``output_names``, ``dynamic_axes``, ...).

    An exported weight is matched to a recorded palettization when it holds the same values, as they are or
    transposed. A weight that matches none but holds at most 256 distinct values (e.g. an LSTM's gates, which the
    exporter reorders and stacks) is palettized losslessly in ``unique`` mode. A recorded palettization that
    matches nothing while a dense weight of its size remains draws a warning naming it (one the traced forward
    does not use, e.g. an unused pooler, is simply not in the file).

    Returns the saved :class:`~lowbit.Program`; its ``report`` lists what each weight became.
    """
    from lowbit.onnx.program import load

    records = {id(r): r for r in _records(model)}
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "exported.onnx"
        modes = [(m, m.training) for m in model.modules()]  # the exporter restores only the top module's mode
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own, about itself
                torch.onnx.export(
                    model, example_inputs, str(exported), opset_version=opset_version, dynamo=dynamo, **export_kwargs
                )
        finally:
            for module, training in modes:
                module.training = training
        program = load(exported)
        program.report = _write_palettes(program, records)
        dense_sizes = {w.numel for w in program.weights() if w.compression is None}
        for record in records.values():
            if record.size in dense_sizes:  # else the traced forward does not use it: nothing to store
                warnings.warn(
                    f"palettized weight {record.name!r} matches no weight of the exported graph (the exporter "
                    "changed its values): it is stored dense",
                    UserWarning,
                    stacklevel=2,
                )
        program.optimize()
        program.save(path)
    return program


def _write_palettes(program: Program, records: dict[int, _Palettized]) -> CompressionReport:
    """Encode each weight of ``program`` that matches a record (removed from ``records``) or has few values."""
    from lowbit.onnx.encoding import stored_nbytes
    from lowbit.onnx.palettize import write_palettized

    report = CompressionReport()
    for ref in program.weights():
        if ref.value is None or ref.value.const_value is None or ref.compression is not None:
            continue
        array = ref.value.const_value.numpy()
        weight = _match(array, records)
        if weight is None:
            weight = _unique(ref, array)
        if weight is not None:
            out = write_palettized(program.model, ref, weight)
            report.rows.append(
                WeightResult(
                    ref.name, ref.op, ref.shape, ref.nbytes, stored_nbytes(out), weight.rel_mse, None, "palettized"
                )
            )
    return report


def _match(array: np.ndarray, candidates: dict[int, _Palettized]) -> PalettizedWeight | None:
    total = _abs_sum(array)
    for key, record in list(candidates.items()):
        if record.size != array.size or not math.isclose(record.abs_sum, total, rel_tol=1e-9):
            continue
        perm = record.layout_of(array)
        if perm is not None:
            del candidates[key]
            return record.weight.permuted(perm)
    return None


def _unique(ref: WeightRef, array: np.ndarray) -> PalettizedWeight | None:
    """Lossless palettization of a float weight of more than 1024 elements with at most 256 distinct values (None
    for any other)."""
    from lowbit.config import PALETTIZE_N_BITS, PalettizeConfig
    from lowbit.errors import SkipWeight
    from lowbit.weights import check_eligible, palettize_weight

    try:
        check_eligible(array.shape, array.dtype, 1024)
        distinct = np.unique(array).size
        bits = next((b for b in PALETTIZE_N_BITS if distinct <= 1 << b), None)
        if bits is None:
            return None
        config = PalettizeConfig(n_bits=bits, mode="unique", weight_num_threshold=0)
        return palettize_weight(array, ref.output_axis, config, name=ref.name)
    except SkipWeight:
        return None
