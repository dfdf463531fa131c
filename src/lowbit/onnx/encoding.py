"""The compressed-weight encoding (format version 1), writers: take a kernel's arrays (canonical layout) and put
them into the graph as a decode node over small constants. :mod:`lowbit.onnx.decoders` reads them back."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from lowbit.kernels.decode import value_table
from lowbit.kernels.layout import swapped
from lowbit.kernels.packing import pack_bits, unpack_bits
from lowbit.onnx import functions as fn
from lowbit.onnx.decoders import dtype_of, value_shape
from lowbit.onnx.graph_edit import (
    add_initializer,
    claim_name,
    home_graph,
    insert_before_uses,
    insert_early,
    node_name,
    release_name,
    unique_name,
)

__all__ = [
    "decode_dtype",
    "decode_input",
    "stored_nbytes",
    "write_dequantize_linear",
    "write_lut",
    "write_mx",
    "write_sparse",
]


def decode_dtype(dtype: ir.DataType) -> ir.DataType:
    """The type a weight of ``dtype`` is decoded in: float for bf16 (ONNX Runtime's CPU provider has no bf16 Mul,
    Pad or DequantizeLinear; a final Cast gives the weight its type back), else ``dtype`` itself."""
    return ir.DataType.FLOAT if dtype == ir.DataType.BFLOAT16 else dtype


def decode_input(model: ir.Model, graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """An initializer for a decode node's input; a bf16 one is read through a Cast to float (see decode_dtype)."""
    value = add_initializer(model, graph, name, array)
    if dtype_of(value) != ir.DataType.BFLOAT16:
        return value
    cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=node_name(model, f"{value.name}.Cast"))
    out = cast.outputs[0]
    out.name, out.dtype, out.shape = unique_name(model, f"{value.name}.float"), ir.DataType.FLOAT, ir.Shape(array.shape)
    insert_early(graph, cast)
    return out


def _emit(
    model: ir.Model,
    weight: ir.Value,
    node: ir.Node,
    replace: bool,
    trim: tuple[int, int] | None = None,
    reshape: Sequence[int] | None = None,
) -> ir.Value:
    """Insert ``node``; when ``replace``, its output takes the place (and the name) of ``weight``. ``trim``:
    (axis, length): ``node`` decodes a padded tensor (a ragged last group or block), sliced to ``length`` along
    ``axis``. ``reshape``: ``node`` decodes the weight in another shape, reshaped to this one."""
    graph, out = home_graph(model, weight), node.outputs[0]
    if out.dtype is None:  # a decode node yields the weight's (decode) type unless its writer said otherwise
        out.dtype = decode_dtype(dtype_of(weight))
    if trim is not None or reshape is not None:
        out.name = unique_name(model, f"{node.name}.{'padded' if trim else 'unshaped'}")
        insert_early(graph, node)
        node = _slice(model, graph, out, *trim) if trim else _reshape(model, graph, out, reshape or ())
        out = node.outputs[0]
    shape = value_shape(weight)
    if out.shape is None and shape is not None:
        out.shape = ir.Shape(shape)
    out.name = unique_name(model, f"{node.name}.out")
    if not replace:  # an inner link of a chain: it reads constants and earlier links only
        insert_early(graph, node)
        return out
    insert_before_uses(graph, weight, node)
    _warn_if_not_folded(weight, node)
    if dtype_of(weight) != out.dtype:  # decoded in float: Cast back to the weight's type
        cast = ir.node("Cast", [out], {"to": dtype_of(weight)}, name=node_name(model, f"{node.name}.Cast"))
        cast.outputs[0].dtype, cast.outputs[0].shape = dtype_of(weight), out.shape
        graph.insert_after(node, cast)
        out = cast.outputs[0]
    name = weight.name
    weight.replace_all_uses_with(out, replace_graph_outputs=True)
    if weight.is_initializer() and name is not None:
        graph.initializers.pop(name)
        release_name(model, name)
    release_name(model, out.name)
    out.name = name
    claim_name(model, name)
    return out


ORT_FOLDING_LIMIT_BYTES = 1 << 30  # ONNX Runtime does not constant-fold a node whose output is larger


def _warn_if_not_folded(weight: ir.Value, node: ir.Node) -> None:
    """Warn when ONNX Runtime will run a lowbit decode on every inference: its dense output exceeds the size up to
    which ORT folds constant subgraphs at session creation (a ``DequantizeLinear`` is never folded; ORT fuses or
    runs it by design)."""
    shape = value_shape(weight)
    if node.domain != fn.DOMAIN or shape is None:
        return
    dense = int(np.prod(shape)) * decode_dtype(dtype_of(weight)).itemsize
    if dense > ORT_FOLDING_LIMIT_BYTES:
        warnings.warn(
            f"weight {weight.name!r}: decoded it takes {dense / 2**30:.2f} GiB, above ONNX Runtime's 1 GiB "
            "constant-folding limit: ONNX Runtime will decode it on every run (quantize it instead to keep it "
            "compressed in a fused kernel)",
            UserWarning,
            stacklevel=5,
        )


def _slice(model: ir.Model, graph: ir.Graph, padded: ir.Value, axis: int, length: int) -> ir.Node:
    """``Slice(padded, [0], [length], [axis])``."""
    base = padded.name or "weight"
    bounds = [
        add_initializer(model, graph, f"{base}.{what}", np.array([v], np.int64))
        for what, v in (("starts", 0), ("ends", length), ("axes", axis))
    ]
    node = ir.node("Slice", [padded, *bounds], name=node_name(model, f"{base}.Slice"))
    node.outputs[0].dtype = dtype_of(padded)
    return node


def _reshape(model: ir.Model, graph: ir.Graph, data: ir.Value, shape: Sequence[int]) -> ir.Node:
    """``Reshape(data, shape)``."""
    base = data.name or "weight"
    target = add_initializer(model, graph, f"{base}.shape", np.array(shape, np.int64))
    node = ir.node("Reshape", [data, target], name=node_name(model, f"{base}.Reshape"))
    node.outputs[0].dtype = dtype_of(data)
    return node


def _byte_table_decode(lut, scale, trim, perm, n_bits: int, canonical_shape: Sequence[int]) -> str | None:
    """The lighter decode of scalar LUTs (no per-channel scale) when one can take this weight, else None
    (``LutToDense``): ``LutGatherBytes`` / ``LutGather`` / ``LutGatherTriplets`` (one LUT, the weight's own layout,
    8-bit codes / codes filling whole bytes / 3-byte words), ``LutGatherOwnLayout`` (LUTs grouped along the
    weight's first or last axis) or ``LutGatherGrouped`` (groups whose codes fill whole bytes, any layout; a ragged
    last group padded, then trimmed)."""
    lut_shape = value_shape(lut)
    if scale is not None or lut_shape is None or lut_shape[2] != 1:
        return None
    groups, numel = lut_shape[0], int(np.prod(canonical_shape))
    own_layout = groups == 1 and list(perm) == sorted(perm) and trim is None
    if own_layout and n_bits in fn.TRIPLET_BITS and numel * n_bits % 24 == 0:
        return fn.LUT_GATHER_TRIPLETS
    if n_bits not in fn.BYTE_ALIGNED_BITS:
        return None
    if own_layout and n_bits == 8:
        return fn.LUT_GATHER_BYTES
    if own_layout and numel * n_bits % 8 == 0:
        return fn.LUT_GATHER
    if _group_axis(groups, perm, n_bits, canonical_shape, trim) is not None:
        return fn.LUT_GATHER_OWN_LAYOUT
    return fn.LUT_GATHER_GROUPED if numel // groups * n_bits % 8 == 0 else None


def _weight_shape(canonical_shape: Sequence[int], perm: Sequence[int], trim: tuple[int, int] | None) -> list[int]:
    shape = [int(canonical_shape[p]) for p in perm]
    if trim is not None:
        shape[trim[0]] = trim[1]
    return shape


def _group_axis(groups, perm, n_bits: int, canonical_shape, trim) -> int | None:
    """0 or -1 when the LUT groups run along the weight's first or last axis and its codes, packed along the last
    axis, never share a byte across rows or groups (``LutGatherOwnLayout``); else None."""
    axis, shape = list(perm).index(0), _weight_shape(canonical_shape, perm, trim)
    per_byte, group_size = 8 // n_bits, canonical_shape[0] // groups
    if shape[-1] % per_byte or axis not in (0, len(shape) - 1):
        return None
    if axis == len(shape) - 1:
        return -1 if group_size % per_byte == 0 else None
    return 0


def _own_layout_indices(packed, n_bits: int, canonical_shape, perm, trim) -> np.ndarray:
    """The kernel's codes (channel-first, maybe padded) laid out as the weight, packed along its last axis."""
    shape = _weight_shape(canonical_shape, perm, trim)
    if list(perm) == sorted(perm) and shape == list(canonical_shape) and n_bits in (1, 2, 4, 8):
        # the kernel's own layout, rows of whole bytes (the caller checked): packed along the last axis already
        return packed.reshape(*shape[:-1], shape[-1] * n_bits // 8)
    codes = unpack_bits(packed, n_bits, int(np.prod(canonical_shape))).reshape(canonical_shape)
    codes = swapped(codes) if list(perm) == [1, 0] else codes.transpose(perm)
    codes = codes[tuple(slice(0, d) for d in shape)]
    return pack_bits(codes, n_bits).reshape(*shape[:-1], shape[-1] * n_bits // 8)


def _gather_decode(model, weight, gather: str, packed, lut_value, n_bits: int, canonical_shape, perm, trim):
    """The node of a byte-table decode (see :func:`_byte_table_decode`), and the trim its output still needs."""
    graph, base = home_graph(model, weight), weight.name or "weight"
    fn.use_function(model, gather)
    attributes: dict = {"n_bits": int(n_bits), "shape": [int(d) for d in canonical_shape]}
    stored, extra = packed, []
    out_shape = [int(canonical_shape[p]) for p in perm]
    if gather == fn.LUT_GATHER_GROUPED:
        attributes["perm"] = list(perm)
    elif gather == fn.LUT_GATHER_TRIPLETS:
        stored, extra = packed.reshape(-1, 3), [_triplet_codes(model, n_bits)]
    elif gather == fn.LUT_GATHER_BYTES:
        stored, attributes = packed.reshape(canonical_shape), {}
    elif gather == fn.LUT_GATHER_OWN_LAYOUT:
        groups = value_shape(lut_value)[0]  # type: ignore[index]
        axis = _group_axis(groups, perm, n_bits, canonical_shape, trim)
        stored = _own_layout_indices(packed, n_bits, canonical_shape, perm, trim)
        out_shape, trim = _weight_shape(canonical_shape, perm, trim), None
        attributes |= {"shape": out_shape, "group_axis": axis, "group_size": int(canonical_shape[0]) // groups}
    node = ir.node(
        gather,
        [add_initializer(model, graph, f"{base}.indices", stored), lut_value, *extra],
        attributes=attributes,
        domain=fn.DOMAIN,
        name=node_name(model, f"{base}.{gather}"),
    )
    node.outputs[0].shape = ir.Shape(out_shape)
    node.outputs[0].dtype = dtype_of(lut_value)
    return node, trim


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
    trim: tuple[int, int] | None = None,
    reshape: Sequence[int] | None = None,
) -> ir.Value:
    """Encode ``weight`` as ``lowbit.LutToDense`` (or a lighter byte-table decode of the same indices and LUT);
    returns the node's output (named like the weight when replaced).

    ``lut`` is ``[G, K, cluster_dim]`` in the weight dtype, or a value computing it (a LUT-quantization chain).
    ``scale`` is the per-channel factor ``[C]`` (``None``: a shared one-element 1.0). ``trim``: (axis, length) when
    ``canonical_shape`` is padded (a ragged last LUT group): the decode is sliced to the weight's shape.
    ``reshape``: the weight's shape when the decode has another (same elements, same order).
    """
    graph, base = home_graph(model, weight), weight.name or "weight"
    lut_value = lut if isinstance(lut, ir.Value) else decode_input(model, graph, f"{base}.lut", lut)
    gather = _byte_table_decode(lut_value, scale, trim, perm, n_bits, canonical_shape)
    if gather is not None:
        node, trim = _gather_decode(model, weight, gather, packed, lut_value, n_bits, canonical_shape, perm, trim)
        return _emit(model, weight, node, replace, trim, reshape)
    fn.use_function(model, fn.LUT_TO_DENSE)
    if scale is None:
        dtype = dtype_of(lut_value).numpy()
        scale_value = _shared(model, f"lowbit.one.{dtype.name}", lambda: np.ones((1, 1), dtype))
    else:
        lut_dtype = lut.dtype if isinstance(lut, np.ndarray) else dtype_of(lut_value).numpy()
        scale_value = decode_input(model, graph, f"{base}.scale", np.asarray(scale, lut_dtype).reshape(-1, 1))
    node = ir.node(
        fn.LUT_TO_DENSE,
        [add_initializer(model, graph, f"{base}.indices", packed), lut_value, scale_value],
        attributes={"n_bits": int(n_bits), "shape": [int(d) for d in canonical_shape], "perm": list(perm)},
        domain=fn.DOMAIN,
        name=node_name(model, f"{base}.LutToDense"),
    )
    node.outputs[0].shape = ir.Shape([int(canonical_shape[p]) for p in perm])
    return _emit(model, weight, node, replace, trim, reshape)


def write_sparse(
    model: ir.Model,
    weight: ir.Value,
    *,
    packed_mask: np.ndarray,
    values: np.ndarray | ir.Value,
    shape: Sequence[int],
    replace: bool = True,
) -> ir.Value:
    """Encode ``weight`` as ``lowbit.SparseToDense(mask, values)`` (``lowbit.SparseGather`` when the mask's bits
    fill its bytes: the same inputs, lighter to fold); ``values`` may be a decode node's output."""
    op = fn.SPARSE_GATHER if int(np.prod(shape)) % 8 == 0 else fn.SPARSE_TO_DENSE
    fn.use_function(model, op)
    graph, base = home_graph(model, weight), weight.name or "weight"
    if not isinstance(values, ir.Value):
        values = decode_input(model, graph, f"{base}.values", values)
    values_value = values
    node = ir.node(
        op,
        [add_initializer(model, graph, f"{base}.mask", packed_mask), values_value],
        attributes={"shape": [int(d) for d in shape]},
        domain=fn.DOMAIN,
        name=node_name(model, f"{base}.{op}"),
    )
    node.outputs[0].dtype = dtype_of(values_value)  # the values' type: a quantized chain scatters codes
    node.outputs[0].shape = ir.Shape([int(d) for d in shape])
    return _emit(model, weight, node, replace)


def write_outliers(model: ir.Model, weight: ir.Value, decoded: ir.Value, positions: np.ndarray, values: np.ndarray):
    """``lowbit.WithOutliers(decoded, positions, values)`` in place of ``weight``: a decode with some elements
    replaced by their exact values."""
    fn.use_function(model, fn.WITH_OUTLIERS)
    graph, base = home_graph(model, weight), weight.name or "weight"
    node = ir.node(
        fn.WITH_OUTLIERS,
        [
            decoded,
            add_initializer(model, graph, f"{base}.outlier_positions", positions),
            decode_input(model, graph, f"{base}.outlier_values", values),
        ],
        domain=fn.DOMAIN,
        name=node_name(model, f"{base}.{fn.WITH_OUTLIERS}"),
    )
    node.outputs[0].dtype = dtype_of(decoded)
    return _emit(model, weight, node, replace=True)


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
    trim: tuple[int, int] | None = None,
) -> ir.Value:
    """Encode ``weight`` as ``lowbit.MxDequantize(codes, exponents, table)``: n-bit codes of the float element type
    ``element`` (FP4 E2M1: 4 bits; fp8: 8 bits), uint8 E8M0 exponents, and the element type's value table (one
    initializer per model, shared). ``trim``: (axis, length) when the codes are padded (a ragged last block)."""
    fn.use_function(model, fn.MX_DEQUANTIZE)
    graph, base = home_graph(model, weight), weight.name or "weight"
    shape = [int(d) for d in np.prod(np.reshape(split_shape, (-1, 2)), axis=1)]
    node = ir.node(
        fn.MX_DEQUANTIZE,
        [
            add_initializer(model, graph, f"{base}.codes", packed_codes),
            add_initializer(model, graph, f"{base}.exponents", exponents.astype(np.uint8).reshape(-1)),
            _shared(model, f"lowbit.values.{np.dtype(element).name}", lambda: value_table(element)),
        ],
        attributes={
            "n_bits": int(n_bits),
            "shape": shape,
            "split_shape": [int(d) for d in split_shape],
            "scale_shape": [int(d) for d in scale_shape],
            "to": int(decode_dtype(dtype)),
        },
        domain=fn.DOMAIN,
        name=node_name(model, f"{base}.MxDequantize"),
    )
    node.outputs[0].dtype, node.outputs[0].shape = decode_dtype(dtype), ir.Shape(shape)
    return _emit(model, weight, node, replace, trim)


def _triplet_codes(model: ir.Model, n_bits: int) -> ir.Value:
    """The main graph's ``lowbit.TripletCodes`` output for ``n_bits`` (one node per model and bit width, shared by
    every ``LutGatherTriplets``: ONNX Runtime folds it once)."""
    for node in model.graph:
        if (
            node.domain == fn.DOMAIN
            and node.op_type == fn.TRIPLET_CODES
            and node.attributes["n_bits"].as_int() == n_bits
        ):
            return node.outputs[0]
    fn.use_function(model, fn.TRIPLET_CODES)
    name = f"lowbit.triplet_codes.{n_bits}bit"
    node = ir.node(fn.TRIPLET_CODES, [], {"n_bits": n_bits}, domain=fn.DOMAIN, name=node_name(model, name))
    out = node.outputs[0]
    out.name, out.dtype, out.shape = unique_name(model, name), ir.DataType.INT32, ir.Shape([131072, 12 // n_bits])
    insert_early(model.graph, node)
    return out


def _shared(model: ir.Model, name: str, make: Callable[[], np.ndarray]) -> ir.Value:
    """The main graph's initializer ``name``, created by ``make()`` the first time a weight needs it (one per
    model; subgraphs read it from the outer scope)."""
    existing = model.graph.initializers.get(name)
    return existing if existing is not None else add_initializer(model, model.graph, name, make())


def write_dequantize_linear(
    model: ir.Model,
    weight: ir.Value,
    *,
    q: np.ndarray | ir.Value,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    axis: int | None,
    block_size: int = 0,
    trim: tuple[int, int] | None = None,
) -> ir.Value:
    """Encode ``weight`` as the standard ``DequantizeLinear(q, scale[, zero_point])``: per tensor (``axis`` None,
    scalar scale), per axis (1-D scale) or blocked (``block_size`` along ``axis``, scale of ``q``'s rank). ``q``
    may be a decode node's output (sparse codes). ``trim``: (axis, length) when ``q`` is padded (a ragged last
    block)."""
    graph, base = home_graph(model, weight), weight.name or "weight"
    q_value = q if isinstance(q, ir.Value) else add_initializer(model, graph, f"{base}.quantized", q)
    inputs = [q_value, decode_input(model, graph, f"{base}.scale", scale)]
    if zero_point is not None:
        inputs.append(add_initializer(model, graph, f"{base}.zero_point", zero_point))
    attributes = {} if axis is None else {"axis": int(axis)}
    if block_size:
        attributes["block_size"] = int(block_size)
    node = ir.node("DequantizeLinear", inputs, attributes, name=node_name(model, f"{base}.DequantizeLinear"))
    padded_shape = value_shape(q_value)
    if trim is not None and padded_shape is not None:
        node.outputs[0].shape = ir.Shape(padded_shape)
    return _emit(model, weight, node, replace=True, trim=trim)


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
