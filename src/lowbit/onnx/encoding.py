"""The compressed-weight encoding (format version 1): write a compressed weight into a graph, read one back.

Writers take a kernel's arrays (canonical layout) and put them into the graph as a decode node over small constants.
Readers recognize decode nodes (``lowbit.*`` functions and ``DequantizeLinear`` on constants), describe them for
reports, and decode them with the numpy reference of :mod:`lowbit.kernels.decode`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.kernels.decode import dequantize_linear, lut_decode, mx_decode, sparse_decode, value_table
from lowbit.kernels.packing import unpack_bits
from lowbit.onnx import functions as fn

__all__ = [
    "Decoder",
    "add_initializer",
    "decoder_for",
    "insert_first",
    "stored_nbytes",
    "value_shape",
    "write_dequantize_linear",
    "write_lut",
    "write_mx",
    "write_sparse",
]


# ----------------------------------------------------------------------------------------------------- writers


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer named ``name`` (suffixed when taken)."""
    value = ir.Value(name=_unique_name(graph, name), const_value=ir.tensor(np.ascontiguousarray(array)))
    graph.register_initializer(value)
    return value


def _unique_name(graph: ir.Graph, name: str) -> str:
    taken = graph.initializers
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _dtype_of(value: ir.Value) -> ir.DataType:
    dtype = value.const_value.dtype if value.const_value is not None else value.dtype
    assert dtype is not None, f"{value.name} must carry its dtype"
    return dtype


def _emit(model: ir.Model, weight: ir.Value, node: ir.Node, replace: bool) -> ir.Value:
    """Insert ``node``; when ``replace``, its output takes the place (and the name) of ``weight``."""
    graph, out = model.graph, node.outputs[0]
    if out.type is None:  # a decode node yields the weight's type unless its writer said otherwise
        out.type, out.shape = weight.type, weight.shape
        if weight.const_value is not None:
            out.dtype, out.shape = weight.const_value.dtype, ir.Shape(weight.const_value.shape.numpy())
    if not replace:  # an inner link of a chain: its inputs are constants, so the front is always valid
        insert_first(graph, node)
        return out
    _insert_before_uses(graph, weight, node)
    name = weight.name
    weight.replace_all_uses_with(out, replace_graph_outputs=True)
    if weight.is_initializer() and name is not None:
        graph.initializers.pop(name)
    out.name = name
    return out


def insert_first(graph: ir.Graph, node: ir.Node) -> None:
    """Put ``node`` first in the graph (valid for nodes that read only constants)."""
    if len(graph):
        graph.insert_before(graph.node(0), node)
    else:
        graph.append(node)


def _insert_before_uses(graph: ir.Graph, weight: ir.Value, node: ir.Node) -> None:
    """Insert ``node`` before the first user of ``weight`` in graph order (after its own producers)."""
    users = {id(user) for user, _ in weight.uses()}
    for existing in graph:
        if id(existing) in users:
            graph.insert_before(existing, node)
            return
    graph.append(node)


def write_lut(
    model: ir.Model,
    weight: ir.Value,
    *,
    packed: np.ndarray,
    lut: np.ndarray | ir.Value,
    scale: np.ndarray | None,
    n_bits: int,
    canonical_shape: Sequence[int],
    perm: Sequence[int],
    replace: bool = True,
) -> ir.Value:
    """Encode ``weight`` as ``lowbit.LutToDense``; returns the node's output (named like the weight when replaced).

    ``lut`` is ``[G, K, cluster_dim]`` in the weight dtype, or a value computing it (a LUT-quantization chain).
    ``scale`` is the per-channel factor ``[C]`` (``None``: a shared one-element 1.0).
    """
    fn.use_function(model, fn.LUT_TO_DENSE)
    graph, base = model.graph, weight.name or "weight"
    lut_value = lut if isinstance(lut, ir.Value) else add_initializer(graph, f"{base}.lut", lut)
    dtype = _dtype_of(lut_value).numpy()
    if scale is None:
        scale_value = _shared(graph, f"lowbit.one.{dtype.name}", lambda: np.ones((1, 1), dtype))
    else:
        scale_value = add_initializer(graph, f"{base}.scale", np.asarray(scale, dtype).reshape(-1, 1))
    node = ir.node(
        fn.LUT_TO_DENSE,
        [
            add_initializer(graph, f"{base}.indices", packed),
            lut_value,
            scale_value,
        ],
        attributes={"n_bits": int(n_bits), "shape": [int(d) for d in canonical_shape], "perm": list(perm)},
        domain=fn.DOMAIN,
        name=f"{base}.LutToDense",
    )
    return _emit(model, weight, node, replace)


def write_sparse(
    model: ir.Model,
    weight: ir.Value,
    *,
    packed_mask: np.ndarray,
    values: np.ndarray | ir.Value,
    shape: Sequence[int],
    replace: bool = True,
) -> ir.Value:
    """Encode ``weight`` as ``lowbit.SparseToDense(mask, values)``; ``values`` may be a decode node's output."""
    fn.use_function(model, fn.SPARSE_TO_DENSE)
    graph, base = model.graph, weight.name or "weight"
    values_value = values if isinstance(values, ir.Value) else add_initializer(graph, f"{base}.values", values)
    node = ir.node(
        fn.SPARSE_TO_DENSE,
        [add_initializer(graph, f"{base}.mask", packed_mask), values_value],
        attributes={"shape": [int(d) for d in shape]},
        domain=fn.DOMAIN,
        name=f"{base}.SparseToDense",
    )
    node.outputs[0].dtype = _dtype_of(values_value)  # the values' type: a quantized chain scatters codes
    node.outputs[0].shape = ir.Shape([int(d) for d in shape])
    return _emit(model, weight, node, replace)


def write_mx(
    model: ir.Model,
    weight: ir.Value,
    *,
    packed_codes: np.ndarray,
    n_bits: int,
    exponents: np.ndarray,
    element: np.dtype,
    split_shape: Sequence[int],
    scale_shape: Sequence[int],
    dtype: ir.DataType,
    replace: bool = True,
) -> ir.Value:
    """Encode ``weight`` as ``lowbit.MxDequantize(codes, exponents, table)``: n-bit codes of the float element type
    ``element`` (FP4 E2M1: 4 bits; fp8: 8 bits), uint8 E8M0 exponents, and the element type's value table (one
    initializer per model, shared)."""
    fn.use_function(model, fn.MX_DEQUANTIZE)
    graph, base = model.graph, weight.name or "weight"
    shape = [int(d) for d in np.prod(np.reshape(split_shape, (-1, 2)), axis=1)]
    node = ir.node(
        fn.MX_DEQUANTIZE,
        [
            add_initializer(graph, f"{base}.codes", packed_codes),
            add_initializer(graph, f"{base}.exponents", exponents.astype(np.uint8).reshape(-1)),
            _shared(graph, f"lowbit.values.{np.dtype(element).name}", lambda: value_table(element)),
        ],
        attributes={
            "n_bits": int(n_bits),
            "shape": shape,
            "split_shape": [int(d) for d in split_shape],
            "scale_shape": [int(d) for d in scale_shape],
            "to": int(dtype),
        },
        domain=fn.DOMAIN,
        name=f"{base}.MxDequantize",
    )
    return _emit(model, weight, node, replace)


def _shared(graph: ir.Graph, name: str, make: Callable[[], np.ndarray]) -> ir.Value:
    """The initializer ``name``, created by ``make()`` the first time a weight needs it (one per model)."""
    existing = graph.initializers.get(name)
    return existing if existing is not None else add_initializer(graph, name, make())


def write_dequantize_linear(
    model: ir.Model,
    weight: ir.Value,
    *,
    q: np.ndarray | ir.Value,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    axis: int | None,
    block_size: int = 0,
) -> ir.Value:
    """Encode ``weight`` as the standard ``DequantizeLinear(q, scale[, zero_point])``: per tensor (``axis`` None,
    scalar scale), per axis (1-D scale) or blocked (``block_size`` along ``axis``, scale of ``q``'s rank). ``q``
    may be a decode node's output (sparse codes)."""
    graph, base = model.graph, weight.name or "weight"
    q_value = q if isinstance(q, ir.Value) else add_initializer(graph, f"{base}.quantized", q)
    inputs = [q_value, add_initializer(graph, f"{base}.scale", scale)]
    if zero_point is not None:
        inputs.append(add_initializer(graph, f"{base}.zero_point", zero_point))
    attributes = {} if axis is None else {"axis": int(axis)}
    if block_size:
        attributes["block_size"] = int(block_size)
    node = ir.node("DequantizeLinear", inputs, attributes, name=f"{base}.DequantizeLinear")
    return _emit(model, weight, node, replace=True)


def stored_nbytes(value: ir.Value) -> int:
    """Bytes of the distinct constants a (possibly compressed) value is stored in."""
    seen: dict[int, int] = {}

    def visit(v: ir.Value) -> None:
        producer = v.producer()
        if producer is None:
            if v.const_value is not None:
                seen[id(v)] = v.const_value.nbytes
            return
        for inp in producer.inputs:
            if inp is not None:
                visit(inp)

    visit(value)
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class Decoder:
    """How one kind of decode node is described and evaluated."""

    kind: str
    describe: Callable[[ir.Node], str]
    decode: Callable[[ir.Node, list[np.ndarray | None]], np.ndarray]
    shape: Callable[[ir.Node], tuple[int, ...] | None]


def _ints(node: ir.Node, name: str) -> list[int]:
    return list(node.attributes[name].as_ints())


def _int(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _finish(canonical: np.ndarray, node: ir.Node) -> np.ndarray:
    return np.ascontiguousarray(canonical.reshape(_ints(node, "shape")).transpose(_ints(node, "perm")))


def _decode_lut(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    packed, lut, scale = inputs
    assert packed is not None and lut is not None
    shape = _ints(node, "shape")
    cd = lut.shape[-1]
    count = int(np.prod(shape)) // cd
    codes = unpack_bits(packed, _int(node, "n_bits"), count).reshape(shape[0] // cd, -1)
    return _finish(lut_decode(codes, lut, scale), node)


def _decode_sparse(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    mask, values = inputs
    assert mask is not None and values is not None
    shape = _ints(node, "shape")
    return sparse_decode(unpack_bits(mask, 1, int(np.prod(shape))), values.reshape(-1)).reshape(shape)


def _decode_mx(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    codes, exponents, table = inputs
    assert codes is not None and exponents is not None and table is not None
    shape = _ints(node, "shape")
    unpacked = unpack_bits(codes, _int(node, "n_bits"), int(np.prod(shape))).reshape(_ints(node, "split_shape"))
    dtype = ir.DataType(_int(node, "to")).numpy()
    return mx_decode(unpacked, exponents.reshape(_ints(node, "scale_shape")), table, dtype).reshape(shape)


def _describe_mx(node: ir.Node) -> str:
    table = value_shape(node.inputs[2])
    element = "fp4 e2m1" if table == (16,) else "fp8"
    return f"{element}, e8m0 scales, {int(np.prod(_ints(node, 'shape')) // np.prod(_ints(node, 'scale_shape')))}/block"


def _decode_dq(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray:
    q, scale, zero_point = ([*list(inputs), None, None])[:3]
    assert q is not None and scale is not None
    return dequantize_linear(q, scale, zero_point, axis=_int(node, "axis", 1), block_size=_int(node, "block_size"))


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
    return f"palettized {_int(node, 'n_bits')}-bit, {groups} LUT(s)"


def _describe_sparse(node: ir.Node) -> str:
    values_shape = value_shape(node.inputs[1])
    numel = int(np.prod(_ints(node, "shape")))
    if not values_shape or not numel:
        return "sparse"
    return f"sparse {1 - int(np.prod(values_shape)) / numel:.0%}"


def _describe_dq(node: ir.Node) -> str:
    q = node.inputs[0]
    dtype = q.dtype.name.lower() if q is not None and q.dtype is not None else "?"
    block = _int(node, "block_size")
    return f"linear {dtype}" + (f", block {block}" if block else "")


_DECODERS = {
    (fn.DOMAIN, fn.LUT_TO_DENSE): Decoder("palettized", _describe_lut, _decode_lut, _permuted_shape),
    (fn.DOMAIN, fn.SPARSE_TO_DENSE): Decoder(
        "sparse", _describe_sparse, _decode_sparse, lambda node: tuple(_ints(node, "shape"))
    ),
    (fn.DOMAIN, fn.MX_DEQUANTIZE): Decoder("mx", _describe_mx, _decode_mx, lambda node: tuple(_ints(node, "shape"))),
    ("", "DequantizeLinear"): Decoder("linear", _describe_dq, _decode_dq, _dq_shape),
}


def decoder_for(node: ir.Node) -> Decoder | None:
    """The decoder of a decode node, or None when ``node`` is not one."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    return _DECODERS.get((domain, node.op_type))
