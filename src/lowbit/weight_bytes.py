"""Compressed weights as bytes and back: how a palettization or a linear quantization travels with a torch
parameter (in ``state_dict``, ``torch.save``, a deep copy) without pickle, so loading a checkpoint never runs code.

The layout is a little-endian 8-byte header length, a JSON header (the format, the shapes, the scalars and each
array's dtype and shape), then the arrays' bytes in header order. The same weight gives the same bytes."""

from __future__ import annotations

import json
from typing import Any

import ml_dtypes
import numpy as np

from lowbit.kernels.palettize import Palettized
from lowbit.kernels.quantize import LinearQuantized, Quantized
from lowbit.outliers import Outliers
from lowbit.weights import PalettizedWeight, QuantizedWeight

__all__ = ["palettized_from_bytes", "palettized_to_bytes", "quantized_from_bytes", "quantized_to_bytes"]

_PALETTIZED = "lowbit.palettized/1"
_QUANTIZED = "lowbit.quantized/1"
_PALETTIZED_ARRAYS = (
    "packed", "lut", "scale", "lut_q", "lut_scale", "lut_zero_point", "outlier_positions", "outlier_values"
)  # fmt: skip
_QUANTIZED_ARRAYS = ("q", "scale", "zero_point")


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def _to_bytes(header: dict[str, Any], arrays: dict[str, np.ndarray | None]) -> bytes:
    """``header`` (its ``format`` and scalars) and the arrays present, as one record."""
    present = {k: np.ascontiguousarray(v) for k, v in arrays.items() if v is not None}
    header = {**header, "arrays": [[k, v.dtype.name, list(v.shape)] for k, v in present.items()]}
    encoded = json.dumps(header, sort_keys=True).encode()
    return b"".join([len(encoded).to_bytes(8, "little"), encoded, *(v.tobytes() for v in present.values())])


def _from_bytes(blob: bytes | memoryview, form: str, names: tuple[str, ...]) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of a record :func:`_to_bytes` wrote in format ``form``; ``ValueError`` otherwise."""
    what = "palettization" if form == _PALETTIZED else "quantization"
    try:
        length = int.from_bytes(bytes(blob[:8]), "little")
        header = json.loads(bytes(blob[8 : 8 + length]))
        if header.get("format") != form:
            raise ValueError(f"format {header.get('format')!r}")
        offset, arrays = 8 + length, {}
        for name, dtype_name, shape in header["arrays"]:
            dtype = _dtype(dtype_name)
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = np.frombuffer(blob, dtype, count, offset).reshape(shape).copy()
            offset += count * dtype.itemsize
        if offset != len(blob) or set(arrays) - set(names):
            raise ValueError("the arrays do not fill the record")
    except (KeyError, TypeError, ValueError) as error:  # JSON and Unicode errors are ValueErrors
        raise ValueError(f"not a lowbit {what} record: {error}") from error
    return header, arrays


def palettized_to_bytes(weight: PalettizedWeight) -> bytes:
    """``weight`` as bytes that :func:`palettized_from_bytes` reads back equal, arrays bit for bit."""
    p = weight.palettized
    q = p.lut_quantized
    arrays: dict[str, np.ndarray | None] = {
        "packed": p.packed,
        "lut": p.lut,
        "scale": p.scale,
        "lut_q": None if q is None else q.q,
        "lut_scale": None if q is None else q.scale,
        "lut_zero_point": None if q is None else q.zero_point,
        "outlier_positions": None if weight.outliers is None else weight.outliers.positions,
        "outlier_values": None if weight.outliers is None else weight.outliers.values,
    }
    header = {
        "format": _PALETTIZED,
        "shape": list(weight.shape),
        "forward": list(weight.forward),
        "codes_shape": list(p.codes_shape),
        "n_bits": p.n_bits,
        "squared_error": p.squared_error,
        "energy": p.energy,
    }
    return _to_bytes(header, arrays)


def palettized_from_bytes(blob: bytes | memoryview) -> PalettizedWeight:
    """The weight :func:`palettized_to_bytes` wrote; ``ValueError`` when ``blob`` is not such bytes."""
    header, arrays = _from_bytes(blob, _PALETTIZED, _PALETTIZED_ARRAYS)
    quantized = None
    if "lut_q" in arrays:
        quantized = Quantized(arrays["lut_q"], arrays["lut_scale"], arrays.get("lut_zero_point"))
    palettized = Palettized(
        arrays["packed"],
        tuple(header["codes_shape"]),  # type: ignore[arg-type]
        arrays["lut"],
        arrays.get("scale"),
        header["n_bits"],
        quantized,
        header["squared_error"],
        header["energy"],
    )
    outliers = None
    if "outlier_positions" in arrays:
        outliers = Outliers(arrays["outlier_positions"], arrays["outlier_values"])
    return PalettizedWeight(tuple(header["shape"]), tuple(header["forward"]), palettized, outliers)


def quantized_to_bytes(weight: QuantizedWeight) -> bytes:
    """``weight`` (integer or float elements, float or E8M0 scales) as bytes that :func:`quantized_from_bytes`
    reads back equal, arrays bit for bit."""
    q = weight.quantized
    header = {
        "format": _QUANTIZED,
        "shape": list(weight.shape),
        "block": list(q.block),
        "e8m0": q.e8m0,
        "out_dtype": q.out_dtype.name,
        "squared_error": q.squared_error,
        "energy": q.energy,
    }
    return _to_bytes(header, {"q": q.q, "scale": q.scale, "zero_point": q.zero_point})


def quantized_from_bytes(blob: bytes | memoryview) -> QuantizedWeight:
    """The weight :func:`quantized_to_bytes` wrote; ``ValueError`` when ``blob`` is not such bytes."""
    header, arrays = _from_bytes(blob, _QUANTIZED, _QUANTIZED_ARRAYS)
    try:
        quantized = LinearQuantized(
            arrays["q"],
            arrays["scale"],
            arrays.get("zero_point"),
            tuple(header["block"]),
            bool(header["e8m0"]),
            _dtype(header["out_dtype"]),
            header["squared_error"],
            header["energy"],
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"not a lowbit quantization record: {error}") from error
    return QuantizedWeight(quantized, tuple(header["shape"]))
