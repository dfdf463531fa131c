"""The palettized-weight decode bodies of the ``lowbit`` function library (see :mod:`lowbit.onnx.functions`)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.onnx.function_parts import (
    DOMAIN,
    LUT_DEQUANTIZE,
    LUT_GATHER,
    LUT_GATHER_BYTES,
    LUT_GATHER_GROUPED,
    LUT_GATHER_OWN_LAYOUT,
    LUT_GATHER_TRIPLETS,
    LUT_TO_DENSE,
    TRIPLET_CODES,
    UNPACK_BITS,
    byte_fields,
    byte_table_values,
    const,
    const_ref,
    function,
    group_tables,
    powers_of_two,
    with_ref,
)

__all__ = [
    "lut_dequantize",
    "lut_gather",
    "lut_gather_bytes",
    "lut_gather_grouped",
    "lut_gather_own_layout",
    "lut_gather_triplets",
    "lut_to_dense",
    "triplet_codes",
]


def lut_to_dense() -> onnx.FunctionProto:
    """dense = LutToDense(indices, lut[G, K, cd], scale) <n_bits, shape (channel-first), perm>."""
    n = helper.make_node
    return function(
        LUT_TO_DENSE,
        ["indices", "lut", "scale"],
        ["dense"],
        [
            const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            const("idx0", np.array([0], np.int64)),
            const("idx1", np.array([1], np.int64)),
            const("idx2", np.array([2], np.int64)),
            const("minus1", np.array([-1], np.int64)),
            const("zero_scalar", np.array(0, np.int64)),
            const("one_scalar", np.array(1, np.int64)),
            n("ReduceProd", ["shape"], ["numel"], keepdims=0),
            n("Shape", ["lut"], ["lut_shape"]),
            n("Gather", ["lut_shape", "idx0"], ["groups1"]),
            n("Gather", ["lut_shape", "idx1"], ["k1"]),
            n("Gather", ["lut_shape", "idx2"], ["cd1"]),
            n("Squeeze", ["cd1", "idx0"], ["cd"]),
            n("Div", ["numel", "cd"], ["count"]),
            with_ref(
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
            with_ref(n("Transpose", ["canonical"], ["dense"]), "perm", onnx.AttributeProto.INTS),
        ],
        ["n_bits", "shape", "perm"],
    )


def lut_gather() -> onnx.FunctionProto:
    """dense = LutGather(indices, lut[1, K, 1]) <n_bits in {1, 2, 4, 8}, shape>: one scalar LUT, the weight's own
    layout (per-tensor palettization), codes filling the bytes exactly (``prod(shape) * n_bits`` divisible by 8).

    Each packed byte holds 8 / n_bits codes, so the body first builds the table of the 256 bytes' values
    ``[256, 8 / n_bits]`` from the LUT (tiny), then gathers it with the bytes: the only full-size intermediates are
    the int32 bytes, the looked-up values and their reshape, cheap for ONNX Runtime to constant-fold."""
    n = helper.make_node
    return function(
        LUT_GATHER,
        ["indices", "lut"],
        ["dense"],
        [
            *byte_fields(),
            const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            n("Reshape", ["lut", "minus1"], ["lut_flat"]),
            *byte_table_values("lut_flat", "indices", "looked_up"),
            n("Reshape", ["looked_up", "shape"], ["dense"]),
        ],
        ["n_bits", "shape"],
    )


def lut_gather_bytes() -> onnx.FunctionProto:
    """dense = LutGatherBytes(indices, lut[1, K, 1]): one scalar LUT of up to 256 entries, 8-bit indices stored in
    the weight's shape: one gather, whose output is the weight (two full-size intermediates to fold)."""
    n = helper.make_node
    return function(
        LUT_GATHER_BYTES,
        ["indices", "lut"],
        ["dense"],
        [
            const("minus1", np.array([-1], np.int64)),
            n("Reshape", ["lut", "minus1"], ["lut_flat"]),
            n("Cast", ["indices"], ["codes"], to=TensorProto.INT32),
            n("Gather", ["lut_flat", "codes"], ["dense"], axis=0),
        ],
        [],
    )


def lut_gather_grouped() -> onnx.FunctionProto:
    """dense = LutGatherGrouped(indices, lut[G, K, 1]) <n_bits in {1, 2, 4, 8}, shape (channel-first), perm>: G
    scalar LUTs over consecutive channel groups whose codes fill whole bytes. As :func:`lut_gather`, with one
    256-byte table per group: a byte of group g reads row ``g * 256 + byte``."""
    n = helper.make_node
    return function(
        LUT_GATHER_GROUPED,
        ["indices", "lut"],
        ["dense"],
        [
            *byte_fields(),
            const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            *group_tables(),
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
            with_ref(n("Transpose", ["canonical"], ["dense"]), "perm", onnx.AttributeProto.INTS),
        ],
        ["n_bits", "shape", "perm"],
    )


def triplet_codes() -> onnx.FunctionProto:
    """codes[131072, 12 / n_bits] = TripletCodes() <n_bits in {3, 6}>: the codes each pair of bytes holds in a
    little-endian 24-bit word. Rows 0-65535: the first half of the word's codes, from ``b0 + 256 * b1``; rows
    65536-131071: the second half, from ``b1 + 256 * b2`` (the word's bits 12-23 are that pair's bits 4-15).
    Independent of any weight: one node per model and bit width, which every ``LutGatherTriplets`` reads, so
    ONNX Runtime folds it once."""
    n = helper.make_node
    return function(
        TRIPLET_CODES,
        [],
        ["codes"],
        [
            const_ref("nbits", "n_bits", onnx.AttributeProto.INT, "value_int"),
            const("zero", np.array(0, np.int64)),
            const("one", np.array(1, np.int64)),
            const("twelve", np.array(12, np.int64)),
            const("sixteen", np.array(16, np.int64)),
            const("pairs", np.array(65536, np.int64)),
            const("one_u64", np.array(1, np.uint64)),
            const("axis1", np.array([1], np.int64)),
            n("Div", ["twelve", "nbits"], ["half"]),
            n("Range", ["zero", "half", "one"], ["positions"]),
            n("Mul", ["positions", "nbits"], ["shifts"]),
            *powers_of_two("shifts", "divisors", TensorProto.INT64),
            *powers_of_two("nbits", "levels", TensorProto.INT64),
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


def lut_gather_triplets() -> onnx.FunctionProto:
    """dense = LutGatherTriplets(words[W, 3], lut[1, K, 1], codes) <n_bits in {3, 6}, shape>: one scalar LUT, the
    weight's own layout, n-bit codes in little-endian 24-bit words (8 three-bit or 4 six-bit codes per 3 bytes);
    ``codes`` is :func:`triplet_codes`' table for ``n_bits``.

    The body looks the codes table up in the LUT (two 65,536-row tables of values: 1 MiB in float32 for 6 bits),
    computes each word's two byte-pair rows with one ``Gemm`` of its bytes, and gathers: a few full-size
    intermediates, as cheap for ONNX Runtime to fold as :func:`lut_gather`."""
    n = helper.make_node
    return function(
        LUT_GATHER_TRIPLETS,
        ["words", "lut", "codes"],
        ["dense"],
        [
            const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            const("minus1", np.array([-1], np.int64)),
            const("pair_weights", np.array([[1, 0], [256, 1], [0, 256]], np.float32)),
            const("pair_offsets", np.array([0, 65536], np.float32)),
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


def lut_dequantize() -> onnx.FunctionProto:
    """lut = LutDequantize(q[G, K, cd], scale[G], zero_point[G]) <to>: a quantized LUT (int8, uint8, fp8), one
    scale per LUT: ``(q - zero_point) * scale`` in float32, cast to ``to``, as ``DequantizeLinear(axis=0)``
    computes it. Written with Cast / Sub / Mul because ONNX Runtime never constant-folds a ``DequantizeLinear``
    (it keeps them for its QDQ fusions), which would leave the whole weight's decode to every run."""
    n = helper.make_node
    return function(
        LUT_DEQUANTIZE,
        ["q", "scale", "zero_point"],
        ["lut"],
        [
            const("axes12", np.array([1, 2], np.int64)),
            n("Cast", ["q"], ["q32"], to=TensorProto.FLOAT),
            n("Cast", ["zero_point"], ["zero_point32"], to=TensorProto.FLOAT),
            n("Cast", ["scale"], ["scale32"], to=TensorProto.FLOAT),
            n("Unsqueeze", ["zero_point32", "axes12"], ["zero_point3"]),
            n("Unsqueeze", ["scale32", "axes12"], ["scale3"]),
            n("Sub", ["q32", "zero_point3"], ["centred"]),
            n("Mul", ["centred", "scale3"], ["scaled"]),
            with_ref(n("Cast", ["scaled"], ["lut"]), "to", onnx.AttributeProto.INT),
        ],
        ["to"],
    )


def lut_gather_own_layout() -> onnx.FunctionProto:
    """dense = LutGatherOwnLayout(indices[..., last * n_bits / 8], lut[G, K, 1]) <n_bits in {1, 2, 4, 8}, shape,
    group_axis in {0, -1}, group_size>: scalar LUTs over consecutive groups of ``group_size`` indices along the
    weight's first or last axis (the last group may be shorter), indices in the weight's own layout, packed along
    its last axis (a byte never spans two rows, nor two groups along the last axis).

    Each byte reads the 256-row table of its group: ``row = byte + 256 * group``, the group offsets a small tensor
    that broadcasts over the bytes; then one gather and a reshape to the weight, no transpose: fewer full-size
    intermediates for ONNX Runtime to hold while it folds than :func:`lut_gather_grouped`."""
    n = helper.make_node
    return function(
        LUT_GATHER_OWN_LAYOUT,
        ["indices", "lut"],
        ["dense"],
        [
            *byte_fields(),
            const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            const_ref("axis", "group_axis", onnx.AttributeProto.INT, "value_int"),
            const_ref("group_size", "group_size", onnx.AttributeProto.INT, "value_int"),
            *group_tables(),
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
