"""What lowbit's decode functions are built from: the domain and function names, and the helpers and body fragments
the function bodies (:mod:`lowbit.onnx.functions`, :mod:`lowbit.onnx.lut_functions`) share."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
WITH_OUTLIERS = "WithOutliers"
MX_DEQUANTIZE = "MxDequantize"


def const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def const_ref(name: str, attr: str, attr_type: onnx.AttributeProto.AttributeType, as_attr: str) -> onnx.NodeProto:
    """Constant whose value is the calling node's attribute ``attr``."""
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(helper.make_attribute_ref(as_attr, attr_type))
    node.attribute[0].ref_attr_name = attr
    return node


def with_ref(node: onnx.NodeProto, name: str, attr_type: onnx.AttributeProto.AttributeType) -> onnx.NodeProto:
    ref = helper.make_attribute_ref(name, attr_type)
    node.attribute.append(ref)
    return node


def function(name: str, inputs: list[str], outputs: list[str], nodes: list, attributes: list[str]):
    return helper.make_function(
        DOMAIN,
        name,
        inputs,
        outputs,
        nodes,
        opset_imports=[helper.make_opsetid("", FUNCTION_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        attributes=attributes,
    )


def byte_fields() -> list:
    """Nodes computing ``fields[int32, 256, 8 / n_bits]``: the codes each of the 256 byte values holds (low bits
    first), from the calling node's ``n_bits`` (which must divide 8)."""
    n = helper.make_node
    return [
        const_ref("nbits", "n_bits", onnx.AttributeProto.INT, "value_int"),
        const("zero", np.array(0, np.int64)),
        const("one", np.array(1, np.int64)),
        const("eight", np.array(8, np.int64)),
        const("byte_count", np.array(256, np.int64)),
        const("axis1", np.array([1], np.int64)),
        const("minus1", np.array([-1], np.int64)),
        const("one_u64", np.array(1, np.uint64)),
        n("Range", ["zero", "byte_count", "one"], ["byte_values"]),
        n("Cast", ["byte_values"], ["bytes8"], to=TensorProto.UINT8),
        n("Unsqueeze", ["bytes8", "axis1"], ["byte_column"]),
        n("Range", ["zero", "eight", "nbits"], ["offsets"]),
        n("Cast", ["offsets"], ["offsets8"], to=TensorProto.UINT8),
        n("BitShift", ["byte_column", "offsets8"], ["shifted"], direction="RIGHT"),
        n("Cast", ["shifted"], ["shifted32"], to=TensorProto.INT32),
        *powers_of_two("nbits", "levels", TensorProto.INT32),
        n("Mod", ["shifted32", "levels"], ["fields"]),
    ]


def powers_of_two(exponents: str, out: str, to: int) -> list:
    """Nodes computing ``out = 2 ** exponents`` (int64 exponents) as type ``to``; needs ``one_u64`` defined."""
    n = helper.make_node
    return [
        n("Cast", [exponents], [f"{exponents}_u64"], to=TensorProto.UINT64),
        n("BitShift", ["one_u64", f"{exponents}_u64"], [f"{out}_u64"], direction="LEFT"),
        n("Cast", [f"{out}_u64"], [out], to=to),
    ]


def byte_table_values(table: str, packed: str, values: str) -> list:
    """Nodes after :func:`byte_fields`: ``values[bytes, 8 / n_bits]`` = the codes of ``packed`` (uint8) looked up
    in the 1-D ``table``, through the table of the 256 bytes' values. The codes must fill the bytes exactly (the
    caller reshapes ``values`` straight to the weight: every full-size intermediate costs ONNX Runtime its size
    in memory while it folds the body, so there is no flatten-and-slice)."""
    n = helper.make_node
    return [
        n("Gather", [table, "fields"], ["byte_table"], axis=0),
        n("Cast", [packed], ["bytes32"], to=TensorProto.INT32),
        n("Gather", ["byte_table", "bytes32"], [values], axis=0),
    ]


def group_tables() -> list:
    """Nodes after :func:`byte_fields`: ``table[G * 256, 8 / n_bits]``, the values of the 256 bytes under each of
    the ``G`` scalar LUTs of ``lut[G, K, 1]`` (group g's rows from ``g * 256``); also defines ``groups1`` ([G]),
    ``by_group`` ([G, -1]), ``per_byte1`` and the index constants ``idx0`` / ``idx1``."""
    n = helper.make_node
    return [
        const("idx0", np.array([0], np.int64)),
        const("idx1", np.array([1], np.int64)),
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
