"""The ``lowbit`` ONNX function library: decode bodies written in standard opset-13 ops.

Each function is emitted into ``ModelProto.functions`` only when a node uses it, once per model, together with the
functions it calls. The bodies read their static parameters from the calling node's attributes (``ref_attr_name``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from lowbit.onnx import lut_functions as lut
from lowbit.onnx.function_parts import (
    BYTE_ALIGNED_BITS,
    DOMAIN,
    DOMAIN_VERSION,
    FUNCTION_OPSET,
    LUT_DEQUANTIZE,
    LUT_GATHER,
    LUT_GATHER_BYTES,
    LUT_GATHER_GROUPED,
    LUT_GATHER_OWN_LAYOUT,
    LUT_GATHER_TRIPLETS,
    LUT_TO_DENSE,
    MIN_IR_VERSION,
    MX_DEQUANTIZE,
    SPARSE_GATHER,
    SPARSE_TO_DENSE,
    TRIPLET_BITS,
    TRIPLET_CODES,
    UNPACK_BITS,
    WITH_OUTLIERS,
    byte_fields,
    byte_table_values,
    const,
    const_ref,
    function,
    with_ref,
)

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
    "WITH_OUTLIERS",
    "use_function",
]


def _unpack_bits() -> onnx.FunctionProto:
    """codes[int32, count] = UnpackBits(packed[uint8], count[int64 scalar]) <n_bits>.

    Bits are unpacked on uint8 and combined by ``MatMulInteger`` with the powers of two, so the only full-size
    intermediates are bytes until the int32 codes: cheap for ONNX Runtime to constant-fold (no int32 bit grids)."""
    n = helper.make_node
    return function(
        UNPACK_BITS,
        ["packed", "count"],
        ["codes"],
        [
            const("shifts", np.arange(8, dtype=np.uint8)),
            const("two", np.array(2, np.uint8)),
            const("axis1", np.array([1], np.int64)),
            const("axis0", np.array([0], np.int64)),
            const("minus1", np.array([-1], np.int64)),
            const("zero", np.array([0], np.int64)),
            const("one_u8", np.array(1, np.uint8)),
            const("zero_scalar", np.array(0, np.int64)),
            const("one_scalar", np.array(1, np.int64)),
            const_ref("nbits", "n_bits", onnx.AttributeProto.INT, "value_int"),
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


def _sparse_to_dense() -> onnx.FunctionProto:
    """dense = SparseToDense(mask, values) <shape>: ``values`` scattered at the set bits of the 1-bit ``mask``."""
    n = helper.make_node
    unpack = n(UNPACK_BITS, ["mask", "numel"], ["bits"], domain=DOMAIN)
    unpack.attribute.append(helper.make_attribute("n_bits", 1))
    return function(
        SPARSE_TO_DENSE,
        ["mask", "values"],
        ["dense"],
        [
            const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            const("axis0", np.array(0, np.int64)),
            const("pads", np.array([1, 0], np.int64)),
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


def _with_outliers() -> onnx.FunctionProto:
    """dense = WithOutliers(decoded, positions, values): ``decoded`` with the elements at the flat int32
    ``positions`` (C order) replaced by ``values`` (a palettization's outliers, kept exact)."""
    n = helper.make_node
    return function(
        WITH_OUTLIERS,
        ["decoded", "positions", "values"],
        ["dense"],
        [
            const("flat_shape", np.array([-1], np.int64)),
            const("axis1", np.array([1], np.int64)),
            n("Shape", ["decoded"], ["shape"]),
            n("Reshape", ["decoded", "flat_shape"], ["flat"]),
            n("Cast", ["positions"], ["positions64"], to=TensorProto.INT64),
            n("Unsqueeze", ["positions64", "axis1"], ["indices"]),
            n("ScatterND", ["flat", "indices", "values"], ["scattered"]),
            n("Reshape", ["scattered", "shape"], ["dense"]),
        ],
        [],
    )


def _sparse_gather() -> onnx.FunctionProto:
    """dense = SparseGather(mask[prod(shape) / 8], values) <shape>: as ``SparseToDense`` for a mask whose bits fill
    its bytes, through tables of the 256 bytes: each byte's count of set bits (their running sum gives the byte's
    first slot) and each bit's rank among them (+1; a large negative for a clear bit, which ``Max`` with 0 sends to
    the padded zero). No bit grid: a few full-size intermediates for ONNX Runtime to fold."""
    n = helper.make_node
    return function(
        SPARSE_GATHER,
        ["mask", "values"],
        ["dense"],
        [
            const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            const("shifts", np.arange(8, dtype=np.uint8)),
            const("two", np.array(2, np.uint8)),
            const("zero", np.array(0, np.int64)),
            const("one", np.array(1, np.int64)),
            const("byte_count", np.array(256, np.int64)),
            const("axis0", np.array(0, np.int64)),
            const("axis1", np.array(1, np.int64)),
            const("axes1", np.array([1], np.int64)),
            const("pads", np.array([1, 0], np.int64)),
            const("clear", np.array(-(1 << 30), np.int32)),
            const("zero32", np.array(0, np.int32)),
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
    return function(
        MX_DEQUANTIZE,
        ["codes", "exponents", "table"],
        ["dense"],
        [
            *byte_fields(),  # FP4 / fp8 codes fill whole bytes: each byte's values from one 256-entry table
            const_ref("shape", "shape", onnx.AttributeProto.INTS, "value_ints"),
            const_ref("split_shape", "split_shape", onnx.AttributeProto.INTS, "value_ints"),
            const_ref("scale_shape", "scale_shape", onnx.AttributeProto.INTS, "value_ints"),
            const("two", np.array(2.0, np.float32)),
            const("bias", np.array(127.0, np.float32)),
            *byte_table_values("table", "codes", "values"),
            n("Reshape", ["values", "split_shape"], ["blocks"]),
            n("Cast", ["exponents"], ["e"], to=TensorProto.FLOAT),
            n("Sub", ["e", "bias"], ["unbiased"]),
            n("Pow", ["two", "unbiased"], ["scale_flat"]),
            n("Reshape", ["scale_flat", "scale_shape"], ["scale"]),
            n("Mul", ["blocks", "scale"], ["scaled"]),
            with_ref(n("Cast", ["scaled"], ["typed"]), "to", onnx.AttributeProto.INT),
            n("Reshape", ["typed", "shape"], ["dense"]),
        ],
        ["n_bits", "shape", "split_shape", "scale_shape", "to"],
    )


_BUILDERS = {
    UNPACK_BITS: (_unpack_bits, ()),
    LUT_TO_DENSE: (lut.lut_to_dense, (UNPACK_BITS,)),
    LUT_GATHER: (lut.lut_gather, ()),
    LUT_GATHER_GROUPED: (lut.lut_gather_grouped, ()),
    LUT_GATHER_TRIPLETS: (lut.lut_gather_triplets, ()),
    LUT_GATHER_BYTES: (lut.lut_gather_bytes, ()),
    LUT_GATHER_OWN_LAYOUT: (lut.lut_gather_own_layout, ()),
    TRIPLET_CODES: (lut.triplet_codes, ()),
    LUT_DEQUANTIZE: (lut.lut_dequantize, ()),
    SPARSE_TO_DENSE: (_sparse_to_dense, (UNPACK_BITS,)),
    SPARSE_GATHER: (_sparse_gather, ()),
    WITH_OUTLIERS: (_with_outliers, ()),
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
    for (domain, _, _), body in model.functions.items():
        if domain == DOMAIN:
            body.opset_imports[""] = opset
