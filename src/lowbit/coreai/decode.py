"""Decode chains evaluated in numpy, as Core AI's runtime evaluates them (tested against it): what
``decompress_weights`` writes back and what the tests compare the runtime with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lowbit.coreai import _mlir
from lowbit.coreai.program import Program

__all__ = ["decompress", "evaluate"]


def _out_dtype(op: Any) -> np.dtype:
    dtype = _mlir.element_dtype(op.results[0])
    assert dtype is not None
    return dtype


def _blocks(full: tuple[int, ...], grid: np.ndarray) -> np.ndarray:
    """``grid`` repeated over the blocks ``full`` divides into."""
    for axis, (n, g) in enumerate(zip(full, grid.shape, strict=True)):
        grid = np.repeat(grid, n // g, axis=axis)
    return grid


def _lut_to_dense(op: Any, indices: np.ndarray, lut: np.ndarray, axis: np.ndarray) -> np.ndarray:
    rank = indices.ndim
    grid = np.meshgrid(
        *[np.arange(n) // (n // g) for n, g in zip(indices.shape, lut.shape[:rank], strict=True)], indexing="ij"
    )
    where = (*grid, indices.astype(np.int64))
    vectors = lut[where]  # indices' shape + [cluster_dim]
    a = int(axis) % rank
    shape = list(indices.shape)
    shape[a] *= lut.shape[-1]
    return np.moveaxis(vectors, -1, a + 1).reshape(shape)


def _blockwise_shift_scale(op: Any, data: np.ndarray, scale: np.ndarray, offset1: np.ndarray, offset2: np.ndarray):
    """``scale * (data - offset1) + offset2``: the difference exact in float32, one rounding of the product to the
    output type (as lowbit's weight layer and ONNX's DequantizeLinear decode). With a non-zero ``offset1`` Core
    AI's Linux runtime does so for a conv's weight, but rounds ``scale * data`` and ``scale * offset1`` separately
    for a matmul's or an embedding's (within an ulp of this; measured in tests/coreai/test_probe.py)."""
    out = _out_dtype(op)
    shifted = data.astype(np.float32) - _blocks(data.shape, offset1.astype(np.float32))
    value = (_blocks(data.shape, scale.astype(np.float32)) * shifted).astype(out)
    if offset2.astype(np.float32).any():
        value = (value + _blocks(data.shape, offset2.astype(out))).astype(out)
    return value


def _sparse(op: Any, values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return values, mask


def _to_dense(op: Any, sparse: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    values, mask = sparse
    dense = np.zeros(mask.shape, values.dtype)
    dense[mask.astype(bool)] = values.reshape(-1)
    return dense


def _slice(op: Any, x: np.ndarray, start: np.ndarray, end: np.ndarray, stride: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(
        x[tuple(slice(int(a), int(b), int(c)) for a, b, c in zip(start, end, stride, strict=True))]
    )


def _scatter_nd(op: Any, x: np.ndarray, indices: np.ndarray, updates: np.ndarray) -> np.ndarray:
    """Full-rank scatter (the outliers' coordinates ``[count, rank]``): ``x`` with ``updates`` at ``indices``."""
    out = x.copy()
    out[tuple(indices.astype(np.int64).T)] = updates
    return out


_EVALUATORS: dict[str, Callable[..., Any]] = {
    "coreai.lut_to_dense": _lut_to_dense,
    "coreai.blockwise_shift_scale": _blockwise_shift_scale,
    "coreai.build_sparse_with_bitmask": _sparse,
    "coreai.sparse_with_bitmask_to_dense": _to_dense,
    "coreai.slice": _slice,
    "coreai.cast": lambda op, x: x.astype(_out_dtype(op)),
    "coreai.reshape": lambda op, x, shape: x.reshape(_mlir.tensor_shape(op.results[0])),
    "coreai.decomposable.broadcasting_mul": lambda op, a, b: (a * b).astype(_out_dtype(op)),
    "coreai.scatter_nd": _scatter_nd,
}


def evaluate(value: Any) -> Any:
    """The numpy value of ``value``, computed from the constants it depends on through decode ops. ``ValueError``
    for an op that is not one."""
    op = value.owner
    if op.name == "coreai.constant":
        return _mlir.read_constant(op)
    evaluator = _EVALUATORS.get(op.name)
    if evaluator is None:
        raise ValueError(f"{op.name} is not a decode op lowbit evaluates")
    return evaluator(op, *(evaluate(v) for v in op.operands))


def decompress(program: Program) -> None:
    """Replace every compressed weight of ``program`` by a constant of its decoded values, in place."""
    for weight in program.weights():
        if weight.compression is not None:
            _mlir.replace_value(weight.value, evaluate(weight.value), "weight")
    program.optimize()
