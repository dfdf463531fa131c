"""Which record an exported weight holds: the palettization or quantization recorded for the parameter of its
name, or for the same values as they are, transposed, with a folded per-channel factor, with inserted unit axes, or
(a recurrent layer's) reordered by gate and stacked by direction. Shared by the ONNX and Core AI exports."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Generic, TypeVar

import numpy as np
from torch import nn

from lowbit.kernels.packing import pack_bits
from lowbit.kernels.palettize import Palettized
from lowbit.torch.records import palettization_of, quantization_of, same_bits, stale
from lowbit.weights import PalettizedWeight, QuantizedWeight

__all__ = [
    "Palettizations",
    "Record",
    "kind_of",
    "match_values",
    "matched",
    "named",
    "quantized_records_of",
    "records_of",
    "restacked",
    "warn_unmatched",
]

W = TypeVar("W", PalettizedWeight, QuantizedWeight)


class Record(Generic[W]):
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


Palettizations = dict[str, Record[PalettizedWeight]]


def kind_of(weight: PalettizedWeight | QuantizedWeight) -> str:
    """The report's name for a recorded compression: ``"palettized"`` or ``"quantized"``."""
    return "palettized" if isinstance(weight, PalettizedWeight) else "quantized"


def warn_unmatched(records: dict[str, Record[Any]], dense_sizes: set[int]) -> None:
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


def quantized_records_of(model: nn.Module) -> dict[str, Record[QuantizedWeight]]:
    """The model's quantization records by parameter name, as :func:`records_of`."""
    return _fresh(model, quantization_of(model))


def _fresh(model: nn.Module, recorded: dict[str, W]) -> dict[str, Record[W]]:
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
        records[name] = Record(name, weight)
    return records


def named(name: str, array: np.ndarray, candidates: dict[str, Record[W]]) -> W | None:
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
            views[key] = Record(record.name, unsqueezed)
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


def match_values(array: np.ndarray, candidates: dict[str, Record[W]]) -> W | None:
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


def restacked(op: str, array: np.ndarray, candidates: Palettizations) -> PalettizedWeight | None:
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
