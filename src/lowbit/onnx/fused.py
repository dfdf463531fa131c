"""``target="onnxruntime"``: weights that stay compressed in ONNX Runtime's memory, in its fused kernels.

The portable encoding decodes every weight to a dense constant, which ONNX Runtime folds at session creation: small
file, dense RAM. Where ONNX Runtime has a kernel that computes straight from the codes, this module writes the
consumer as that kernel instead (``com.microsoft`` domain, so the file runs in ONNX Runtime only):

- ``MatMulNBits`` (2-8 bits, blocks of a power of two >= 16 along K): a ``MatMul`` by a linearly quantized weight,
  or by a palettized weight whose LUT is int8 / uint8 (an 8-bit weight with one scale per LUT: the indices are
  turned into the LUT's 8-bit codes when ONNX Runtime folds the constants, 1 byte per weight in RAM).
  ``accuracy_level`` 0: the activations stay in float.
- ``GatherBlockQuantized`` (int4 / uint4, or 8-bit): an embedding ``Gather`` by a linearly quantized table.

Each returns None when the weight does not fit the kernel (another consumer, a block that is not a power of two,
bf16, ...), and the caller writes the portable encoding. The readers turn the fused nodes back into
``MatMul`` / ``Gather`` of the dense weight (``decompress_weights``) and describe them (``lowbit inspect``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowbit.kernels.decode import dequantize_linear
from lowbit.kernels.packing import pack_bits, unpack_bits
from lowbit.onnx import encoding, graph_edit
from lowbit.onnx import functions as fn
from lowbit.onnx.decoders import dtype_of, int_attribute, value_shape
from lowbit.weights import PalettizedWeight

__all__ = [
    "MS_DOMAIN",
    "TARGETS",
    "Grid",
    "activation_slot",
    "codes_input",
    "describe_fused",
    "fused_by_codes",
    "fused_consumer",
    "is_fused",
    "palettized_grid",
    "quantized_grid",
    "replace_node",
    "unfuse",
    "unfused_weight",
    "weight_axes",
    "why_not_fused",
    "write_fused",
]

MS_DOMAIN = "com.microsoft"
TARGETS = ("portable", "onnxruntime", "onnxruntime-int8")
# MatMulNBits' accuracy_level per target: 0 computes in float (the decoded weights exactly); 4 quantizes the
# activations to int8 per block, faster and less exact
_ACCURACY_LEVEL = {"onnxruntime": 0, "onnxruntime-int8": 4}
MATMUL_NBITS = "MatMulNBits"
GATHER_BLOCK_QUANTIZED = "GatherBlockQuantized"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def fused_consumer(weight: ir.Value, target: str) -> str | None:
    """``"MatMul"`` or ``"Gather"`` when ``target`` is an ONNX Runtime one and every use of the 2-D float / fp16
    constant ``weight`` is a ``MatMul`` right operand or an axis-0 ``Gather`` table (what the fused kernels
    replace), else None (:func:`why_not_fused` says why)."""
    if target not in _ACCURACY_LEVEL or why_not_fused(weight) is not None:
        return None
    return "MatMul" if all(node.op_type == "MatMul" for node, _ in weight.uses()) else "Gather"


def why_not_fused(weight: ir.Value) -> str | None:
    """Why ONNX Runtime's fused kernels cannot hold the constant ``weight`` (None when they can, by its shape,
    type and readers; the encoding's own layout is checked by its writer)."""
    shape = value_shape(weight)
    if shape is None or len(shape) != 2:
        return f"a {len(shape or ())}-D weight (the kernels take 2-D MatMul / Gather weights)"
    if dtype_of(weight) not in _FLOATS:
        return f"a {dtype_of(weight).name.lower()} weight (the kernels take float32 / float16)"
    if weight.is_graph_output():
        return "a graph output"
    ops = set()
    for node, index in weight.uses():
        axis = node.attributes.get("axis")
        if node.domain in ("", "ai.onnx") and node.op_type == "MatMul" and index == 1:
            ops.add("MatMul")
        elif (
            node.domain in ("", "ai.onnx")
            and node.op_type == "Gather"
            and index == 0
            and (axis is None or axis.as_int() == 0)
        ):
            ops.add("Gather")
        else:
            return f"read by {node.op_type} (input {index}), not as a MatMul right operand or an axis-0 Gather table"
    return "read by both MatMul and Gather" if len(ops) > 1 else None


def fused_block(inner: int, block: int) -> int | None:
    """The kernels' block along the input axis: ``block`` (0: one scale for the whole axis) when it is a power of
    two >= 16 dividing ``inner``; for a whole-axis scale the largest such power of two up to 256 (the scale is
    repeated); None when there is none."""
    if block and block != inner:
        return block if block >= 16 and block & (block - 1) == 0 and inner % block == 0 else None
    candidates = [b for b in (256, 128, 64, 32, 16) if inner % b == 0]
    return candidates[0] if candidates else None


@dataclass(frozen=True)
class Grid:
    """A 2-D weight as unsigned ``bits``-bit codes with one scale (and zero point) per output channel and block of
    ``block`` along the input axis: ``(codes - zero_point) * scale``.

    ``codes``: ``[out, in]`` uint8 (or a value computing it, e.g. a palettized weight's LUT codes);
    ``scale``: ``[out, in / block]`` in the weight's dtype; ``zero_point``: uint8 like ``scale``, None for the
    kernels' default ``2**(bits - 1)``.
    """

    codes: np.ndarray | ir.Value
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    block: int

    @property
    def nbytes(self) -> int:
        """Bytes of the stored form (a computed ``codes`` counts as 0: its own constants are the caller's)."""
        codes = self.codes.size * self.bits // 8 if isinstance(self.codes, np.ndarray) else 0
        return codes + self.scale.nbytes + (0 if self.zero_point is None else self.zero_point.size * self.bits // 8)


_CODE_TYPES = {np.dtype(ml_dtypes.int4): (4, 8), np.dtype(ml_dtypes.uint4): (4, 0), np.dtype(np.int8): (8, 128)}
_CODE_TYPES[np.dtype(np.uint8)] = (8, 0)  # dtype -> (bits, offset to unsigned codes)


def quantized_grid(
    q: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    axis: int | None,
    block: int,
    output_axis: int,
) -> Grid | None:
    """The :class:`Grid` of a 2-D weight quantized to ``q`` (its own layout) with DequantizeLinear's scale layout
    (``axis`` None: one scale; ``axis == output_axis``: one per channel; else blocks of ``block`` along the
    input axis); None for element types or blocks the kernels do not take."""
    if q.ndim != 2 or q.dtype not in _CODE_TYPES:
        return None
    bits, offset = _CODE_TYPES[q.dtype]
    rows = q if output_axis == 0 else q.T
    out, inner = rows.shape
    per_block = axis is not None and axis != output_axis
    fused = fused_block(inner, block if per_block else 0)
    if fused is None:
        return None

    def laid_out(grid: np.ndarray) -> np.ndarray:
        if per_block:
            return np.ascontiguousarray(grid if output_axis == 0 else grid.T)
        return np.ascontiguousarray(np.broadcast_to(grid.reshape(-1, 1), (out, inner // fused)))

    if zero_point is None:
        zp = None if offset else np.zeros((out, inner // fused), np.uint8)
    else:
        zp = (laid_out(zero_point).astype(np.int16) + offset).astype(np.uint8)
    codes = np.ascontiguousarray((rows.astype(np.int16) + offset).astype(np.uint8))
    return Grid(codes, laid_out(np.asarray(scale)), zp, bits, fused)


def write_fused(model: ir.Model, weight: ir.Value, consumer: str, grid: Grid, target: str) -> int:
    """Replace every consumer of ``weight`` (all ``consumer`` nodes) by the fused kernel over ``grid`` for
    ``target``; the codes take the weight's name. Returns the bytes the weight occupies now."""
    graph, base = graph_edit.home_graph(model, weight), weight.name or "weight"
    model.graph.opset_imports.setdefault(MS_DOMAIN, 1)
    uses = list(weight.uses())
    if weight.is_initializer() and weight.name is not None:
        graph.initializers.pop(weight.name)  # every use is replaced below: the codes take its name
        graph_edit.release_name(model, weight.name)
    if consumer == "MatMul":
        op, inputs, attributes = MATMUL_NBITS, *_matmul_nbits_inputs(model, graph, base, grid)
        attributes["accuracy_level"] = _ACCURACY_LEVEL[target]
    else:
        op, inputs, attributes = GATHER_BLOCK_QUANTIZED, *_gather_inputs(model, graph, base, grid)
    for node, _ in uses:
        activation = node.inputs[0] if consumer == "MatMul" else node.inputs[1]
        fused = ir.node(
            op,
            _with_activation(op, inputs, activation),
            attributes,
            domain=MS_DOMAIN,
            name=graph_edit.node_name(model, f"{node.name or base}.{op}"),
        )
        replace_node(node, fused)
    return sum(v.const_value.nbytes for v in _constants(inputs) if v.const_value is not None)


def _with_activation(op: str, stored: Sequence[ir.Value | None], activation: ir.Value | None) -> list:
    """A fused node's inputs: MatMulNBits(A, B, ...), GatherBlockQuantized(data, indices, ...)."""
    return [activation, *stored] if op == MATMUL_NBITS else [stored[0], activation, *stored[1:]]


def _codes_value(model: ir.Model, graph: ir.Graph, name: str, codes: np.ndarray | ir.Value) -> ir.Value:
    """The codes as the weight's own name: an initializer, or the value computing them renamed."""
    if isinstance(codes, np.ndarray):
        return graph_edit.add_initializer(model, graph, name, codes)
    graph_edit.release_name(model, codes.name)
    codes.name = graph_edit.unique_name(model, name)
    return codes


def replace_node(node: ir.Node, new: ir.Node) -> None:
    """Put ``new`` in the place of ``node``: its output takes over the uses and the name of ``node``'s."""
    graph = node.graph
    assert graph is not None
    out, replacement = node.outputs[0], new.outputs[0]
    replacement.type, replacement.shape, name = out.type, out.shape, out.name
    graph.insert_before(node, new)
    out.replace_all_uses_with(replacement, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    replacement.name = name


def _constants(values: Sequence[ir.Value]) -> list[ir.Value]:
    """The initializers ``values`` are stored in (a decode node's output counts its own inputs)."""
    found: list[ir.Value] = []
    for value in values:
        producer = value.producer()
        found.extend([value] if producer is None else _constants([v for v in producer.inputs if v is not None]))
    return found


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Each row of the 2-D ``codes`` packed on its own (rows padded to whole bytes), as MatMulNBits lays out B and
    its zero points."""
    per_byte = 8 // bits
    padded = np.pad(codes, ((0, 0), (0, -codes.shape[1] % per_byte)))
    return pack_bits(padded, bits).reshape(len(codes), -1)


def _unpack_rows(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of each row of :func:`_pack_rows`' output."""
    rows = len(packed)
    return unpack_bits(packed.reshape(-1), bits, packed.size * 8 // bits).reshape(rows, -1)[:, :count]


def _matmul_nbits_inputs(model, graph, base: str, grid: Grid) -> tuple[list[ir.Value], dict]:
    """B ``[N, blocks, block * bits / 8]``, scales ``[N * blocks]``, zero points packed per row like B."""
    n, blocks = grid.scale.shape
    codes = grid.codes  # a value computing them is already laid out [N, blocks, block] (8-bit codes)
    if isinstance(codes, np.ndarray):
        codes = _pack_rows(codes.reshape(n * blocks, grid.block), grid.bits).reshape(n, blocks, -1)
    inputs = [
        _codes_value(model, graph, base, codes),
        graph_edit.add_initializer(model, graph, f"{base}.scales", grid.scale.reshape(-1)),
    ]
    if grid.zero_point is not None:
        zero_points = _pack_rows(grid.zero_point, grid.bits)
        inputs.append(graph_edit.add_initializer(model, graph, f"{base}.zero_points", zero_points))
    k = blocks * grid.block
    attributes = {"K": k, "N": int(n), "bits": grid.bits, "block_size": grid.block}
    return inputs, attributes


def _gather_inputs(model, graph, base: str, grid: Grid) -> tuple[list[ir.Value], dict]:
    """data ``[V, H]`` (int4 / uint4 as DequantizeLinear stores them, or 8-bit codes as uint8), scales
    ``[V, H / block]``, zero points like scales (int4 / uint4 / uint8)."""
    codes, zero_point = grid.codes, grid.zero_point
    if grid.bits == 4:  # int4 / uint4 (the kernel's default zero point is 0: signed codes shift back to int4)
        assert isinstance(codes, np.ndarray)
        to = ml_dtypes.int4 if zero_point is None else ml_dtypes.uint4
        codes = (codes.astype(np.int16) - (8 if zero_point is None else 0)).astype(to)
        zero_point = None if zero_point is None else zero_point.astype(to)
    inputs = [
        _codes_value(model, graph, base, codes),
        graph_edit.add_initializer(model, graph, f"{base}.scales", grid.scale),
    ]
    if zero_point is not None:
        inputs.append(graph_edit.add_initializer(model, graph, f"{base}.zero_points", zero_point))
    attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": grid.block, "bits": grid.bits}
    return inputs, attributes


def palettized_grid(
    model: ir.Model, weight: ir.Value, palettized: PalettizedWeight, consumer: str, output_axis: int
) -> Grid | None:
    """The :class:`Grid` of a palettized 2-D weight whose scalar LUTs are int8 / uint8 (one scale per LUT, no
    per-channel scale, whole groups): 8-bit codes, each the LUT entry its index selects, computed from the stored
    indices by a LUT decode over the 8-bit LUT that ONNX Runtime folds at load. None for any other palettization
    (and when the indices are not 1, 2, 4 or 8 bits, which the byte-table decode needs)."""
    kernel = palettized.palettized
    lut_q = kernel.lut_quantized
    usable = (
        lut_q is not None
        and lut_q.q.dtype in (np.int8, np.uint8)
        and kernel.lut.shape[2] == 1
        and kernel.scale is None
        and kernel.n_bits in fn.BYTE_ALIGNED_BITS
        and palettized.padded_shape == palettized.canonical_shape
    )
    if not usable:
        return None
    assert lut_q is not None
    packed = kernel.packed
    out, inner = palettized.canonical_shape
    if palettized.forward[0] != output_axis:  # one LUT, kept in the weight's layout: store the codes channel-first
        codes = kernel.codes.reshape(out, inner).T
        packed, (out, inner) = pack_bits(codes, kernel.n_bits), codes.shape
    block = fused_block(inner, 0)
    if block is None:
        return None
    _, offset = _CODE_TYPES[lut_q.q.dtype]
    groups = kernel.lut.shape[0]
    lut8 = (lut_q.q.astype(np.int16) + offset).astype(np.uint8)
    shape = (out, inner // block, block) if consumer == "MatMul" else (out, inner)
    codes = encoding.write_lut(
        model,
        weight,
        packed=packed,
        lut=lut8,
        scale=None,
        n_bits=kernel.n_bits,
        canonical_shape=shape,
        perm=tuple(range(len(shape))),
        replace=False,
    )

    def per_block(per_lut: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(np.repeat(per_lut, out // groups)[:, None], (out, inner // block)))

    zp = None
    if lut_q.q.dtype == np.uint8:
        zp = per_block(np.zeros(groups, np.uint8) if lut_q.zero_point is None else lut_q.zero_point.astype(np.uint8))
    return Grid(codes, per_block(lut_q.scale), zp, 8, block)


# ----------------------------------------------------------------------------------------------------- readers


def is_fused(node: ir.Node) -> bool:
    """Whether ``node`` is a fused kernel in the layout lowbit writes: a ``MatMulNBits`` without ``g_idx`` or bias
    and with uint8 zero points, a ``GatherBlockQuantized`` over int4 / uint4, or 8-bit uint8, data gathered along
    axis 0 and quantized along axis 1. Other uses of these ops (e.g. ONNX Runtime's own quantizer with a bias) are
    left as they are."""
    if node.domain != MS_DOMAIN:
        return False
    if node.op_type == MATMUL_NBITS:
        zero_point = node.inputs[3] if len(node.inputs) > 3 else None
        extra = any(v is not None for v in node.inputs[4:])
        return not extra and (zero_point is None or dtype_of(zero_point) == ir.DataType.UINT8)
    if node.op_type == GATHER_BLOCK_QUANTIZED:
        data = node.inputs[0]
        if data is None or int_attribute(node, "gather_axis") != 0 or int_attribute(node, "quantize_axis", 1) != 1:
            return False
        dtype = dtype_of(data)
        four_bit = dtype in (ir.DataType.INT4, ir.DataType.UINT4)
        return four_bit or (dtype == ir.DataType.UINT8 and int_attribute(node, "bits", 4) == 8)
    return False


def fused_by_codes(graph: ir.Graph) -> dict[int, list[ir.Node]]:
    """The fused nodes of ``graph`` and its subgraphs, grouped by the codes they read (one weight each)."""
    groups: dict[int, list[ir.Node]] = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if is_fused(node):
            groups.setdefault(id(codes_input(node)), []).append(node)
    return groups


def activation_slot(node: ir.Node) -> int:
    """The input of a fused node that is not stored: MatMulNBits' A, GatherBlockQuantized's indices."""
    return 0 if node.op_type == MATMUL_NBITS else 1


def codes_input(node: ir.Node) -> ir.Value:
    """The fused node's codes (named like the weight they stand for)."""
    value = node.inputs[1 - activation_slot(node)]
    assert value is not None
    return value


def weight_axes(node: ir.Node) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the weight's shape, its (output, input) axes) of a fused node."""
    if node.op_type == MATMUL_NBITS:
        return (int_attribute(node, "K"), int_attribute(node, "N")), (1, 0)
    shape = value_shape(codes_input(node))
    assert shape is not None and len(shape) == 2
    return (int(shape[0]), int(shape[1])), (0, 1)


def unfuse(nodes: list[ir.Node], inputs: list[np.ndarray | None]) -> None:
    """Replace the fused ``nodes`` (all over the same codes) by ``MatMul`` / ``Gather`` of their dense weight, an
    initializer of the codes' graph named like the codes (``inputs``: the first node's inputs' values, the
    activation's None)."""
    codes = codes_input(nodes[0])
    home = codes.graph
    assert isinstance(home, ir.Graph) and codes.name is not None
    op, dense = unfused_weight(nodes[0], inputs)
    home.initializers.pop(codes.name)
    weight = ir.Value(name=codes.name, const_value=ir.tensor(dense))
    home.register_initializer(weight)
    for node in nodes:
        activation = node.inputs[activation_slot(node)]
        operands = [activation, weight] if op == "MatMul" else [weight, activation]
        name = node.name.removesuffix(f".{node.op_type}") if node.name else None
        replace_node(node, ir.node(op, operands, name=name))


def unfused_weight(node: ir.Node, inputs: list[np.ndarray | None]) -> tuple[str, np.ndarray]:
    """(the plain op, the dense weight in its layout) of a fused node, from its inputs' values (the activation's
    slot None)."""
    block, bits = int_attribute(node, "block_size"), int_attribute(node, "bits", 4)
    if node.op_type == MATMUL_NBITS:
        _, b, scale, zero_point = [*inputs, None][:4]
        assert b is not None and scale is not None
        n, k = int_attribute(node, "N"), int_attribute(node, "K")
        blocks = b.shape[1]
        codes = _unpack_rows(b.reshape(n, -1), bits, blocks * block)
        zp = _zero_points(zero_point, bits, n, blocks)
        dense = dequantize_linear(codes, scale.reshape(n, blocks), zp, axis=1, block_size=block)
        return "MatMul", np.ascontiguousarray(dense[:, :k].T)
    data, _, scale, zero_point = [*inputs, None][:4]
    assert data is not None and scale is not None
    if data.dtype == np.uint8:
        zp = np.full(scale.shape, 1 << (bits - 1), np.uint8) if zero_point is None else zero_point
    else:
        zp = np.zeros(scale.shape, np.int8) if zero_point is None else zero_point
    return "Gather", dequantize_linear(data, scale, zp, axis=1, block_size=block)


def _zero_points(zero_point: np.ndarray | None, bits: int, n: int, blocks: int) -> np.ndarray:
    if zero_point is None:
        return np.full((n, blocks), 1 << (bits - 1), np.uint8)
    return _unpack_rows(zero_point.reshape(n, -1), bits, blocks)


def describe_fused(node: ir.Node) -> str:
    """A fused node's encoding, for reports."""
    data = node.inputs[1] if node.op_type == MATMUL_NBITS else node.inputs[0]
    bits = int_attribute(node, "bits", 4)
    if node.op_type == GATHER_BLOCK_QUANTIZED and data is not None and dtype_of(data) != ir.DataType.UINT8:
        bits = 4
    return f"{node.op_type} {bits}-bit, block {int_attribute(node, 'block_size')}"
