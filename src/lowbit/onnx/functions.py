"""The ``lowbit`` ONNX function library: decode bodies written in standard opset-13 ops.

Each function is emitted into ``ModelProto.functions`` only when a node uses it, once per model, together with the
functions it calls. The bodies read their static parameters from the calling node's attributes (``ref_attr_name``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "BYTE_ALIGNED_BITS",
    "DOMAIN",
    "FUNCTION_OPSET",
    "LUT_DEQUANTIZE",
    "LUT_GATHER",
    "LUT_GATHER_BYTES",
    "LUT_GATHER_GROUPED",
    "LUT_GATHER_OWN_LAYOUT",
    "LUT_GATHER_TRIPLETS",
    "LUT_TO_DENSE",
    "MX_DEQUANTIZE",
    "SPARSE_GATHER",
    "SPARSE_TO_DENSE",
    "TRIPLET_BITS",
    "TRIPLET_CODES",
    "use_function",
]

DOMAIN = "lowbit"
DOMAIN_VERSION = 1
FUNCTION_OPSET = 13
MIN_IR_VERSION = 8  # model-local functions

UNPACK_BITS = "UnpackBits"
LUT_TO_DENSE = "LutToDense"
LUT_GATHER = "LutGather"
LUT_GATHER_GROUPED = "LutGatherGrouped"
LUT_GATHER_TRIPLETS = "LutGatherTriplets"
LUT_GATHER_BYTES = "LutGatherBytes"
LUT_GATHER_OWN_LAYOUT = "LutGatherOwnLayout"
TRIPLET_CODES = "TripletCodes"
TRIPLET_BITS = (3, 6)  # n_bits whose codes fill 3-byte words: what LutGatherTriplets takes
LUT_DEQUANTIZE = "LutDequantize"
BYTE_ALIGNED_BITS = (1, 2, 4, 8)  # n_bits whose codes never straddle a byte: what LutGather takes
SPARSE_TO_DENSE = "SparseToDense"
SPARSE_GATHER = "SparseGather"
MX_DEQUANTIZE = "MxDequantize"


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def _const_ref(name: str, attr: str, attr_type: onnx.AttributeProto.AttributeType, as_attr: str) -> onnx.NodeProto:
    """Constant whose value is the calling node's attribute ``attr``."""
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(helper.make_attribute_ref(as_attr, attr_type))
    node.attribute[0].ref_attr_name = attr
    return node


def _with_ref(node: onnx.NodeProto, name: str, attr_type: onnx.AttributeProto.AttributeType) -> onnx.NodeProto:
    ref = helper.make_attribute_ref(name, attr_type)
    node.attribute.append(ref)
    return node


def _function(name: str, inputs: list[str], outputs: list[str], nodes: list, attributes: list[str]):
    return helper.make_function(
        DOMAIN,
        name,
        inputs,
        outputs,
        nodes,
        opset_imports=[helper.make_opsetid("", FUNCTION_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        attributes=attributes,
    )


def _unpack_bits() -> onnx.FunctionProto:
    """codes[int32, count] = UnpackBits(packed[uint8], count[int64 scalar]) <n_bits>.

    Bits are unpacked on uint8 and combined by ``MatMulInteger`` with the powers of two, so the only full-size
    intermediates are bytes until the int32 codes: cheap for ONNX Runtime to constant-fold (no int32 bit grids)."""
    n = helper.make_node
    return _function(
        UNPACK_BITS,
        ["packed", "count"],
        ["codes"],
        [
            _const("shifts", np.arange(8, dtype=np.uint8)),
            _const("two", np.array(2, np.uint8)),
            _const("axis1", np.array([1], np.int64)),
            _const("axis0", np.array([0], np.int64)),
            _const("minus1", np.array([-1], np.int64)),
            _const("zero", np.array([0], np.int64)),
            _const("one_u8", np.array(1, np.uint8)),
            _const("zero_scalar", np.array(0, np.int64)),
            _const("one_scalar", np.array(1, np.int64)),
            _const_ref("nbits", "n_bits", onnx.AttributeProto.INT, "value_int"),
            n("Unsqueeze", ["packed", "axis1"], ["column"]),
            n("BitShift", ["column", "shifts"], ["shifted"], direction="RIGHT"),
            n("Mod", ["shifted", "two"], ["bits8"]),
            n("Reshape", ["bits8", "minus1"], ["bits"]),
            n("Mul", ["nbits", "count"], ["nused"]),
            n("Unsqueeze", ["nused", "axis0"], ["nused1"]),
            n("Slice", ["bits", "zero", "nused1"], ["used"]),
            n("Unsqueeze", ["nbits", "axis0"], ["nbits1"]),
            n("Concat", ["minus1", "nbits1"], ["grid_shape"], axis=0),
            n("Reshape", ["used", "grid_shape"], ["grid8"]),
            n("Range", ["zero_scalar", "nbits", "one_scalar"], ["positions"]),
            n("Cast", ["positions"], ["positions_u8"], to=TensorProto.UINT8),
            n("BitShift", ["one_u8", "positions_u8"], ["powers_row"], direction="LEFT"),
            n("Unsqueeze", ["powers_row", "axis1"], ["powers"]),
            n("MatMulInteger", ["grid8", "powers"], ["codes_column"]),
            n("Reshape", ["codes_column", "minus1"], ["codes"]),
        ],
        ["n_bits"],
    )


def _lut_to_dense() -> onnx.FunctionProto:
    """dense = LutToDense(indices, lut[G, K, cd], scale) <n_bits, shape (channel-first), perm>."""
    n = helper.make_node
    return _function(
        LUT_TO_DENSE,
        ["indices", "lut", "scale"],
        ["dense"],
        [
            _const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            _const("idx0", np.array([0], np.int64)),
            _const("idx1", np.array([1], np.int64)),
            _const("idx2", np.array([2], np.int64)),
            _const("minus1", np.array([-1], np.int64)),
            _const("zero_scalar", np.array(0, np.int64)),
            _const("one_scalar", np.array(1, np.int64)),
            n("ReduceProd", ["shape"], ["numel"], keepdims=0),
            n("Shape", ["lut"], ["lut_shape"]),
            n("Gather", ["lut_shape", "idx0"], ["groups1"]),
            n("Gather", ["lut_shape", "idx1"], ["k1"]),
            n("Gather", ["lut_shape", "idx2"], ["cd1"]),
            n("Squeeze", ["cd1", "idx0"], ["cd"]),
            n("Div", ["numel", "cd"], ["count"]),
            _with_ref(
                n(f"{UNPACK_BITS}", ["indices", "count"], ["codes"], domain=DOMAIN),
                "n_bits",
                onnx.AttributeProto.INT,
            ),
            n("Concat", ["groups1", "minus1"], ["by_group"], axis=0),
            n("Reshape", ["codes", "by_group"], ["grouped"]),
            n("Squeeze", ["groups1", "idx0"], ["groups"]),
            n("Range", ["zero_scalar", "groups", "one_scalar"], ["group_ids"]),
            n("Mul", ["group_ids", "k1"], ["offsets64"]),
            n("Cast", ["offsets64"], ["offsets_flat"], to=TensorProto.INT32),
            n("Unsqueeze", ["offsets_flat", "idx1"], ["offsets"]),
            n("Add", ["grouped", "offsets"], ["global_codes"]),
            n("Reshape", ["global_codes", "minus1"], ["flat_codes"]),
            n("Concat", ["minus1", "cd1"], ["table_shape"], axis=0),
            n("Reshape", ["lut", "table_shape"], ["table"]),
            n("Gather", ["table", "flat_codes"], ["vectors"], axis=0),
            n("Gather", ["shape", "idx0"], ["channels1"]),
            n("Div", ["channels1", "cd1"], ["rows1"]),
            n("Div", ["numel", "channels1"], ["r1"]),
            n("Concat", ["rows1", "r1", "cd1"], ["v3_shape"], axis=0),
            n("Reshape", ["vectors", "v3_shape"], ["v3"]),
            n("Transpose", ["v3"], ["v3t"], perm=[0, 2, 1]),
            n("Concat", ["channels1", "r1"], ["dense2_shape"], axis=0),
            n("Reshape", ["v3t", "dense2_shape"], ["dense2"]),
            n("Mul", ["dense2", "scale"], ["scaled"]),
            n("Reshape", ["scaled", "shape"], ["canonical"]),
            _with_ref(n("Transpose", ["canonical"], ["dense"]), "perm", onnx.AttributeProto.INTS),
        ],
        ["n_bits", "shape", "perm"],
    )


def _byte_fields() -> list:
    """Nodes computing ``fields[int32, 256, 8 / n_bits]``: the codes each of the 256 byte values holds (low bits
    first), from the calling node's ``n_bits`` (which must divide 8)."""
    n = helper.make_node
    return [
        _const_ref("nbits", "n_bits", onnx.AttributeProto.INT, "value_int"),
        _const("zero", np.array(0, np.int64)),
        _const("one", np.array(1, np.int64)),
        _const("eight", np.array(8, np.int64)),
        _const("byte_count", np.array(256, np.int64)),
        _const("axis1", np.array([1], np.int64)),
        _const("minus1", np.array([-1], np.int64)),
        _const("one_u64", np.array(1, np.uint64)),
        n("Range", ["zero", "byte_count", "one"], ["byte_values"]),
        n("Cast", ["byte_values"], ["bytes8"], to=TensorProto.UINT8),
        n("Unsqueeze", ["bytes8", "axis1"], ["byte_column"]),
        n("Range", ["zero", "eight", "nbits"], ["offsets"]),
        n("Cast", ["offsets"], ["offsets8"], to=TensorProto.UINT8),
        n("BitShift", ["byte_column", "offsets8"], ["shifted"], direction="RIGHT"),
        n("Cast", ["shifted"], ["shifted32"], to=TensorProto.INT32),
        n("Cast", ["nbits"], ["nbits_u64"], to=TensorProto.UINT64),
        n("BitShift", ["one_u64", "nbits_u64"], ["levels_u64"], direction="LEFT"),
        n("Cast", ["levels_u64"], ["levels"], to=TensorProto.INT32),
        n("Mod", ["shifted32", "levels"], ["fields"]),
    ]


def _byte_table_values(table: str, packed: str, values: str) -> list:
    """Nodes after :func:`_byte_fields`: ``values[bytes, 8 / n_bits]`` = the codes of ``packed`` (uint8) looked up
    in the 1-D ``table``, through the table of the 256 bytes' values. The codes must fill the bytes exactly (the
    caller reshapes ``values`` straight to the weight: every full-size intermediate costs ONNX Runtime its size
    in memory while it folds the body, so there is no flatten-and-slice)."""
    n = helper.make_node
    return [
        n("Gather", [table, "fields"], ["byte_table"], axis=0),
        n("Cast", [packed], ["bytes32"], to=TensorProto.INT32),
        n("Gather", ["byte_table", "bytes32"], [values], axis=0),
    ]


def _lut_gather() -> onnx.FunctionProto:
    """dense = LutGather(indices, lut[1, K, 1]) <n_bits in {1, 2, 4, 8}, shape>: one scalar LUT, the weight's own
    layout (per-tensor palettization), codes filling the bytes exactly (``prod(shape) * n_bits`` divisible by 8).

    Each packed byte holds 8 / n_bits codes, so the body first builds the table of the 256 bytes' values
    ``[256, 8 / n_bits]`` from the LUT (tiny), then gathers it with the bytes: the only full-size intermediates are
    the int32 bytes, the looked-up values and their reshape, cheap for ONNX Runtime to constant-fold."""
    n = helper.make_node
    return _function(
        LUT_GATHER,
        ["indices", "lut"],
        ["dense"],
        [
            *_byte_fields(),
            _const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            n("Reshape", ["lut", "minus1"], ["lut_flat"]),
            *_byte_table_values("lut_flat", "indices", "looked_up"),
            n("Reshape", ["looked_up", "shape"], ["dense"]),
        ],
        ["n_bits", "shape"],
    )


def _group_tables() -> list:
    """Nodes after :func:`_byte_fields`: ``table[G * 256, 8 / n_bits]``, the values of the 256 bytes under each of
    the ``G`` scalar LUTs of ``lut[G, K, 1]`` (group g's rows from ``g * 256``); also defines ``groups1`` ([G]),
    ``by_group`` ([G, -1]), ``per_byte1`` and the index constants ``idx0`` / ``idx1``."""
    n = helper.make_node
    return [
        _const("idx0", np.array([0], np.int64)),
        _const("idx1", np.array([1], np.int64)),
        n("Shape", ["lut"], ["lut_shape"]),
        n("Gather", ["lut_shape", "idx0"], ["groups1"]),
        n("Concat", ["groups1", "minus1"], ["by_group"], axis=0),
        n("Reshape", ["lut", "by_group"], ["lut2"]),
        n("Gather", ["lut2", "fields"], ["tables"], axis=1),
        n("Shape", ["fields"], ["fields_shape"]),
        n("Gather", ["fields_shape", "idx1"], ["per_byte1"]),
        n("Concat", ["minus1", "per_byte1"], ["table_shape"], axis=0),
        n("Reshape", ["tables", "table_shape"], ["table"]),
    ]


def _lut_gather_bytes() -> onnx.FunctionProto:
    """dense = LutGatherBytes(indices, lut[1, K, 1]): one scalar LUT of up to 256 entries, 8-bit indices stored in
    the weight's shape: one gather, whose output is the weight (two full-size intermediates to fold)."""
    n = helper.make_node
    return _function(
        LUT_GATHER_BYTES,
        ["indices", "lut"],
        ["dense"],
        [
            _const("minus1", np.array([-1], np.int64)),
            n("Reshape", ["lut", "minus1"], ["lut_flat"]),
            n("Cast", ["indices"], ["codes"], to=TensorProto.INT32),
            n("Gather", ["lut_flat", "codes"], ["dense"], axis=0),
        ],
        [],
    )


def _lut_gather_grouped() -> onnx.FunctionProto:
    """dense = LutGatherGrouped(indices, lut[G, K, 1]) <n_bits in {1, 2, 4, 8}, shape (channel-first), perm>: G
    scalar LUTs over consecutive channel groups whose codes fill whole bytes. As :func:`_lut_gather`, with one
    256-byte table per group: a byte of group g reads row ``g * 256 + byte``."""
    n = helper.make_node
    return _function(
        LUT_GATHER_GROUPED,
        ["indices", "lut"],
        ["dense"],
        [
            *_byte_fields(),
            _const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            *_group_tables(),
            n("Cast", ["indices"], ["bytes32"], to=TensorProto.INT32),
            n("Reshape", ["bytes32", "by_group"], ["grouped"]),
            n("Squeeze", ["groups1", "idx0"], ["groups"]),
            n("Range", ["zero", "groups", "one"], ["group_ids"]),
            n("Mul", ["group_ids", "byte_count"], ["starts64"]),
            n("Cast", ["starts64"], ["starts_flat"], to=TensorProto.INT32),
            n("Unsqueeze", ["starts_flat", "axis1"], ["starts"]),
            n("Add", ["grouped", "starts"], ["rows"]),
            n("Gather", ["table", "rows"], ["values"], axis=0),
            n("Reshape", ["values", "shape"], ["canonical"]),
            _with_ref(n("Transpose", ["canonical"], ["dense"]), "perm", onnx.AttributeProto.INTS),
        ],
        ["n_bits", "shape", "perm"],
    )


def _triplet_codes() -> onnx.FunctionProto:
    """codes[131072, 12 / n_bits] = TripletCodes() <n_bits in {3, 6}>: the codes each pair of bytes holds in a
    little-endian 24-bit word. Rows 0-65535: the first half of the word's codes, from ``b0 + 256 * b1``; rows
    65536-131071: the second half, from ``b1 + 256 * b2`` (the word's bits 12-23 are that pair's bits 4-15).
    Independent of any weight: one node per model and bit width, which every ``LutGatherTriplets`` reads, so
    ONNX Runtime folds it once."""
    n = helper.make_node
    return _function(
        TRIPLET_CODES,
        [],
        ["codes"],
        [
            _const_ref("nbits", "n_bits", onnx.AttributeProto.INT, "value_int"),
            _const("zero", np.array(0, np.int64)),
            _const("one", np.array(1, np.int64)),
            _const("twelve", np.array(12, np.int64)),
            _const("sixteen", np.array(16, np.int64)),
            _const("pairs", np.array(65536, np.int64)),
            _const("one_u64", np.array(1, np.uint64)),
            _const("axis1", np.array([1], np.int64)),
            n("Div", ["twelve", "nbits"], ["half"]),
            n("Range", ["zero", "half", "one"], ["positions"]),
            n("Mul", ["positions", "nbits"], ["shifts"]),
            n("Cast", ["shifts"], ["shifts_u64"], to=TensorProto.UINT64),
            n("BitShift", ["one_u64", "shifts_u64"], ["divisors_u64"], direction="LEFT"),
            n("Cast", ["divisors_u64"], ["divisors"], to=TensorProto.INT64),
            n("Cast", ["nbits"], ["nbits_u64"], to=TensorProto.UINT64),
            n("BitShift", ["one_u64", "nbits_u64"], ["levels_u64"], direction="LEFT"),
            n("Cast", ["levels_u64"], ["levels"], to=TensorProto.INT64),
            n("Range", ["zero", "pairs", "one"], ["pair_values"]),
            n("Unsqueeze", ["pair_values", "axis1"], ["pair_column"]),
            n("Div", ["pair_column", "divisors"], ["low_shifted"]),
            n("Mod", ["low_shifted", "levels"], ["low_codes"]),
            n("Mul", ["divisors", "sixteen"], ["high_divisors"]),
            n("Div", ["pair_column", "high_divisors"], ["high_shifted"]),
            n("Mod", ["high_shifted", "levels"], ["high_codes"]),
            n("Concat", ["low_codes", "high_codes"], ["codes64"], axis=0),
            n("Cast", ["codes64"], ["codes"], to=TensorProto.INT32),
        ],
        ["n_bits"],
    )


def _lut_gather_triplets() -> onnx.FunctionProto:
    """dense = LutGatherTriplets(words[W, 3], lut[1, K, 1], codes) <n_bits in {3, 6}, shape>: one scalar LUT, the
    weight's own layout, n-bit codes in little-endian 24-bit words (8 three-bit or 4 six-bit codes per 3 bytes);
    ``codes`` is :func:`_triplet_codes`' table for ``n_bits``.

    The body looks the codes table up in the LUT (two 65,536-row tables of values: 1 MiB in float32 for 6 bits),
    computes each word's two byte-pair rows with one ``Gemm`` of its bytes, and gathers: a few full-size
    intermediates, as cheap for ONNX Runtime to fold as :func:`_lut_gather`."""
    n = helper.make_node
    return _function(
        LUT_GATHER_TRIPLETS,
        ["words", "lut", "codes"],
        ["dense"],
        [
            _const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            _const("minus1", np.array([-1], np.int64)),
            _const("pair_weights", np.array([[1, 0], [256, 1], [0, 256]], np.float32)),
            _const("pair_offsets", np.array([0, 65536], np.float32)),
            n("Reshape", ["lut", "minus1"], ["lut_flat"]),
            n("Gather", ["lut_flat", "codes"], ["pair_table"], axis=0),
            n("Cast", ["words"], ["word_bytes"], to=TensorProto.FLOAT),
            n("Gemm", ["word_bytes", "pair_weights", "pair_offsets"], ["pair_rows_float"]),
            n("Cast", ["pair_rows_float"], ["pair_rows"], to=TensorProto.INT32),
            n("Gather", ["pair_table", "pair_rows"], ["values"], axis=0),
            n("Reshape", ["values", "shape"], ["dense"]),
        ],
        ["n_bits", "shape"],
    )


def _lut_dequantize() -> onnx.FunctionProto:
    """lut = LutDequantize(q[G, K, cd], scale[G], zero_point[G]) <to>: a quantized LUT (int8, uint8, fp8), one
    scale per LUT: ``(q - zero_point) * scale`` in float32, cast to ``to``, as ``DequantizeLinear(axis=0)``
    computes it. Written with Cast / Sub / Mul because ONNX Runtime never constant-folds a ``DequantizeLinear``
    (it keeps them for its QDQ fusions), which would leave the whole weight's decode to every run."""
    n = helper.make_node
    return _function(
        LUT_DEQUANTIZE,
        ["q", "scale", "zero_point"],
        ["lut"],
        [
            _const("axes12", np.array([1, 2], np.int64)),
            n("Cast", ["q"], ["q32"], to=TensorProto.FLOAT),
            n("Cast", ["zero_point"], ["zero_point32"], to=TensorProto.FLOAT),
            n("Cast", ["scale"], ["scale32"], to=TensorProto.FLOAT),
            n("Unsqueeze", ["zero_point32", "axes12"], ["zero_point3"]),
            n("Unsqueeze", ["scale32", "axes12"], ["scale3"]),
            n("Sub", ["q32", "zero_point3"], ["centred"]),
            n("Mul", ["centred", "scale3"], ["scaled"]),
            _with_ref(n("Cast", ["scaled"], ["lut"]), "to", onnx.AttributeProto.INT),
        ],
        ["to"],
    )


def _lut_gather_own_layout() -> onnx.FunctionProto:
    """dense = LutGatherOwnLayout(indices[..., last * n_bits / 8], lut[G, K, 1]) <n_bits in {1, 2, 4, 8}, shape,
    group_axis in {0, -1}, group_size>: scalar LUTs over consecutive groups of ``group_size`` indices along the
    weight's first or last axis (the last group may be shorter), indices in the weight's own layout, packed along
    its last axis (a byte never spans two rows, nor two groups along the last axis).

    Each byte reads the 256-row table of its group: ``row = byte + 256 * group``, the group offsets a small tensor
    that broadcasts over the bytes; then one gather and a reshape to the weight, no transpose: fewer full-size
    intermediates for ONNX Runtime to hold while it folds than :func:`_lut_gather_grouped`."""
    n = helper.make_node
    return _function(
        LUT_GATHER_OWN_LAYOUT,
        ["indices", "lut"],
        ["dense"],
        [
            *_byte_fields(),
            _const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            _const_ref("axis", "group_axis", onnx.AttributeProto.INT, "value_int"),
            _const_ref("group_size", "group_size", onnx.AttributeProto.INT, "value_int"),
            *_group_tables(),
            n("Cast", ["indices"], ["bytes32"], to=TensorProto.INT32),
            # the group of each position along the group axis: position * (per_byte on the packed last axis)
            n("Shape", ["bytes32"], ["bytes_shape"]),
            n("Unsqueeze", ["axis", "idx0"], ["group_axis1"]),
            n("Gather", ["bytes_shape", "group_axis1"], ["positions1"]),
            n("Squeeze", ["positions1", "idx0"], ["positions"]),
            n("Range", ["zero", "positions", "one"], ["position_ids"]),
            n("Squeeze", ["per_byte1", "idx0"], ["per_byte"]),
            n("Sub", ["per_byte", "one"], ["extra"]),
            n("Mul", ["extra", "axis"], ["minus_extra"]),
            n("Sub", ["one", "minus_extra"], ["step"]),  # 1 along the first axis, per_byte along the last
            n("Mul", ["position_ids", "step"], ["elements"]),
            n("Div", ["elements", "group_size"], ["group_ids"]),
            n("Mul", ["group_ids", "byte_count"], ["offsets64"]),
            n("Cast", ["offsets64"], ["offsets_flat"], to=TensorProto.INT32),
            # along the first axis the offsets need trailing singleton axes to broadcast: rank - 1 of them
            n("Size", ["bytes_shape"], ["rank"]),
            n("Sub", ["rank", "one"], ["trailing"]),
            n("Add", ["axis", "one"], ["first"]),
            n("Mul", ["trailing", "first"], ["singletons"]),
            n("Unsqueeze", ["singletons", "idx0"], ["singletons1"]),
            helper.make_node(
                "ConstantOfShape",
                ["singletons1"],
                ["ones"],
                value=numpy_helper.from_array(np.array([1], np.int64)),
            ),
            n("Concat", ["positions1", "ones"], ["offsets_shape"], axis=0),
            n("Reshape", ["offsets_flat", "offsets_shape"], ["group_offsets"]),
            n("Add", ["bytes32", "group_offsets"], ["rows"]),
            n("Gather", ["table", "rows"], ["values"], axis=0),
            n("Reshape", ["values", "shape"], ["dense"]),
        ],
        ["n_bits", "shape", "group_axis", "group_size"],
    )


def _sparse_to_dense() -> onnx.FunctionProto:
    """dense = SparseToDense(mask, values) <shape>: ``values`` scattered at the set bits of the 1-bit ``mask``."""
    n = helper.make_node
    unpack = n(UNPACK_BITS, ["mask", "numel"], ["bits"], domain=DOMAIN)
    unpack.attribute.append(helper.make_attribute("n_bits", 1))
    return _function(
        SPARSE_TO_DENSE,
        ["mask", "values"],
        ["dense"],
        [
            _const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            _const("axis0", np.array(0, np.int64)),
            _const("pads", np.array([1, 0], np.int64)),
            n("ReduceProd", ["shape"], ["numel"], keepdims=0),
            unpack,
            n("CumSum", ["bits", "axis0"], ["slots"]),
            n("Mul", ["slots", "bits"], ["gather_ids"]),
            n("Pad", ["values", "pads"], ["padded"]),
            n("Gather", ["padded", "gather_ids"], ["flat"], axis=0),
            n("Reshape", ["flat", "shape"], ["dense"]),
        ],
        ["shape"],
    )


def _sparse_gather() -> onnx.FunctionProto:
    """dense = SparseGather(mask[prod(shape) / 8], values) <shape>: as ``SparseToDense`` for a mask whose bits fill
    its bytes, through tables of the 256 bytes: each byte's count of set bits (their running sum gives the byte's
    first slot) and each bit's rank among them (+1; a large negative for a clear bit, which ``Max`` with 0 sends to
    the padded zero). No bit grid: a few full-size intermediates for ONNX Runtime to fold."""
    n = helper.make_node
    return _function(
        SPARSE_GATHER,
        ["mask", "values"],
        ["dense"],
        [
            _const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            _const("shifts", np.arange(8, dtype=np.uint8)),
            _const("two", np.array(2, np.uint8)),
            _const("zero", np.array(0, np.int64)),
            _const("one", np.array(1, np.int64)),
            _const("byte_count", np.array(256, np.int64)),
            _const("axis0", np.array(0, np.int64)),
            _const("axis1", np.array(1, np.int64)),
            _const("axes1", np.array([1], np.int64)),
            _const("pads", np.array([1, 0], np.int64)),
            _const("clear", np.array(-(1 << 30), np.int32)),
            _const("zero32", np.array(0, np.int32)),
            n("Range", ["zero", "byte_count", "one"], ["byte_values"]),
            n("Cast", ["byte_values"], ["bytes8"], to=TensorProto.UINT8),
            n("Unsqueeze", ["bytes8", "axes1"], ["byte_column"]),
            n("BitShift", ["byte_column", "shifts"], ["shifted"], direction="RIGHT"),
            n("Mod", ["shifted", "two"], ["bits8"]),
            n("Cast", ["bits8"], ["bits"], to=TensorProto.INT32),
            n("ReduceSum", ["bits", "axes1"], ["counts_column"], keepdims=0),
            n("CumSum", ["bits", "axis1"], ["ranks"]),
            n("Cast", ["bits8"], ["is_set"], to=TensorProto.BOOL),
            n("Where", ["is_set", "ranks", "clear"], ["slot_table"]),
            n("Cast", ["mask"], ["bytes32"], to=TensorProto.INT32),
            n("Gather", ["counts_column", "bytes32"], ["counts"], axis=0),
            n("CumSum", ["counts", "axis0"], ["starts_flat"], exclusive=1),
            n("Unsqueeze", ["starts_flat", "axes1"], ["starts"]),
            n("Gather", ["slot_table", "bytes32"], ["slots"], axis=0),
            n("Add", ["slots", "starts"], ["shifted_slots"]),
            n("Max", ["shifted_slots", "zero32"], ["gather_ids"]),
            n("Pad", ["values", "pads"], ["padded"]),
            n("Gather", ["padded", "gather_ids"], ["flat"], axis=0),
            n("Reshape", ["flat", "shape"], ["dense"]),
        ],
        ["shape"],
    )


def _mx_dequantize() -> onnx.FunctionProto:
    """dense = MxDequantize(codes, exponents, table) <n_bits, shape, split_shape, scale_shape, to>.

    ``table[code] * 2^(e - 127)`` per block: codes are n-bit indices into ``table`` (the values of the element
    type, e.g. the 16 of FP4 E2M1), ``exponents`` uint8 E8M0, one per block; ``split_shape`` splits every axis into
    (blocks, block) and ``scale_shape`` is the exponent grid broadcastable against it.
    """
    n = helper.make_node
    return _function(
        MX_DEQUANTIZE,
        ["codes", "exponents", "table"],
        ["dense"],
        [
            *_byte_fields(),  # FP4 / fp8 codes fill whole bytes: each byte's values from one 256-entry table
            _const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            _const_ref("split_shape", "split_shape", onnx.AttributeProto.INTS, "value_ints"),
            _const_ref("scale_shape", "scale_shape", onnx.AttributeProto.INTS, "value_ints"),
            _const("two", np.array(2.0, np.float32)),
            _const("bias", np.array(127.0, np.float32)),
            *_byte_table_values("table", "codes", "values"),
            n("Reshape", ["values", "split_shape"], ["blocks"]),
            n("Cast", ["exponents"], ["e"], to=TensorProto.FLOAT),
            n("Sub", ["e", "bias"], ["unbiased"]),
            n("Pow", ["two", "unbiased"], ["scale_flat"]),
            n("Reshape", ["scale_flat", "scale_shape"], ["scale"]),
            n("Mul", ["blocks", "scale"], ["scaled"]),
            _with_ref(n("Cast", ["scaled"], ["typed"]), "to", onnx.AttributeProto.INT),
            n("Reshape", ["typed", "shape"], ["dense"]),
        ],
        ["n_bits", "shape", "split_shape", "scale_shape", "to"],
    )


_BUILDERS = {
    UNPACK_BITS: (_unpack_bits, ()),
    LUT_TO_DENSE: (_lut_to_dense, (UNPACK_BITS,)),
    LUT_GATHER: (_lut_gather, ()),
    LUT_GATHER_GROUPED: (_lut_gather_grouped, ()),
    LUT_GATHER_TRIPLETS: (_lut_gather_triplets, ()),
    LUT_GATHER_BYTES: (_lut_gather_bytes, ()),
    LUT_GATHER_OWN_LAYOUT: (_lut_gather_own_layout, ()),
    TRIPLET_CODES: (_triplet_codes, ()),
    LUT_DEQUANTIZE: (_lut_dequantize, ()),
    SPARSE_TO_DENSE: (_sparse_to_dense, (UNPACK_BITS,)),
    SPARSE_GATHER: (_sparse_gather, ()),
    MX_DEQUANTIZE: (_mx_dequantize, ()),
}


def use_function(model: ir.Model, name: str) -> None:
    """Make sure ``model`` defines function ``lowbit.<name>`` (and what it calls) and imports the domain.

    Raises ``ValueError`` when the model's default opset is older than 13, the oldest the bodies are written for.
    """
    opset = model.graph.opset_imports.get("", 1)
    if opset < FUNCTION_OPSET:
        raise ValueError(
            f"the model imports opset {opset}; lowbit's decode functions need opset >= {FUNCTION_OPSET}: "
            "upgrade it first (onnx.version_converter.convert_version)"
        )
    builder, calls = _BUILDERS[name]
    for dependency in calls:
        use_function(model, dependency)
    model.graph.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    key = (DOMAIN, name, "")
    if key not in model.functions:
        model.functions[key] = ir.serde.deserialize_function(builder())
    sync_function_opsets(model)


def sync_function_opsets(model: ir.Model) -> None:
    """Make lowbit function bodies import the model's default opset, as the ONNX checker requires.

    The bodies only use ops whose meaning is unchanged from opset 13 to the newest, so any version >= 13 works.
    """
    opset = model.graph.opset_imports.get("", FUNCTION_OPSET)
    for (domain, _, _), function in model.functions.items():
        if domain == DOMAIN:
            function.opset_imports[""] = opset
