"""A :class:`~lowbit.weights.PalettizedWeight` as bytes and back: how a palettization travels with a torch
parameter (in ``state_dict``, ``torch.save``, a deep copy) without pickle, so loading a checkpoint never runs code.

The layout is a little-endian 8-byte header length, a JSON header (the shapes, the scalars and each array's dtype
and shape), then the arrays' bytes in header order. The same weight gives the same bytes."""

from __future__ import annotations

import json
from typing import Any

import ml_dtypes
import numpy as np

from lowbit.kernels.palettize import Palettized
from lowbit.kernels.quantize import Quantized
from lowbit.outliers import Outliers
from lowbit.weights import PalettizedWeight

__all__ = ["palettized_from_bytes", "palettized_to_bytes"]

_FORMAT = "lowbit.palettized/1"
_ARRAYS = ("packed", "lut", "scale", "lut_q", "lut_scale", "lut_zero_point", "outlier_positions", "outlier_values")


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


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
    present = {k: np.ascontiguousarray(v) for k, v in arrays.items() if v is not None}
    header: dict[str, Any] = {
        "format": _FORMAT,
        "shape": list(weight.shape),
        "forward": list(weight.forward),
        "codes_shape": list(p.codes_shape),
        "n_bits": p.n_bits,
        "squared_error": p.squared_error,
        "energy": p.energy,
        "arrays": [[k, v.dtype.name, list(v.shape)] for k, v in present.items()],
    }
    encoded = json.dumps(header, sort_keys=True).encode()
    return b"".join([len(encoded).to_bytes(8, "little"), encoded, *(v.tobytes() for v in present.values())])


def palettized_from_bytes(blob: bytes | memoryview) -> PalettizedWeight:
    """The weight :func:`palettized_to_bytes` wrote; ``ValueError`` when ``blob`` is not such bytes."""
    try:
        length = int.from_bytes(bytes(blob[:8]), "little")
        header = json.loads(bytes(blob[8 : 8 + length]))
        if header.get("format") != _FORMAT:
            raise ValueError(f"format {header.get('format')!r}")
        offset, arrays = 8 + length, {}
        for name, dtype_name, shape in header["arrays"]:
            dtype = _dtype(dtype_name)
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = np.frombuffer(blob, dtype, count, offset).reshape(shape).copy()
            offset += count * dtype.itemsize
        if offset != len(blob) or set(arrays) - set(_ARRAYS):
            raise ValueError("the arrays do not fill the record")
    except (KeyError, TypeError, ValueError) as error:  # JSON and Unicode errors are ValueErrors
        raise ValueError(f"not a lowbit palettization record: {error}") from error
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
