"""Where a torch weight's palettization or quantization lives: a ``uint8`` buffer beside the parameter, named
``lowbit_palettized_<parameter>`` or ``lowbit_quantized_<parameter>``, holding :mod:`lowbit.weight_bytes`' record. A
buffer travels with everything a user does to a model: ``state_dict`` / ``load_state_dict``, ``torch.save``,
``copy.deepcopy``, ``.to(device)``; and export finds each record by its parameter's name."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.weight_bytes import (
    palettized_from_bytes,
    palettized_to_bytes,
    quantized_from_bytes,
    quantized_to_bytes,
)
from lowbit.weights import PalettizedWeight, QuantizedWeight

__all__ = [
    "PREFIX",
    "QUANTIZED_PREFIX",
    "load_state_dict",
    "palettization_of",
    "quantization_of",
    "same_bits",
    "stale",
    "store_palettization",
    "store_quantization",
]

PREFIX = "lowbit_palettized_"
QUANTIZED_PREFIX = "lowbit_quantized_"
READERS: dict[str, Callable[[bytes], Any]] = {PREFIX: palettized_from_bytes, QUANTIZED_PREFIX: quantized_from_bytes}


def store_palettization(module: nn.Module, name: str, weight: PalettizedWeight) -> None:
    """Record ``weight`` as the palettization of ``module``'s parameter ``name`` (``out_proj.weight`` is stored on
    ``out_proj``), on the parameter's device."""
    _store(module, name, PREFIX, palettized_to_bytes(weight))


def store_quantization(module: nn.Module, name: str, weight: QuantizedWeight) -> None:
    """Record ``weight`` as the linear quantization of ``module``'s parameter ``name``, on the parameter's device."""
    _store(module, name, QUANTIZED_PREFIX, quantized_to_bytes(weight))


def _store(module: nn.Module, name: str, prefix: str, record: bytes) -> None:
    """Register ``record`` under ``prefix``, dropping a record of the other kind (a palettized weight quantized
    since, or the reverse: the parameter holds the newer one)."""
    owner_name, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    device = getattr(owner, attribute).device
    for other in READERS.keys() - {prefix}:
        owner._buffers.pop(other + attribute, None)
    blob = torch.frombuffer(bytearray(record), dtype=torch.uint8)
    owner.register_buffer(prefix + attribute, blob.to(device), persistent=True)


def palettization_of(module: nn.Module) -> dict[str, PalettizedWeight]:
    """The palettizations recorded on ``module`` and its submodules, by parameter name relative to ``module``
    (``{"weight": ...}`` for a Linear, ``{"0.weight": ..., "2.weight": ...}`` for a Sequential of two)."""
    return _records(module, PREFIX)


def quantization_of(module: nn.Module) -> dict[str, QuantizedWeight]:
    """The linear quantizations recorded on ``module`` and its submodules, by parameter name relative to
    ``module``, as :func:`palettization_of` lists palettizations."""
    return _records(module, QUANTIZED_PREFIX)


def _records(module: nn.Module, prefix: str) -> dict[str, Any]:
    records = {}
    for name, buffer in module.named_buffers():
        path, _, leaf = name.rpartition(".")
        if leaf.startswith(prefix):
            parameter = leaf.removeprefix(prefix)
            records[f"{path}.{parameter}" if path else parameter] = READERS[prefix](
                buffer.detach().cpu().numpy().tobytes()
            )
    return records


def stale(weight: PalettizedWeight | QuantizedWeight, parameter: torch.Tensor) -> bool:
    """Whether ``parameter`` no longer holds what ``weight`` decodes to (trained or edited after compression)."""
    from lowbit.torch.modules import to_numpy

    current = to_numpy(parameter)
    if current.shape != weight.shape:
        return True
    decoded = weight.decode()
    return decoded.dtype != current.dtype or not same_bits(decoded, current)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality of two arrays of one shape and dtype (NaN payloads and signed zeros included)."""
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def load_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any] | str | os.PathLike, strict: bool = True
) -> nn.Module:
    """Load a palettized or quantized model's ``state_dict`` (a mapping, or a file ``torch.save`` wrote, read with
    ``weights_only=True``) into ``model``, a fresh instance of its class: the palettization and quantization records
    are registered first, so export writes them again. ``strict`` as in ``nn.Module.load_state_dict`` (default
    True).
    Returns ``model``. ``ValueError`` when a record names a module ``model`` does not have or is not a record."""
    state = state_dict if isinstance(state_dict, Mapping) else torch.load(state_dict, "cpu", weights_only=True)
    for key, value in state.items():
        path, _, leaf = key.rpartition(".")
        reader = next((READERS[p] for p in READERS if leaf.startswith(p)), None)
        if reader is None:
            continue
        try:
            owner = model.get_submodule(path)
        except AttributeError as error:
            raise ValueError(f"state_dict key {key!r}: the model has no module {path!r}") from error
        reader(value.detach().cpu().numpy().tobytes())  # refuses what is not a record
        current = dict(owner.named_buffers(recurse=False)).get(leaf)
        if current is None or current.shape != value.shape:  # records differ in size
            owner.register_buffer(leaf, torch.empty_like(value), persistent=True)
    model.load_state_dict(state, strict=strict)
    return model
