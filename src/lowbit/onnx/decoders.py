"""Readers of the compressed-weight encoding: recognize decode nodes (``lowbit.*`` functions, ``DequantizeLinear``
on constants, and the ``Cast`` / ``Slice`` that wrap them), describe them for reports, and decode them with the numpy
reference of :mod:`lowbit.kernels.decode`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.kernels.decode import dequantize_linear, lut_decode, mx_decode, sparse_decode
from lowbit.kernels.packing import unpack_bits
from lowbit.onnx import functions as fn
from lowbit.outliers import Outliers

__all__ = ["Decoder", "decoder_for", "dtype_of", "int_attribute", "value_shape"]


def dtype_of(value: ir.Value) -> ir.DataType:
    """The element type of a constant or of a typed value."""
    dtype = value.const_value.dtype if value.const_value is not None else value.dtype
    assert dtype is not None, f"{value.name} must carry its dtype"
    return dtype


@dataclass(frozen=True)
class Decoder:
    """How one kind of decode node is described and evaluated."""

    kind: str
    describe: Callable[[ir.Node], str]
    decode: Callable[[ir.Node, list[np.ndarray | None]], np.ndarray]
    shape: Callable[[ir.Node], tuple[int, ...] | None]


def _ints(node: ir.Node, name: str) -> list[int]:
    return list(node.attributes[name].as_ints())


def int_attribute(node: ir.Node, name: str, default: int = 0) -> int:
    """The int attribute ``name`` of ``node``, or ``default`` when it is absent."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _finish(canonical: np.ndarray, node: ir.Node) -> np.ndarray:
    return np.ascontiguousarray(canonical.reshape(_ints(node, "shape")).transpose(_ints(node, "perm")))


def _decode_lut(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    packed, lut, scale = [*inputs, None][:3]  # LutGatherGrouped has no scale
    assert packed is not None and lut is not None
    shape = _ints(node, "shape")
    cd = lut.shape[-1]
    count = int(np.prod(shape)) // cd
    codes = unpack_bits(packed, int_attribute(node, "n_bits"), count).reshape(shape[0] // cd, -1)
    return _finish(lut_decode(codes, lut, scale), node)


def _decode_lut_gather(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    packed, lut = inputs[:2]  # LutGatherTriplets' codes table is implied by n_bits
    assert packed is not None and lut is not None
    shape = _ints(node, "shape")
    codes = unpack_bits(packed.reshape(-1), int_attribute(node, "n_bits"), int(np.prod(shape))).reshape(1, -1)
    return lut_decode(codes, lut, None).reshape(shape)


def _decode_lut_gather_bytes(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    indices, lut = inputs
    assert indices is not None and lut is not None
    return np.ascontiguousarray(lut.reshape(-1)[indices])


def _decode_lut_own_layout(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    packed, lut = inputs
    assert packed is not None and lut is not None
    shape = _ints(node, "shape")
    codes = unpack_bits(packed.reshape(-1), int_attribute(node, "n_bits"), int(np.prod(shape))).reshape(shape)
    axis = int_attribute(node, "group_axis") % len(shape)
    along = [1] * len(shape)
    along[axis] = -1
    groups = (np.arange(shape[axis]) // int_attribute(node, "group_size")).reshape(along)
    return np.ascontiguousarray(lut[:, :, 0][groups, codes])


def _decode_sparse(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    mask, values = inputs
    assert mask is not None and values is not None
    shape = _ints(node, "shape")
    return sparse_decode(unpack_bits(mask, 1, int(np.prod(shape))), values.reshape(-1)).reshape(shape)


def _decode_mx(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    codes, exponents, table = inputs
    assert codes is not None and exponents is not None and table is not None
    shape = _ints(node, "shape")
    unpacked = unpack_bits(codes, int_attribute(node, "n_bits"), int(np.prod(shape))).reshape(
        _ints(node, "split_shape")
    )
    dtype = ir.DataType(int_attribute(node, "to")).numpy()
    return mx_decode(unpacked, exponents.reshape(_ints(node, "scale_shape")), table, dtype).reshape(shape)


def _describe_mx(node: ir.Node) -> str:
    table = value_shape(node.inputs[2])
    element = "fp4 e2m1" if table == (16,) else "fp8"
    return f"{element}, e8m0 scales, {int(np.prod(_ints(node, 'shape')) // np.prod(_ints(node, 'scale_shape')))}/block"


def _decode_lut_dequantize(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    q, scale, zero_point = inputs
    assert q is not None and scale is not None and zero_point is not None
    lut = dequantize_linear(q, scale.astype(np.float32), zero_point, axis=0)
    return lut.astype(ir.DataType(int_attribute(node, "to")).numpy())


def _describe_lut_dequantize(node: ir.Node) -> str:
    q = node.inputs[0]
    return f"{dtype_of(q).name.lower()} LUT" if q is not None else "quantized LUT"


def _decode_dq(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    q, scale, zero_point = ([*list(inputs), None, None])[:3]
    assert q is not None and scale is not None
    return dequantize_linear(
        q, scale, zero_point, axis=int_attribute(node, "axis", 1), block_size=int_attribute(node, "block_size")
    )


def _permuted_shape(node: ir.Node) -> tuple[int, ...]:
    shape = _ints(node, "shape")
    return tuple(shape[p] for p in _ints(node, "perm"))


def _dq_shape(node: ir.Node) -> tuple[int, ...] | None:
    return value_shape(node.inputs[0])


def value_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """Static shape of a constant, of a value with a known shape, or of a decode node's output."""
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(value.const_value.shape.numpy())
    if value.shape is not None and value.shape.is_static():
        return tuple(value.shape.numpy())
    producer = value.producer()
    decoder = decoder_for(producer) if producer is not None else None
    return decoder.shape(producer) if decoder is not None and producer is not None else None


def _describe_lut(node: ir.Node) -> str:
    lut_shape = value_shape(node.inputs[1])
    groups = lut_shape[0] if lut_shape else "?"
    return f"palettized {int_attribute(node, 'n_bits', 8)}-bit, {groups} LUT(s)"  # LutGatherBytes: 8-bit, no attribute


def _describe_sparse(node: ir.Node) -> str:
    values_shape = value_shape(node.inputs[1])
    numel = int(np.prod(_ints(node, "shape")))
    if not values_shape or not numel:
        return "sparse"
    return f"sparse {1 - int(np.prod(values_shape)) / numel:.0%}"


def _describe_dq(node: ir.Node) -> str:
    q = node.inputs[0]
    dtype = dtype_of(q).name.lower() if q is not None else "?"
    block = int_attribute(node, "block_size")
    return f"linear {dtype}" + (f", block {block}" if block else "")


def triplet_codes(n_bits: int) -> np.ndarray:
    """``lowbit.TripletCodes``: the codes of each byte pair of a little-endian 24-bit word (``b0 + 256 * b1``: the
    word's first ``12 / n_bits`` codes; rows from 65536, ``b1 + 256 * b2``: the last ones, from the pair's bit 4)."""
    pairs = np.arange(65536)[:, None]
    divisors = 1 << (n_bits * np.arange(12 // n_bits))
    low, high = (pairs // divisors) % (1 << n_bits), (pairs // (16 * divisors)) % (1 << n_bits)
    return np.concatenate([low, high]).astype(np.int32)


_TRIPLET_CODES = Decoder(
    "codes",
    lambda node: "",
    lambda node, inputs: triplet_codes(int_attribute(node, "n_bits")),
    lambda node: (131072, 12 // int_attribute(node, "n_bits")),
)
_SPARSE = Decoder("sparse", _describe_sparse, _decode_sparse, lambda node: tuple(_ints(node, "shape")))
_LUT_GATHER = Decoder("palettized", _describe_lut, _decode_lut_gather, lambda n: tuple(_ints(n, "shape")))


def _decode_outliers(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    decoded, positions, values = inputs
    assert decoded is not None and positions is not None and values is not None
    return Outliers(positions, values).applied(decoded)


def _describe_outliers(node: ir.Node) -> str:
    positions = node.inputs[1]
    count = positions.shape[0] if positions is not None and positions.shape is not None else "?"
    return f"{count} outliers kept exact"


_DECODERS = {
    (fn.DOMAIN, fn.LUT_TO_DENSE): Decoder("palettized", _describe_lut, _decode_lut, _permuted_shape),
    (fn.DOMAIN, fn.LUT_GATHER): _LUT_GATHER,
    (fn.DOMAIN, fn.LUT_GATHER_TRIPLETS): _LUT_GATHER,
    (fn.DOMAIN, fn.LUT_GATHER_BYTES): Decoder(
        "palettized", _describe_lut, _decode_lut_gather_bytes, lambda n: value_shape(n.inputs[0])
    ),
    (fn.DOMAIN, fn.LUT_GATHER_OWN_LAYOUT): Decoder(
        "palettized", _describe_lut, _decode_lut_own_layout, lambda n: tuple(_ints(n, "shape"))
    ),
    (fn.DOMAIN, fn.TRIPLET_CODES): _TRIPLET_CODES,
    (fn.DOMAIN, fn.LUT_GATHER_GROUPED): Decoder("palettized", _describe_lut, _decode_lut, _permuted_shape),
    (fn.DOMAIN, fn.LUT_DEQUANTIZE): Decoder(
        "lut", _describe_lut_dequantize, _decode_lut_dequantize, lambda node: value_shape(node.inputs[0])
    ),
    (fn.DOMAIN, fn.SPARSE_TO_DENSE): _SPARSE,
    (fn.DOMAIN, fn.SPARSE_GATHER): _SPARSE,
    (fn.DOMAIN, fn.MX_DEQUANTIZE): Decoder("mx", _describe_mx, _decode_mx, lambda node: tuple(_ints(node, "shape"))),
    ("", "DequantizeLinear"): Decoder("linear", _describe_dq, _decode_dq, _dq_shape),
    (fn.DOMAIN, fn.WITH_OUTLIERS): Decoder(
        "outliers", _describe_outliers, _decode_outliers, lambda node: value_shape(node.inputs[0])
    ),
}


def _decode_cast(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    assert inputs[0] is not None
    return inputs[0].astype(ir.DataType(int_attribute(node, "to")).numpy())


_CAST = Decoder("cast", lambda node: "", _decode_cast, lambda node: value_shape(node.inputs[0]))


def _is_decode_cast(node: ir.Node) -> bool:
    """A Cast of a bf16 decode (see decode_dtype): of a decode node's float output back to bf16, or of a bf16
    constant that only decode nodes read to float."""
    source = node.inputs[0] if node.inputs else None
    if source is None:
        return False
    producer = source.producer()
    if producer is not None:  # float back to bf16 after a decode proper (a user's own Cast of a weight is not)
        back_to_bf16 = int_attribute(node, "to") == ir.DataType.BFLOAT16 and source.dtype == ir.DataType.FLOAT
        return back_to_bf16 and _is_decoder(producer)
    users = [user for user, _ in node.outputs[0].uses()]
    from_bf16 = source.const_value is not None and source.const_value.dtype == ir.DataType.BFLOAT16
    return from_bf16 and bool(users) and all(_is_decoder(user) for user in users)


def _constant_ints(value: ir.Value | None) -> list[int]:
    assert value is not None and value.const_value is not None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def _decode_slice(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    data, starts, ends, axes = inputs[:4]
    assert data is not None and starts is not None and ends is not None and axes is not None
    index = [slice(None)] * data.ndim
    for start, end, axis in zip(starts.tolist(), ends.tolist(), axes.tolist(), strict=True):
        index[axis] = slice(start, end)
    return np.ascontiguousarray(data[tuple(index)])


def _slice_shape(node: ir.Node) -> tuple[int, ...] | None:
    shape = value_shape(node.inputs[0])
    if shape is None:
        return None
    dims = list(shape)
    for start, end, axis in zip(*(_constant_ints(node.inputs[i]) for i in (1, 2, 3)), strict=True):
        dims[axis] = len(range(*slice(start, end).indices(dims[axis])))
    return tuple(dims)


_SLICE = Decoder("slice", lambda node: "", _decode_slice, _slice_shape)
_RESHAPE = Decoder(
    "reshape",
    lambda node: "",
    lambda node, inputs: np.ascontiguousarray(inputs[0]).reshape(_constant_ints(node.inputs[1])),
    lambda node: tuple(_constant_ints(node.inputs[1])),
)


def _wraps_decoder(node: ir.Node) -> bool:
    """Whether ``node`` reads, besides constants, the output of a decode node that nothing else reads."""
    if any(v is None or v.const_value is None for v in node.inputs[1:]):
        return False
    source = node.inputs[0]
    producer = source.producer() if source is not None else None
    return source is not None and producer is not None and _is_decoder(producer) and len(source.uses()) == 1


def _is_decode_slice(node: ir.Node) -> bool:
    """A Slice that trims a decode node's padded output (a ragged last group or block) to the weight's shape: from
    0, the decode's only reader (a model's own Slices of a weight, e.g. gate blocks, are not)."""
    return len(node.inputs) == 4 and _wraps_decoder(node) and not any(_constant_ints(node.inputs[1]))


def _is_decode_reshape(node: ir.Node) -> bool:
    """A Reshape of a lowbit decode node's output to the weight's shape (a recurrent layer's directions decoded as
    one); a model's own Reshape after a DequantizeLinear is not one."""
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    return len(node.inputs) == 2 and _wraps_decoder(node) and producer is not None and producer.domain == fn.DOMAIN


def _is_decoder(node: ir.Node) -> bool:
    """A decode node proper (not one of the Cast / Slice / Reshape that wrap one)."""
    return node.op_type not in _WRAPPERS and decoder_for(node) is not None


def decoder_for(node: ir.Node) -> Decoder | None:
    """The decoder of a decode node, or None when ``node`` is not one."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    if domain == "" and node.op_type in _WRAPPERS:
        wrapper = {"Cast": _CAST, "Slice": _SLICE, "Reshape": _RESHAPE}[node.op_type]
        return wrapper if _WRAPPERS[node.op_type](node) else None
    return _DECODERS.get((domain, node.op_type))


# the plain ops lowbit puts around a decode node, and how to tell them from a model's own
_WRAPPERS = {
    "Cast": _is_decode_cast,
    "Slice": _is_decode_slice,
    "Reshape": _is_decode_reshape,
}
