"""Export a palettized torch model to ONNX with its palettes intact."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from lowbit.config import QuantizeConfig, block_shape
from lowbit.kernels.packing import pack_bits
from lowbit.kernels.palettize import Palettized
from lowbit.report import CompressionReport, WeightResult
from lowbit.torch.records import palettization_of, quantization_of, same_bits, stale
from lowbit.types import CompressionGranularity, DType, QScheme
from lowbit.weights import PalettizedWeight, QuantizedWeight

if TYPE_CHECKING:
    from lowbit.onnx.discovery import WeightRef
    from lowbit.onnx.program import Program

__all__ = ["export_onnx"]

W = TypeVar("W", PalettizedWeight, QuantizedWeight)
GRANULARITIES = (
    CompressionGranularity.PER_TENSOR,
    CompressionGranularity.PER_CHANNEL,
    CompressionGranularity.PER_BLOCK,
)


class _Record(Generic[W]):
    """A recorded palettization or quantization, decoded on first use, with a cheap order-independent
    fingerprint."""

    def __init__(self, name: str, weight: W) -> None:
        self.name = name
        self.weight: W = weight

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
            if same_type and same_bits(candidate, array):
                return perm
        return None


def _abs_sum(array: np.ndarray) -> float:
    """A fingerprint that does not depend on the layout (up to float64 rounding)."""
    return float(np.abs(array.astype(np.float64)).sum())


Palettizations = dict[str, _Record[PalettizedWeight]]


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's training mode afterwards (an exporter restores only the top module's)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def kind_of(weight: PalettizedWeight | QuantizedWeight) -> str:
    """The report's name for a recorded compression: ``"palettized"`` or ``"quantized"``."""
    return "palettized" if isinstance(weight, PalettizedWeight) else "quantized"


def warn_unmatched(records: dict[str, _Record[Any]], dense_sizes: set[int]) -> None:
    """Warn for each record no exported weight matched while a dense weight of its size remains (else the traced
    forward does not use it: nothing to store)."""
    for record in records.values():
        if record.size not in dense_sizes:
            continue
        if isinstance(record.weight, PalettizedWeight):
            advice = (
                "A BatchNorm folded into a conv keeps the palette when its LUTs run along the output channels "
                "(channel_axis=0, or one LUT); else export with do_constant_folding=False to keep the BatchNorm apart"
            )
        else:
            advice = (
                "Quantized codes are placed where the exporter keeps the weight's values, as they are or "
                "transposed: not into a folded BatchNorm (export with do_constant_folding=False to keep it apart) "
                "nor a recurrent layer's restacked gates (palettize those)"
            )
        warnings.warn(
            f"{kind_of(record.weight)} weight {record.name!r} matches no weight of the exported graph (the "
            f"exporter changed its values): it is stored dense. {advice}",
            UserWarning,
            stacklevel=3,
        )


def records_of(model: nn.Module) -> Palettizations:
    """The model's palettization records by parameter name, without those whose parameter changed since (with a
    warning: such a weight is exported dense)."""
    return _fresh(model, palettization_of(model))


def quantized_records_of(model: nn.Module) -> dict[str, _Record[QuantizedWeight]]:
    """The model's quantization records by parameter name, as :func:`records_of`."""
    return _fresh(model, quantization_of(model))


def _fresh(model: nn.Module, recorded: dict[str, W]) -> dict[str, _Record[W]]:
    records = {}
    for name, weight in recorded.items():
        try:
            parameter = model.get_parameter(name)
        except AttributeError:  # computed now (a parametrization added since): not the recorded values
            warnings.warn(
                f"weight {name!r} is computed by a parametrization now, not the compressed parameter: it is "
                "exported as computed, dense",
                UserWarning,
                stacklevel=4,
            )
            continue
        if stale(weight, parameter):
            warnings.warn(
                f"weight {name!r} changed since it was compressed (trained or edited after): it is exported dense; "
                "compress it again (or finalize DKM) before exporting",
                UserWarning,
                stacklevel=4,
            )
            continue
        records[name] = _Record(name, weight)
    return records


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
    program: Program, records: Palettizations, quantized: dict[str, _Record[QuantizedWeight]]
) -> CompressionReport:
    """Encode each weight of ``program`` that matches a record (removed from ``records`` / ``quantized``): the
    record of its name, else one holding its values; or that has few values. The opset is raised first to what the
    quantized weights' ``DequantizeLinear`` needs."""
    from lowbit.onnx.backend import OnnxBackend
    from lowbit.onnx.encoding import stored_nbytes
    from lowbit.onnx.palettize import write_palettized
    from lowbit.onnx.quantize import QuantizeWriter

    found: dict[str, tuple[PalettizedWeight | QuantizedWeight, Any]] = {}
    plan = []
    every: dict[str, _Record[Any]] = {**records, **quantized}
    for ref in program.weights():
        if ref.value is None or ref.value.const_value is None or ref.compression is not None:
            continue
        array = ref.value.const_value.numpy()
        weight: PalettizedWeight | QuantizedWeight | None = None
        if (palettized := _named(ref.name, array, records) or matched(array, ref.output_axis, records)) is not None:
            found[ref.name] = (palettized, None)
        elif (restacked := _restacked(ref.op, array, records)) is not None:
            found[ref.name] = (restacked, array.shape)
        elif (weight := _named(ref.name, array, quantized) or match_values(array, quantized)) is not None:
            pass
        elif (weight := match_values(array, _placed(every, records, quantized))) is not None:
            pass  # a tied weight the exporter stores twice (an embedding and its head's transposed copy)
        elif (unique := _unique(ref, array)) is not None:
            found[ref.name] = (unique, None)
        if isinstance(weight, PalettizedWeight):
            found[ref.name] = (weight, None)
        elif isinstance(weight, QuantizedWeight):
            config = quantize_config_for(weight, ref.input_axis, ref.output_axis)
            if config is None:
                warnings.warn(_unlaid(ref.name), UserWarning, stacklevel=3)
                continue
            found[ref.name] = (weight, config)
            plan.append((ref, config))
    writer, report = QuantizeWriter(), CompressionReport()
    if plan:
        OnnxBackend(program, writer).prepare(plan)  # may convert the graph: its weights are found anew below
    for ref in program.weights():
        if ref.name not in found:
            continue
        weight, detail = found.pop(ref.name)
        if isinstance(weight, QuantizedWeight):
            after = writer.write(program, ref, weight, detail)
        else:
            after = stored_nbytes(write_palettized(program.model, ref, weight, detail))
        row = WeightResult(ref.name, ref.op, ref.shape, ref.nbytes, after, weight.rel_mse, None, kind_of(weight))
        report.rows.append(row)
    for name in found:  # the opset conversion renamed it
        warnings.warn(f"weight {name!r} is stored dense: not found after the opset conversion", UserWarning, 3)
    return report


def _placed(every: dict[str, _Record[Any]], *unplaced: dict[str, _Record[Any]]) -> dict[str, _Record[Any]]:
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
    for granularity in GRANULARITIES:
        expected = block_shape(granularity, len(whole), output_axis, input_axis, block)
        resolved = tuple(n if b == 0 else b for n, b in zip(whole, expected, strict=True))
        if resolved == tuple(q.block):
            return QuantizeConfig(DType.of(q.q.dtype), scheme, granularity, block, weight_num_threshold=0)
    return None


def _named(name: str, array: np.ndarray, candidates: dict[str, _Record[W]]) -> W | None:
    """The record of the parameter ``name`` when the exporter kept its values (as they are or transposed)."""
    record = candidates.get(name)
    perm = None if record is None or record.size != array.size else record.layout_of(array)
    if record is None or perm is None:
        return None
    del candidates[name]
    return record.weight.permuted(perm)


def matched(array: np.ndarray, output_axis: int, candidates: Palettizations) -> PalettizedWeight | None:
    """The record (removed from ``candidates``) whose values ``array`` holds, as they are, transposed, or with
    each output channel (``output_axis``) multiplied by a factor; in the record's shape or with size-1 axes
    inserted (a Conv1d's weight held as a 2-D convolution's)."""
    found = match_values(array, candidates) or _rescaled(array, output_axis, candidates)
    if found is not None:
        return found
    views = {}
    for key, record in candidates.items():
        unsqueezed = _unsqueezed(record.weight, array.shape)
        if unsqueezed is not None:
            views[key] = _Record(record.name, unsqueezed)
    offered = set(views)
    found = match_values(array, views) or _rescaled(array, output_axis, views)
    for key in offered - views.keys():  # the one matched
        del candidates[key]
    return found


def _unsqueezed(weight: PalettizedWeight, shape: tuple[int, ...]) -> PalettizedWeight | None:
    """``weight`` seen with the size-1 axes of ``shape`` inserted (same elements, same order), or None when
    ``shape`` is not ``weight.shape`` so extended."""
    if len(shape) <= len(weight.shape):
        return None
    where, old = [], 0
    for axis, size in enumerate(shape):
        if old < len(weight.shape) and size == weight.shape[old]:
            where.append(axis)
            old += 1
        elif size != 1:
            return None
    if old != len(weight.shape):
        return None
    units = tuple(a for a in range(len(shape)) if a not in where)
    return PalettizedWeight(shape, tuple(where[a] for a in weight.forward) + units, weight.palettized, weight.outliers)


def match_values(array: np.ndarray, candidates: dict[str, _Record[W]]) -> W | None:
    """The record (removed from ``candidates``) whose values ``array`` holds, as they are or transposed."""
    total = _abs_sum(array)
    for key, record in list(candidates.items()):
        if record.size != array.size or not math.isclose(record.abs_sum, total, rel_tol=1e-9):
            continue
        perm = record.layout_of(array)
        if perm is not None:
            del candidates[key]
            return record.weight.permuted(perm)
    return None


def _rescaled(array: np.ndarray, output_axis: int, candidates: Palettizations) -> PalettizedWeight | None:
    """A record whose output channels the exporter multiplied each by a factor (a BatchNorm folded into the
    convolution before it) as the same codes and LUTs with that factor as the per-channel scale: ``lut[codes] *
    factor`` rounds as the exporter's ``weight * factor`` does, checked bit for bit. Only for a record grouped
    along the output channels (or with one LUT) and without a scale of its own."""
    if array.dtype != np.float32:
        return None
    for key, record in list(candidates.items()):
        weight, palettized = record.weight, record.weight.palettized
        if weight.shape != array.shape or palettized.scale is not None or palettized.lut.shape[2] != 1:
            continue
        if weight.outliers is not None:  # the factor would scale the corrections too
            continue
        if weight.forward[0] != output_axis and palettized.lut.shape[0] > 1:
            continue
        factor = _channel_factor(record.dense, array, output_axis)
        if factor is None:
            continue
        del candidates[key]
        moved = weight if weight.forward[0] == output_axis else _channel_first(weight, output_axis)
        padding = moved.padded_shape[0] - len(factor)  # a ragged last LUT group's rows, sliced off at decode
        scale = np.concatenate([factor, np.ones(padding, factor.dtype)])
        return dataclasses.replace(moved, palettized=dataclasses.replace(moved.palettized, scale=scale))
    return None


def _channel_first(weight: PalettizedWeight, axis: int) -> PalettizedWeight:
    """A one-LUT palettization re-laid with ``axis`` first (its codes transposed, the LUT as it is)."""
    palettized = weight.palettized
    codes = palettized.codes.reshape(weight.canonical_shape).transpose(weight.back)
    forward = (axis, *(a for a in range(codes.ndim) if a != axis))
    rows = codes.transpose(forward).reshape(codes.shape[axis], -1)
    relaid = dataclasses.replace(palettized, packed=pack_bits(rows, palettized.n_bits), codes_shape=rows.shape)
    return PalettizedWeight(weight.shape, forward, relaid)


def _channel_factor(dense: np.ndarray, folded: np.ndarray, axis: int) -> np.ndarray | None:
    """The float32 ``f`` with ``dense * f`` (``f`` along ``axis``) bit-identical to ``folded``, or None. Each
    channel's factor is read off its largest element and tried one ulp either side."""
    rows, target = np.moveaxis(dense, axis, 0).reshape(dense.shape[axis], -1), np.moveaxis(folded, axis, 0)
    target = target.reshape(rows.shape)
    pick = np.abs(rows).argmax(1)
    pivot = rows[np.arange(len(rows)), pick].astype(np.float64)
    if not pivot.all():
        return None
    factor = (target[np.arange(len(rows)), pick] / pivot).astype(np.float32)
    for _ in range(2):
        wrong = ((rows * factor[:, None]) != target).any(1)
        if not wrong.any():
            return factor
        for step in (np.inf, -np.inf):
            nudged = factor.copy()
            nudged[wrong] = np.nextafter(factor[wrong], np.float32(step))
            fixed = wrong & ~((rows * nudged[:, None]) != target).any(1)
            factor[fixed] = nudged[fixed]
    return None


# the exporter's gate order from torch's, by recurrent op: LSTM (i, f, g, o) -> (i, o, f, c), GRU (r, z, n) -> (z, r, n)
_GATE_BLOCKS = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN": (0,)}


def _restacked(op: str, array: np.ndarray, candidates: Palettizations) -> PalettizedWeight | None:
    """A recurrent layer's ``W`` / ``R`` as the exporter writes it, ``[directions, gates * hidden, inputs]`` with
    each direction's gate blocks in ONNX's order, as one palettization of the ``[directions * gates * hidden,
    inputs]`` view: each direction's recorded codes and LUTs, rows and LUT groups reordered alike. None when a
    direction matches no record whose LUT groups stay whole under the reordering (the records are then left)."""
    blocks = _GATE_BLOCKS.get(op)
    if blocks is None or array.ndim != 3:
        return None
    parts = [_gate_match(array[d], blocks, candidates) for d in range(array.shape[0])]
    if any(p is None for p in parts) or len({p[1].palettized.n_bits for p in parts if p}) != 1:
        return None
    codes, luts, error, energy = [], [], 0.0, 0.0
    for key, weight, rows, groups in (p for p in parts if p):
        del candidates[key]
        palettized = weight.palettized
        by_row = palettized.codes if weight.forward == (0, 1) else palettized.codes.T  # one LUT: any layout
        codes.append(by_row[rows])
        luts.append(palettized.lut[groups])
        error, energy = error + palettized.squared_error, energy + palettized.energy
    stacked = np.concatenate(codes)
    n_bits = parts[0][1].palettized.n_bits if parts[0] else 0
    palettized = Palettized(
        pack_bits(stacked, n_bits), stacked.shape, np.concatenate(luts), None, n_bits, None, error, energy
    )
    return PalettizedWeight(stacked.shape, (0, 1), palettized)


def _gate_match(
    part: np.ndarray, blocks: tuple[int, ...], candidates: Palettizations
) -> tuple[str, PalettizedWeight, np.ndarray, np.ndarray] | None:
    """(key, record, row order, LUT group order) of the record whose rows, gate blocks reordered, are ``part``."""
    rows = part.shape[0]
    block = rows // len(blocks)
    order = np.concatenate([np.arange(b * block, (b + 1) * block) for b in blocks])
    total = _abs_sum(part)
    for key, record in candidates.items():
        weight, palettized = record.weight, record.weight.palettized
        if weight.shape != part.shape or not math.isclose(record.abs_sum, total, rel_tol=1e-9):
            continue
        groups = palettized.lut.shape[0]
        plain = palettized.scale is None and palettized.lut_quantized is None and palettized.lut.shape[2] == 1
        plain = plain and weight.outliers is None
        whole = weight.padded_shape == weight.canonical_shape and (
            groups == 1 or (weight.forward == (0, 1) and block % (rows // groups) == 0)
        )
        if plain and whole and same_bits(record.dense[order], part):
            per_group = rows // groups
            return key, weight, order, order[::per_group] // per_group
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
