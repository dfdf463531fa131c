"""Weight discovery in a Core AI program: which constants are weights, which op consumes each, its channel axes,
and its name.

A weight is a float ``coreai.constant`` fed, directly or through a ``coreai.transpose``, to a weight operand of an
op in :data:`OP_TABLE`, in any graph of the module (composite ops live in graphs of their own). A weight already
compressed is found as the output of a decode chain over constants (``lut_to_dense``, ``blockwise_shift_scale``,
the sparse pair, ``cast`` / ``slice`` / ``broadcasting_mul``), whoever wrote it (lowbit or coreai-opt).

Weights have no names in a converted program, only debug locations: a weight is named
``graph/Module$i.Child$j/node`` from its constant's location (the converter's module path, each class numbered per
class, and the source node), with ``#k`` appended to the k-th repeat of a name. The name survives save and load and
a compression (the decode chain keeps the constant's location).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from lowbit.coreai import _mlir
from lowbit.driver import Weight

__all__ = ["OP_TABLE", "TRANSPOSE", "CoreAIWeight", "WeightOperand", "find_weights"]


class WeightOperand(NamedTuple):
    """A consumer op's weight operand: the weight's (output-channel axis, input-channel axis) as the op reads it,
    and ``activation``, the (operand, channel axis) of the value whose channels meet the input axis, what
    calibration measures (None: nothing to measure); ``lookup``: that operand holds indices into the weight's rows
    instead (an embedding's); ``window``: a convolution's (strides, dilations, groups) operands (its input arrives
    padded: the converter pads it first), over which calibration takes the activation's windows; ``transposed``: a
    transposed convolution's (padding, output padding) operands."""

    axes: tuple[int, int]
    activation: tuple[int, int] | None = None
    lookup: bool = False
    window: tuple[int, int, int] | None = None
    transposed: tuple[int, int] | None = None


# y: [..., K, N] read by x: [..., M, K] (coreai-opt's axes), or the other way round
_MATMUL = {1: WeightOperand((-1, -2), (0, -1)), 0: WeightOperand((-2, -1), (1, -2))}
# consumer op -> {operand index: its WeightOperand}
OP_TABLE: dict[str, dict[int, WeightOperand]] = {
    "coreai.batch_matmul": _MATMUL,
    "coreai.decomposable.broadcasting_batch_matmul": _MATMUL,
    "coreai.conv2d": {1: WeightOperand((0, 1), (0, 1), window=(2, 3, 4))},  # x: [N, C_in, ...], strides, dilations,
    "coreai.conv3d": {1: WeightOperand((0, 1), (0, 1), window=(2, 3, 4))},  # groups
    # [C_in, C_out / groups, k...]; x, strides, padding (each side), dilations, output padding, groups
    "coreai.conv_transpose2d": {1: WeightOperand((1, 0), (0, 1), window=(2, 4, 6), transposed=(3, 5))},
    "coreai.conv_transpose3d": {1: WeightOperand((1, 0), (0, 1), window=(2, 4, 6), transposed=(3, 5))},
    "coreai.gather_nd": {0: WeightOperand((0, 1), (1, 0), lookup=True)},  # an embedding table [vocab, dim]
}
TRANSPOSE = "coreai.transpose"
_SHORT = {"coreai.decomposable.broadcasting_batch_matmul": "broadcasting_batch_matmul"}


def short_op(name: str) -> str:
    """The op name users write in ``op_type_configs``: without the ``coreai.`` / ``coreai.decomposable.`` prefix."""
    return _SHORT.get(name, name.removeprefix("coreai."))


@dataclass(frozen=True)
class CoreAIWeight(Weight):
    """A weight of a Core AI program (:class:`lowbit.driver.Weight`): ``dtype`` a numpy dtype (None when lowbit has
    none for it), ``op`` the consumers' op names (``batch_matmul``, ``conv2d``, ...), ``value`` the MLIR value the
    consumers read (the constant's result, or the decode chain's output)."""

    @property
    def constant(self) -> Any:
        """The ``coreai.constant`` op of a dense weight."""
        return self.value.owner


def _uses(value: Any) -> Iterator[tuple[Any, int]]:
    for use in value.uses:
        yield use.owner, use.operand_number


def _weight_uses(value: Any, rank: int) -> list[tuple[str, tuple[int, int]]]:
    """(consumer op, (output axis, input axis) in ``value``'s own layout) for each weight use of ``value``,
    looking through transposes."""
    found = []
    for owner, index in _uses(value):
        table = OP_TABLE.get(owner.name)
        if table is not None and index in table:
            out, inner = table[index].axes
            found.append((short_op(owner.name), (out % rank, inner % rank)))
        elif owner.name == TRANSPOSE and index == 0:
            perm = _mlir.attribute_ints(owner.operands[1].owner) if _is_constant(owner.operands[1]) else None
            if perm is None or len(perm) != rank:
                continue
            for op, (out, inner) in _weight_uses(owner.results[0], rank):
                found.append((op, (perm[out], perm[inner])))
    return found


def _is_constant(value: Any) -> bool:
    owner = value.owner
    return hasattr(owner, "name") and owner.name == "coreai.constant"


def _decode_chain(value: Any) -> list[Any] | None:
    """The ops of the decode chain producing ``value`` (constants included), or None when it is not one."""
    chain, stack, seen = [], [value], set()
    while stack:
        v = stack.pop()
        owner = v.owner
        if not hasattr(owner, "name") or (owner.name != "coreai.constant" and owner.name not in _mlir.DECODE_OPS):
            return None
        if owner.name == "coreai.scatter_nd" and not _puts_back_outliers(owner):
            return None
        if id(owner) in seen:
            continue
        seen.add(id(owner))
        chain.append(owner)
        stack.extend(owner.operands)
    return chain


def _puts_back_outliers(scatter: Any) -> bool:
    """Whether a ``scatter_nd`` is lowbit's outliers after a decode: it replaces elements (its region yields the
    update) of a decoded weight (not of a bare constant) at constant full-rank coordinates ``[count, rank]``."""
    data, indices = scatter.operands[0], scatter.operands[1]
    shape, coordinates = _mlir.tensor_shape(data), _mlir.tensor_shape(indices)
    if _is_constant(data) or not _is_constant(indices) or shape is None or coordinates is None:
        return False
    block = scatter.regions[0].blocks[0]
    body = list(block.operations)
    replaces = len(body) == 1 and len(body[0].operands) == 1 and body[0].operands[0] == block.arguments[1]
    return replaces and len(coordinates) == 2 and coordinates[1] == len(shape)


def chain_nbytes(chain: list[Any]) -> int:
    """Bytes the constants of a decode chain take."""
    return sum(_mlir.stored_nbytes(op) for op in chain if op.name == "coreai.constant")


def stored_nbytes(value: Any) -> int:
    """Bytes the decode chain producing ``value`` takes (0 when it is not one)."""
    chain = _decode_chain(value)
    return 0 if chain is None else chain_nbytes(chain)


# the parts of a decode chain's description, in the order they are named: the outermost structure first (the kind
# :func:`lowbit.report_page.kind_of` reads from the first), whatever order the chain nests them in
_PARTS = {
    "sparse_with_bitmask_to_dense": lambda op: "sparse",
    "lut_to_dense": lambda op: f"lut {_element_of(op.operands[0])}",
    "blockwise_shift_scale": lambda op: f"blockwise {_element_of(op.operands[0])}",
    "scatter_nd": lambda op: "outliers",
}


def describe(chain: list[Any]) -> str:
    """A short description of a decode chain's encoding, e.g. ``lut ui4``, ``sparse + blockwise si8`` or
    ``lut ui4 + blockwise si8 + outliers`` (a quantized LUT, outliers put back)."""
    names = [op.name.removeprefix("coreai.") for op in chain]
    parts = [part(op) for kind, part in _PARTS.items() for name, op in zip(names, chain, strict=True) if name == kind]
    return " + ".join(parts) or "decoded"


def _element_of(value: Any) -> str:
    return _mlir.element_type_name(value) or "?"


def find_weights(program: Any) -> list[CoreAIWeight]:
    """Every weight of ``program`` (an ``AIProgram``) in program order, dense or compressed, with its axes.

    A constant whose consumers disagree on its axes is left out with a warning naming it."""
    candidates = []
    for op in _mlir.module_ops(program):
        if op.name == "coreai.constant" or op.name in _mlir.DECODE_OPS:
            if op.name != "coreai.constant" and not _feeds_a_consumer(op.results[0]):
                continue
            candidates.append(op)
    found = []
    names: Counter[str] = Counter()
    for op in candidates:
        value = op.results[0]
        shape = _mlir.tensor_shape(value)
        if shape is None or len(shape) < 2:
            continue
        uses = _weight_uses(value, len(shape))
        if not uses:
            continue
        chain = None
        if op.name != "coreai.constant":
            chain = _decode_chain(value)
            if chain is None:
                continue
        base = _mlir.location_name(op)
        names[base] += 1
        name = base if names[base] == 1 else f"{base}#{names[base] - 1}"
        axes = {a for _, a in uses}
        if len(axes) > 1:
            warnings.warn(
                f"weight {name!r} left alone: its consumers disagree on its axes {sorted(axes)}", stacklevel=3
            )
            continue
        (out, inner), consumers = axes.pop(), sorted({o for o, _ in uses})
        if chain is None:
            nbytes, compression = _mlir.stored_nbytes(op), None
        else:
            nbytes, compression = chain_nbytes(chain), describe(chain)
        dtype = _mlir.element_dtype(value)
        found.append(
            CoreAIWeight(
                name, shape, dtype, "+".join(consumers), out, inner, math.prod(shape), nbytes, compression, value
            )
        )
    return found


def _feeds_a_consumer(value: Any) -> bool:
    """Whether a decode op's output is a whole weight (read by a weight operand), not an inner link of a chain."""
    return any(owner.name in OP_TABLE or owner.name == TRANSPOSE for owner, _ in _uses(value))
