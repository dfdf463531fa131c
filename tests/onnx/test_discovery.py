"""Weight discovery: the op table, pass-through chains, shared constants, compressed weights."""

import warnings

import numpy as np
import onnx_ir as ir
import pytest
from conftest import make_model

import lowbit
from lowbit.kernels.packing import pack_bits
from lowbit.onnx import encoding
from lowbit.weights import moved_axis_perms

F32 = np.float32


def _refs(program):
    return {w.name: w for w in program.weights()}


@pytest.mark.parametrize(
    ("op", "shape", "attrs", "axes"),
    [
        ("Conv", (8, 4, 3, 3), {}, (0, 1)),
        ("ConvTranspose", (4, 8, 3, 3), {}, (1, 0)),
        ("Gemm", (16, 8), {}, (1, 0)),
        ("Gemm", (8, 16), {"transB": 1}, (0, 1)),
        ("MatMul", (16, 8), {}, (1, 0)),
        ("MatMul", (2, 16, 8), {}, (2, 1)),
        ("Gather", (100, 8), {}, (0, 1)),
        ("LSTM", (1, 32, 4), {"hidden_size": 8}, (1, 2)),
        ("GRU", (1, 24, 4), {"hidden_size": 8}, (1, 2)),
        ("RNN", (1, 8, 4), {"hidden_size": 8}, (1, 2)),
    ],
)
def test_op_table_axes(program_of, op, shape, attrs, axes):
    program = program_of({"w": np.ones(shape, F32)}, [(op, "w", attrs)])
    (ref,) = program.weights()
    assert (ref.name, ref.op, ref.shape, ref.dtype) == ("w", op, shape, ir.DataType.FLOAT)
    assert (ref.output_axis, ref.input_axis) == axes
    assert ref.numel == int(np.prod(shape)) and ref.nbytes == 4 * ref.numel and ref.compression is None


def test_gather_on_other_axis_and_non_weight_constants_are_ignored(program_of):
    program = program_of(
        {"table": np.ones((10, 4), F32), "bias": np.ones((4,), F32)},
        [("Gather", "table", {"axis": 1}), ("Add", "bias", {})],
    )
    assert program.weights() == []


def test_follows_cast_and_transpose_to_the_consumer():
    w = ir.Value(name="w16", const_value=ir.tensor(np.ones((8, 16), np.float16)))  # [N, K], transposed later
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 16]))
    cast = ir.node("Cast", [w], {"to": ir.DataType.FLOAT}, name="cast")
    transpose = ir.node("Transpose", [cast.outputs[0]], {"perm": [1, 0]}, name="t")
    matmul = ir.node("MatMul", [x, transpose.outputs[0]], name="mm")
    for node, shape in ((cast, [8, 16]), (transpose, [16, 8])):
        node.outputs[0].shape = ir.Shape(shape)
    matmul.outputs[0].dtype = ir.DataType.FLOAT
    graph = ir.Graph(
        [x], [matmul.outputs[0]], nodes=[cast, transpose, matmul], initializers=[w], opset_imports={"": 17}
    )
    (ref,) = lowbit.Program(ir.Model(graph, ir_version=8)).weights()
    assert ref.name == "w16" and ref.dtype == ir.DataType.FLOAT16
    assert (ref.output_axis, ref.input_axis) == (0, 1)  # MatMul's N axis is axis 0 of the stored [N, K]


def test_shared_constant_agreeing_and_disagreeing(program_of):
    agree = program_of({"w": np.ones((8, 8), F32)}, [("MatMul", "w", {}), ("Gemm", "w", {})])
    (ref,) = agree.weights()
    assert ref.op == "MatMul+Gemm"
    disagree = program_of({"w": np.ones((8, 8), F32)}, [("MatMul", "w", {}), ("Gemm", "w", {"transB": 1})])
    with pytest.warns(UserWarning, match="'w' skipped: its consumers .* disagree"):
        assert disagree.weights() == []


def test_initializer_that_is_also_a_graph_input_is_not_a_weight(program_of):
    program = program_of({"w": np.ones((8, 8), F32)}, [("MatMul", "w", {})])
    program.graph.inputs.append(program.graph.initializers["w"])
    assert program.weights() == []


def test_compressed_weight_is_reported_with_its_encoding(program_of):
    program = program_of({"w": np.ones((32, 16), F32)}, [("MatMul", "w", {})])
    weight = program.graph.initializers["w"]
    _forward, back = moved_axis_perms(2, 1)
    encoding.write_lut(
        program.model,
        weight,
        packed=pack_bits(np.zeros(32 * 16, int), 4),
        lut=np.zeros((2, 16, 1), F32),
        scale=None,
        n_bits=4,
        canonical_shape=[16, 32],
        perm=back,
    )
    (ref,) = program.weights()
    assert ref.name == "w" and ref.shape == (32, 16) and ref.compression == "palettized 4-bit, 2 LUT(s)"
    assert ref.nbytes == 32 * 16 // 2 + 2 * 16 * 4  # codes + two LUTs (LutGatherGrouped: no scale input)
    assert ref.bits_per_weight == pytest.approx(8 * ref.nbytes / (32 * 16))


def test_constant_node_weights_are_found(tmp_path):
    model = make_model({}, [])
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 8]))
    const = ir.node("Constant", [], {"value": ir.tensor(np.ones((8, 4), F32), name="c")}, name="c")
    const.outputs[0].name = "c"
    mm = ir.node("MatMul", [x, const.outputs[0]], name="mm")
    mm.outputs[0].dtype = ir.DataType.FLOAT
    model.graph.inputs.append(x)
    model.graph.extend([const, mm])
    model.graph.outputs.append(mm.outputs[0])
    ir.save(model, tmp_path / "c.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (ref,) = lowbit.load(tmp_path / "c.onnx").weights()
    assert ref.name == "c" and ref.shape == (8, 4)
