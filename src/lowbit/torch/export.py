"""Export a palettized or quantized torch model to ONNX with its palettes and codes intact."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lowbit.config import QUANTIZE_GRANULARITIES, QuantizeConfig, block_shape
from lowbit.report import CompressionReport, WeightResult
from lowbit.torch.export_match import (
    Palettizations,
    Record,
    kind_of,
    match_values,
    matched,
    named,
    quantized_records_of,
    records_of,
    restacked,
    warn_unmatched,
)
from lowbit.types import DType, QScheme
from lowbit.weights import PalettizedWeight, QuantizedWeight

if TYPE_CHECKING:
    from lowbit.onnx.discovery import WeightRef
    from lowbit.onnx.program import Program

__all__ = ["export_onnx"]


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's training mode afterwards (an exporter restores only the top module's)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    opset_version: int = 17,
    dynamo: bool = False,
    **export_kwargs: Any,
) -> Program:
    """Export ``model`` with ``torch.onnx.export`` and write each palettized weight as ``lowbit.LutToDense`` (the
    same LUTs, indices and scales the palettizer recorded) and each quantized one as ``DequantizeLinear`` of its
    recorded codes and scales (the opset raised to what that needs: 21 for int4 or blocks), so the file has a
    compressed file's size and ONNX Runtime computes what the torch model computes.

    Parameters
    ----------
    model : a model palettized by :class:`~lowbit.torch.palettization.PostTrainingPalettizer` or
        :class:`~lowbit.torch.palettization.SKMPalettizer`, or quantized by
        :class:`~lowbit.torch.quantization.PostTrainingQuantizer` (plain weights are exported dense).
    example_inputs : the inputs ``torch.onnx.export`` traces with (a tensor or a tuple).
    path : the ``.onnx`` file to write (atomically).
    opset_version : the ONNX opset of the export (default 17).
    dynamo : False (default) uses torch's TorchScript exporter (its deprecation warnings are silenced: lowbit chose
        it, as it needs no extra package and keeps weights as initializers); True the ``torch.export`` one (needs
        ``onnxscript``).
    export_kwargs : passed on to ``torch.onnx.export`` (``input_names``, ``output_names``, ``dynamic_axes``, ...).

    An exported weight is matched to the record of the parameter of its name (the exporter keeps parameter names),
    else to one holding the same values, as they are or transposed (a weight the exporter transposed into a new
    initializer). A compressed parameter whose values changed since (trained after compression) is exported dense
    with a warning naming it; so is a quantized weight the exporter changed (a BatchNorm folded into it) or laid out
    with its blocks across the reading op's output channels. A BatchNorm the exporter folds into a palettized
    convolution (the default) becomes the per-channel scale of its codes and LUTs, checked bit for bit. A recurrent
    layer's weights, which the exporter reorders by gate and stacks by direction, keep each direction's LUTs (one
    decode, reshaped). A weight that matches none but holds at most 256 distinct values is palettized losslessly in
    ``unique`` mode. A record that matches nothing while a dense weight of its size remains draws a warning naming
    it (one the traced forward does not use, e.g. an unused pooler, is simply not in the file).

    Returns the saved :class:`~lowbit.Program`; its ``report`` lists what each weight became.
    """
    from lowbit.onnx.program import PROTO_LIMIT_BYTES, load

    records, quantized = records_of(model), quantized_records_of(model)
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "exported.onnx"
        with modes_kept(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own, about itself
            torch.onnx.export(
                model, example_inputs, str(exported), opset_version=opset_version, dynamo=dynamo, **export_kwargs
            )
        program = load(exported)
        program.report = _write_records(program, records, quantized)
        warn_unmatched({**records, **quantized}, {w.numel for w in program.weights() if w.compression is None})
        program.optimize()
        # external data only where protobuf needs it (the dynamo exporter writes a data file even for a small model)
        program.save(path, external_data=program.tensor_nbytes() > PROTO_LIMIT_BYTES)
    return program


def _write_records(
    program: Program, records: Palettizations, quantized: dict[str, Record[QuantizedWeight]]
) -> CompressionReport:
    """Encode each weight of ``program`` that matches a record (removed from ``records`` / ``quantized``): the
    record of its name, else one holding its values; or that has few values. The opset is raised first to what the
    quantized weights' ``DequantizeLinear`` needs."""
    from lowbit.onnx.backend import OnnxBackend
    from lowbit.onnx.encoding import stored_nbytes
    from lowbit.onnx.palettize import write_palettized
    from lowbit.onnx.quantize import QuantizeWriter

    found: dict[str, tuple[PalettizedWeight | QuantizedWeight, Any]] = {}
    plan: list[tuple[WeightRef, QuantizeConfig]] = []
    every: dict[str, Record[Any]] = {**records, **quantized}
    for ref in program.weights():
        if ref.value is None or ref.value.const_value is None or ref.compression is not None:
            continue
        array = ref.value.const_value.numpy()
        weight: PalettizedWeight | QuantizedWeight | None
        weight = named(ref.name, array, records) or matched(array, ref.output_axis, records)
        reshape = None
        if weight is None and (weight := restacked(ref.op, array, records)) is not None:
            reshape = array.shape
        weight = (
            weight
            or named(ref.name, array, quantized)
            or match_values(array, quantized)
            # a tied weight the exporter stores twice (an embedding and its head's transposed copy)
            or match_values(array, _placed(every, records, quantized))
            or _unique(ref, array)
        )
        if isinstance(weight, QuantizedWeight):
            config = quantize_config_for(weight, ref.input_axis, ref.output_axis)
            if config is None:
                warnings.warn(_unlaid(ref.name), UserWarning, stacklevel=3)
                continue
            found[ref.name] = (weight, config)
            plan.append((ref, config))
        elif weight is not None:
            found[ref.name] = (weight, reshape)
    writer, report = QuantizeWriter(), CompressionReport()
    if plan:
        OnnxBackend(program, writer).prepare(plan)  # may convert the graph: its weights are found anew below
    for ref in program.weights():
        if ref.name not in found:
            continue
        compressed, detail = found.pop(ref.name)
        if isinstance(compressed, QuantizedWeight):
            after = writer.write(program, ref, compressed, detail)
        else:
            after = stored_nbytes(write_palettized(program.model, ref, compressed, detail))
        error, kind = compressed.rel_mse, kind_of(compressed)
        row = WeightResult(ref.name, ref.op, ref.shape, ref.nbytes, after, error, None, kind)
        report.rows.append(row)
    for name in found:  # the opset conversion renamed it
        warnings.warn(f"weight {name!r} is stored dense: not found after the opset conversion", UserWarning, 3)
    return report


def _placed(every: dict[str, Record[Any]], *unplaced: dict[str, Record[Any]]) -> dict[str, Record[Any]]:
    """The records of ``every`` already matched to a weight (in none of ``unplaced``), as a new dict."""
    return {key: record for key, record in every.items() if all(key not in rest for rest in unplaced)}


def _unlaid(name: str) -> str:
    return (
        f"quantized weight {name!r} is stored dense: the exporter laid it out so that its blocks do not run along "
        "the input channels of the op that reads it"
    )


def quantize_config_for(weight: QuantizedWeight, input_axis: int, output_axis: int) -> QuantizeConfig | None:
    """The :class:`~lowbit.config.QuantizeConfig` whose layout is ``weight``'s blocks, for a weight read with
    these input and output axes: one block (per tensor), one per output channel (per channel), or blocks along the
    input axis (per block); None when the blocks lie otherwise."""
    q = weight.quantized
    whole = tuple(q.q.shape)
    block = q.block[input_axis]
    scheme = QScheme.SYMMETRIC if q.zero_point is None else QScheme.ASYMMETRIC
    for granularity in QUANTIZE_GRANULARITIES:  # in this order: a one-channel weight is per tensor
        expected = block_shape(granularity, len(whole), output_axis, input_axis, block)
        resolved = tuple(n if b == 0 else b for n, b in zip(whole, expected, strict=True))
        if resolved == tuple(q.block):
            return QuantizeConfig(DType.of(q.q.dtype), scheme, granularity, block, weight_num_threshold=0)
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
