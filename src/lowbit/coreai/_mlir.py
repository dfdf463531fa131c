"""Every use of coreai-core's private API, in one place.

coreai-core 1.0.0b3's public authoring API builds programs but cannot walk or edit one, so lowbit edits a loaded
program through the MLIR bindings it bundles (``coreai._compiler``) and reads resource constants through a native
helper. A coreai-core upgrade that moves these is fixed here alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import coreai.authoring  # noqa: F401  (registers the dialects: must precede the dialect import below)
import ml_dtypes
import numpy as np
from coreai._compiler import ir
from coreai._compiler._mlir_libs._coreaiIR import _bindings as _native
from coreai._compiler.dialects import coreai as ops
from coreai._compiler.passmanager import PassManager

from lowbit.kernels.packing import pack_bits, unpack_bits

__all__ = [
    "DECODE_OPS",
    "Operation",
    "Value",
    "clone",
    "constant",
    "element_dtype",
    "graph_inputs",
    "graph_name",
    "location_name",
    "module_ops",
    "ops",
    "read_constant",
    "remove_dead_constants",
    "replace",
    "set_outputs",
    "splat",
    "tensor_dims",
    "tensor_shape",
    "verify",
]

Operation = Any  # ir.Operation / ir.OpView
Value = Any  # ir.Value
_bindings: Any = _native  # native helpers (no usable stubs)

# MLIR element type -> (numpy dtype, bits per element); sub-byte types are stored as LSB-first bit streams
_ELEMENTS: dict[str, tuple[np.dtype, int]] = {
    "f32": (np.dtype(np.float32), 32),
    "f16": (np.dtype(np.float16), 16),
    "bf16": (np.dtype(ml_dtypes.bfloat16), 16),
    "f64": (np.dtype(np.float64), 64),
    "f8E4M3FN": (np.dtype(ml_dtypes.float8_e4m3fn), 8),
    "f8E5M2": (np.dtype(ml_dtypes.float8_e5m2), 8),
    "f8E8M0FNU": (np.dtype(ml_dtypes.float8_e8m0fnu), 8),
    "f4E2M1FN": (np.dtype(ml_dtypes.float4_e2m1fn), 4),
    "i1": (np.dtype(np.bool_), 8),
    **{f"si{n}": (np.dtype(np.int8), n) for n in (2, 3, 4, 6)},
    **{f"ui{n}": (np.dtype(np.uint8), n) for n in (1, 2, 3, 4, 6)},
    "si4": (np.dtype(ml_dtypes.int4), 4),
    "ui4": (np.dtype(ml_dtypes.uint4), 4),
    **{f"{s}i{n}": (np.dtype(f"{'u' if s == 'u' else ''}int{n}"), n) for s in "su" for n in (8, 16, 32, 64)},
    **{f"i{n}": (np.dtype(f"int{n}"), n) for n in (8, 16, 32, 64)},
}
_NAMES = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float16): "f16",
    np.dtype(ml_dtypes.bfloat16): "bf16",
    np.dtype(ml_dtypes.float8_e4m3fn): "f8E4M3FN",
    np.dtype(ml_dtypes.float8_e5m2): "f8E5M2",
    np.dtype(ml_dtypes.float8_e8m0fnu): "f8E8M0FNU",
    np.dtype(ml_dtypes.float4_e2m1fn): "f4E2M1FN",
    np.dtype(ml_dtypes.int4): "si4",
    np.dtype(ml_dtypes.uint4): "ui4",
    np.dtype(np.int8): "si8",
    np.dtype(np.uint8): "ui8",
    np.dtype(np.int16): "si16",
    np.dtype(np.int32): "si32",
}

# ops whose chains over constants decode a compressed weight (coreai-opt's and lowbit's encodings)
DECODE_OPS = frozenset(
    {
        "coreai.lut_to_dense",
        "coreai.blockwise_shift_scale",
        "coreai.sparse_with_bitmask_to_dense",
        "coreai.build_sparse_with_bitmask",
        "coreai.lut_to_sparse_with_bitmask",
        "coreai.cast",
        "coreai.slice",
        "coreai.decomposable.broadcasting_mul",
        "coreai.scatter_nd",
    }
)


def module_ops(program: Any) -> list[Operation]:
    """Every operation of ``program`` (an ``AIProgram``), in every graph, in pre-order."""
    found: list[Operation] = []

    def visit(op: Operation) -> Any:
        found.append(op)
        return ir.WalkResult.ADVANCE

    program._module._mlir_module.operation.walk(visit, ir.WalkOrder.PRE_ORDER)
    return found


def clone(program: Any) -> Any:
    """An independent copy of ``program`` (the module is cloned; tensors are copied by MLIR)."""
    return copy.deepcopy(program)


def verify(program: Any) -> None:
    """Raise ``ValueError`` with MLIR's diagnostics when ``program`` does not verify."""
    try:
        program._module._mlir_module.operation.verify()
    except ir.MLIRError as err:
        raise ValueError(f"the program does not verify: {err}") from err


def remove_dead_constants(program: Any) -> None:
    """Drop unused constants (MLIR's canonicalizer; it keeps the decode ops)."""
    module = program._module._mlir_module
    with module.context:
        PassManager.parse("builtin.module(canonicalize)").run(module.operation)


def _element(value_or_type: Any) -> tuple[str, tuple[int, ...]]:
    t = ir.RankedTensorType(value_or_type if isinstance(value_or_type, ir.Type) else value_or_type.type)
    return str(t.element_type), tuple(int(n) for n in t.shape)


def tensor_dims(value: Value) -> tuple[int | None, ...] | None:
    """The dims of a ranked tensor value, None for each dynamic one (None for anything else)."""
    if not ir.RankedTensorType.isinstance(value.type):
        return None
    t = ir.RankedTensorType(value.type)
    return tuple(None if t.is_dynamic_dim(i) else int(t.get_dim_size(i)) for i in range(t.rank))


def tensor_shape(value: Value) -> tuple[int, ...] | None:
    """The static shape of a ranked tensor value (None for anything else or a dynamic shape)."""
    dims = tensor_dims(value)
    return None if dims is None or None in dims else tuple(d for d in dims if d is not None)


def element_type_name(value: Value) -> str | None:
    """The MLIR name of a tensor value's element type (``f16``, ``ui4``, ...)."""
    return _element(value)[0] if ir.RankedTensorType.isinstance(value.type) else None


def element_dtype(value: Value) -> np.dtype | None:
    """The numpy dtype of a tensor value's elements (None when lowbit has none for it)."""
    if not ir.RankedTensorType.isinstance(value.type):
        return None
    entry = _ELEMENTS.get(_element(value)[0])
    return None if entry is None else entry[0]


def stored_nbytes(op: Operation) -> int:
    """Bytes a constant's payload takes (sub-byte elements packed)."""
    name, shape = _element(op.result)
    bits = _ELEMENTS.get(name, (None, 32))[1]
    return 0 if _splat(op) else math.ceil(math.prod(shape) * bits / 8)


def _splat(op: Operation) -> bool:
    attr = op.attributes["value"]
    return ir.DenseElementsAttr.isinstance(attr) and ir.DenseElementsAttr(attr).is_splat


def read_constant(op: Operation) -> np.ndarray:
    """A ``coreai.constant``'s value (dense or resource, splat or not) as numpy; sub-byte integers as int8 /
    uint8 (``si4`` / ``ui4`` as ml_dtypes' int4 / uint4), ``f4E2M1FN`` as float4_e2m1fn.

    The native copy writes the stored payload without a bound, so the buffer always has one byte per element at
    least: a sub-byte constant stored unpacked (as coreai-opt 0.3.0 writes MXFP4) cannot overrun it, and is told
    from a packed one by how many bytes were written."""
    name, shape = _element(op.result)
    dtype, bits = _ELEMENTS[name]
    count = math.prod(shape)
    if _splat(op):
        return np.full(shape, _splat_scalar(op), dtype)
    if bits >= 8:
        raw = np.empty(count * dtype.itemsize, np.uint8)
        _bindings.compiler.copy_constant_value_to_array(constant_op=op, destination=raw)
        return raw.view(dtype).reshape(shape)
    low, high = np.zeros(count + 8, np.uint8), np.full(count + 8, 0xFF, np.uint8)
    for buffer in (low, high):
        _bindings.compiler.copy_constant_value_to_array(constant_op=op, destination=buffer)
    written = int(np.flatnonzero((low != 0) | (high != 0xFF)).max(initial=-1)) + 1
    packed = math.ceil(count * bits / 8)
    codes = low[:count] if written > packed else unpack_bits(low[:packed], bits, count)
    codes = codes.astype(np.uint8)
    if name.startswith("si") and dtype == np.int8:  # sign-extend sub-byte signed codes
        codes = ((codes.astype(np.int16) ^ (1 << (bits - 1))) - (1 << (bits - 1))).astype(np.int8)
    return codes.view(dtype).reshape(shape) if dtype.itemsize == 1 else codes.astype(dtype).reshape(shape)


def _splat_scalar(op: Operation) -> float | int:
    attr = ir.DenseElementsAttr(op.attributes["value"])
    element = attr.get_splat_value()
    if ir.FloatAttr.isinstance(element):
        return ir.FloatAttr(element).value
    return ir.IntegerAttr(element).value


def _tensor_type(shape: Sequence[int], element: str) -> Any:
    return ir.RankedTensorType.get(list(shape), ir.Type.parse(element))


def constant(array: np.ndarray, name: str, element: str | None = None) -> Value:
    """A resource constant holding ``array`` (at the current insertion point); ``element`` names the MLIR element
    type when it is not the array's own (sub-byte codes are given one per uint8 / int8 and packed LSB-first).
    ``name`` is the blob's key in the file (MLIR makes it unique): keep it short, every weight stores its own."""
    array = np.ascontiguousarray(array)
    element = element or _NAMES[array.dtype]
    bits = _ELEMENTS[element][1]
    if bits < 8:
        raw = pack_bits(array.view(np.uint8).reshape(-1) & ((1 << bits) - 1), bits)
    else:
        raw = array.reshape(-1).view(np.uint8)
    attr = ir.DenseResourceElementsAttr.get_from_buffer(raw, name, _tensor_type(array.shape, element))
    return ops.ConstantOp(value=attr).result


def splat(value: float, shape: Sequence[int], element: str) -> Value:
    """A splat constant (visible to the verifier, which wants fp4 offsets to be literal zeros)."""
    t = _tensor_type(shape, element)
    et = t.element_type
    scalar = ir.IntegerAttr.get(et, int(value)) if ir.IntegerType.isinstance(et) else ir.FloatAttr.get(et, value)
    return ops.ConstantOp(value=ir.DenseElementsAttr.get_splat(t, scalar)).result


def scalar(value: int, element: str) -> Value:
    """A rank-0 constant (e.g. ``lut_to_dense``'s si16 axis)."""
    t = _tensor_type([], element)
    return ops.ConstantOp(value=ir.DenseElementsAttr.get(np.array(value, _ELEMENTS[element][0]), type=t)).result


def element_name(dtype: np.dtype) -> str:
    """The MLIR element type of a numpy dtype."""
    return _NAMES[np.dtype(dtype)]


def replace(op: Operation, build: Callable[[], Value]) -> Value:
    """Build a value before ``op`` (a constant) with ``build``, move every use of ``op``'s result to it and erase
    ``op``. ``TypeError`` when the new value's type differs (nothing is changed then)."""
    with op.context, op.location, ir.InsertionPoint(op):
        new = build()
    if new.type != op.result.type:
        raise TypeError(f"decoded type {new.type} differs from the weight's {op.result.type}")
    op.result.replace_all_uses_with(new)
    op.erase()
    return new


def replace_value(value: Value, array: np.ndarray, name: str) -> None:
    """Replace every use of ``value`` (a decode chain's output) by a constant holding ``array``."""
    producer = value.owner
    with producer.context, producer.location, ir.InsertionPoint(producer):
        dense = constant(array, name, _element(value)[0])
    value.replace_all_uses_with(dense)


def graph_name(op: Operation) -> str:
    """The symbol of the ``coreai.graph`` holding ``op``."""
    parent = op.parent
    while parent is not None and parent.name != "coreai.graph":
        parent = parent.parent
    return "?" if parent is None else ir.StringAttr(parent.attributes["sym_name"]).value


def location_name(op: Operation) -> str:
    """``graph/call.stack/identifiers`` from ``op``'s debug location: the converter's module path (class names
    numbered per class, e.g. ``BertLayer$2``) and the source nodes' names."""
    location = op.location
    try:
        stack = ".".join(_bindings.mlir.get_stack_trace(location))
        names = "+".join(i for source in _bindings.mlir.get_source_info(location) for i in source.identifiers)
    except Exception:  # a location without debug info
        stack, names = "", ""
    return f"{graph_name(op)}/{stack}/{names}"


def attribute_ints(op: Operation) -> list[int]:
    """A small integer constant's values (e.g. a transpose's perm)."""
    return [int(v) for v in read_constant(op).reshape(-1)]


def _main_graph(program: Any) -> Operation:
    """The ``coreai.graph @main`` of ``program``; ``ValueError`` when it has none."""
    for op in program._module._mlir_module.body.operations:
        if op.name == "coreai.graph" and ir.StringAttr(op.attributes["sym_name"]).value == "main":
            return op
    raise ValueError("the program has no main graph (coreai.graph @main)")


def graph_inputs(program: Any) -> dict[str, tuple[np.dtype | None, tuple[int | None, ...] | None]]:
    """The main graph's inputs: (numpy dtype, dims: None for a dynamic one) by name."""
    graph = _main_graph(program)
    names = [ir.StringAttr(ir.DictAttr(a)["coreai.name"]).value for a in ir.ArrayAttr(graph.attributes["arg_attrs"])]
    arguments = graph.regions[0].blocks[0].arguments
    return {name: (element_dtype(value), tensor_dims(value)) for name, value in zip(names, arguments, strict=True)}


def set_outputs(program: Any, values: Sequence[Value], names: Sequence[str]) -> None:
    """Make ``values`` (of the main graph) the outputs of ``program``'s main graph, named ``names``, in place of
    its own."""
    graph = _main_graph(program)
    output = next(op for op in graph.regions[0].blocks[0].operations if op.name == "coreai.output")
    with output.context, output.location, ir.InsertionPoint(output):
        ops.OutputOp(list(values))
    output.erase()
    signature = ir.FunctionType(ir.TypeAttr(graph.attributes["function_type"]).value)
    with graph.context:
        results = [v.type for v in values]
        graph.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(list(signature.inputs), results))
        named = [ir.DictAttr.get({"coreai.name": ir.StringAttr.get(n)}) for n in names]
        graph.attributes["res_attrs"] = ir.ArrayAttr.get(named)
