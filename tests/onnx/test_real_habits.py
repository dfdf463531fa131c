"""Graph-path edge cases met on users' real files: opset upgrades that keep functions, bf16 weights, name
collisions, weights inside or used by If/Loop/Scan bodies, IR 3 models, tiny fp32 weights, a second pass.

Each test checks what a user needs of the output: ``onnx.checker`` passes, ONNX Runtime loads it, and ORT's output
equals the output of the same model decompressed by lowbit."""

from __future__ import annotations

import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import ort_session
from onnx import TensorProto, helper, numpy_helper

import lowbit

RNG = np.random.default_rng(0)


def _w(shape, dtype=np.float32, scale=0.1) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(dtype)


def _load(model: onnx.ModelProto, tmp_path: Path, name: str = "m.onnx") -> lowbit.Program:
    path = tmp_path / name
    onnx.save(model, path)
    return lowbit.load(path)


def _check_runs_like_decompressed(program: lowbit.Program, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """checker + ORT (no folding and folding) == ORT on lowbit's decompressed model (to float32 rounding; the
    decode itself is bit-exact, tests/onnx/test_encoding.py); returns the outputs."""
    proto = ir.serde.serialize_model(program.model)
    onnx.checker.check_model(proto, full_check=True)
    dense = lowbit.decompress_weights(program)
    onnx.checker.check_model(ir.serde.serialize_model(dense.model), full_check=True)
    assert not [w for w in dense.weights() if w.compression], "decompress left a compressed weight"
    want = ort_session(dense.model, "disable").run(None, feeds)
    for level in ("disable", "basic"):
        got = ort_session(program.model, level).run(None, feeds)
        for g, w in zip(got, want, strict=True):  # MatMul over a constant runs prepacked: other summation order
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    return want


PASSES = {
    "palettize-4": lambda p: lowbit.palettize_weights(p, n_bits=4),
    "palettize-grouped": lambda p: lowbit.palettize_weights(
        p, n_bits=2, granularity="per_grouped_channel", group_size=8
    ),
    "palettize-scaled-int8-lut": lambda p: lowbit.palettize_weights(p, enable_per_channel_scale=True, lut_dtype="int8"),
    "palettize-vector": lambda p: lowbit.palettize_weights(p, n_bits=2, cluster_dim=2),
    "int8": lambda p: lowbit.quantize_weights(p, dtype="int8"),
    "uint8-asym-tensor": lambda p: lowbit.quantize_weights(p, "uint8", qscheme="asymmetric", granularity="per_tensor"),
    "int4-block": lambda p: lowbit.quantize_weights(p, dtype="int4", granularity="per_block", block_size=16),
    "fp8": lambda p: lowbit.quantize_weights(p, dtype="fp8_e4m3fn"),
    "mxfp4": lambda p: lowbit.quantize_weights(p, dtype="fp4_e2m1fn", granularity="per_block", block_size=32),
    "sparse": lambda p: lowbit.sparsify_weights(p, target_sparsity=0.5),
    "sparse-int8": lambda p: lowbit.sparsify_weights(p, target_sparsity=0.5, quantize_dtype="int8"),
    "sparse-lut": lambda p: lowbit.sparsify_weights(p, target_sparsity=0.5, palettize_nbits=4),
}


def _compress(program: lowbit.Program, name: str) -> lowbit.Program:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here may be skipped
        return PASSES[name](program)


# ------------------------------------------------------------------------------------------- opset upgrades


def _embedding_and_matmul(opset: int, functions=(), extra_nodes=(), ir_version: int = 8) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h0"]),
        helper.make_node("MatMul", ["h0", "W"], ["h1"]),
        *extra_nodes,
    ]
    out = nodes[-1].output[0]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(_w((300, 64)), "E"), numpy_helper.from_array(_w((64, 32)), "W")],
    )
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(f.domain, 1) for f in functions]
    return helper.make_model(graph, opset_imports=imports, functions=list(functions), ir_version=ir_version)


IDS = {"ids": np.array([1, 7, 299], np.int64)}


def test_opset_upgrade_keeps_lowbit_functions_of_an_earlier_pass(tmp_path):
    program = _load(_embedding_and_matmul(17), tmp_path)
    first = lowbit.palettize_weights(program, weight_num_threshold=64 * 32)  # the embedding only
    assert [r.name for r in first.report.compressed] == ["E"]
    with pytest.warns(UserWarning, match=r"'E' skipped: already compressed \(palettized 4-bit"):
        second = lowbit.quantize_weights(first, dtype="int4", granularity="per_block", block_size=32)
    assert [r.name for r in second.report.compressed] == ["W"]
    assert second.graph.opset_imports[""] == 21
    _check_runs_like_decompressed(second, IDS)


def test_opset_upgrade_keeps_the_users_functions(tmp_path):
    double = helper.make_function(
        "user", "Double", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])], [helper.make_opsetid("", 13)]
    )
    model = _embedding_and_matmul(17, [double], [helper.make_node("Double", ["h1"], ["h2"], domain="user")])
    program = _load(model, tmp_path)
    out = lowbit.quantize_weights(program, dtype="int4", granularity="per_block", block_size=32)
    assert ("user", "Double", "") in out.model.functions
    _check_runs_like_decompressed(out, IDS)


def test_opset_upgrade_converts_the_users_function_bodies(tmp_path):
    # Split's "split" moved from attribute to input in opset 13 and num_outputs came in 18
    split = helper.make_function(
        "user",
        "Halves",
        ["x"],
        ["a", "b"],
        [helper.make_node("Split", ["x"], ["a", "b"], axis=-1)],
        [helper.make_opsetid("", 11)],
    )
    model = _embedding_and_matmul(11, [split], [helper.make_node("Halves", ["h1"], ["h2", "h3"], domain="user")])
    program = _load(model, tmp_path)
    out = lowbit.quantize_weights(program, dtype="int4", granularity="per_block", block_size=32)
    _check_runs_like_decompressed(out, IDS)


@pytest.mark.parametrize("compress", ["palettize-4", "sparse", "int8", "sparse-lut"])
def test_opset_11_models_are_upgraded_by_every_pass(tmp_path, compress):
    program = _load(_embedding_and_matmul(11, ir_version=6), tmp_path)
    out = _compress(program, compress)
    assert len(out.report.compressed) == 2
    assert out.graph.opset_imports[""] >= 13
    _check_runs_like_decompressed(out, IDS)


def test_nothing_to_compress_leaves_opset_and_ir_version_alone(tmp_path):
    program = _load(_embedding_and_matmul(11, ir_version=6), tmp_path)
    out = lowbit.quantize_weights(program, dtype="int4", granularity="per_block", weight_num_threshold=10**6)
    assert not out.report.compressed
    assert out.graph.opset_imports[""] == 11 and out.model.ir_version == 6
    out = lowbit.palettize_weights(program, weight_num_threshold=10**6)
    assert out.graph.opset_imports[""] == 11 and out.model.ir_version == 6


# ------------------------------------------------------------------------------------------------- bf16 weights


def _bf16_model() -> onnx.ModelProto:
    """bf16 weights cast to fp32 for a MatMul and a Conv: a model ONNX Runtime's CPU provider runs."""
    w = numpy_helper.from_array(_w((64, 48)).astype(ml_dtypes.bfloat16), "W")
    k = numpy_helper.from_array(_w((32, 32, 3, 3)).astype(ml_dtypes.bfloat16), "K")
    nodes = [
        helper.make_node("Cast", ["W"], ["W32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "W32"], ["y"]),
        helper.make_node("Cast", ["K"], ["K32"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["z", "K32"], ["c"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 32, 4, 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 32, 4, 4]),
        ],
        [w, k],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("compress", sorted(PASSES))
def test_bf16_weights_decode_in_a_type_ort_runs(tmp_path, compress):
    program = _load(_bf16_model(), tmp_path)
    out = _compress(program, compress)
    assert [r.name for r in out.report.compressed] == ["W", "K"]
    feeds = {"x": _w((2, 64), scale=1.0), "z": _w((1, 32, 4, 4), scale=1.0)}
    _check_runs_like_decompressed(out, feeds)
    dense = lowbit.decompress_weights(out)
    assert {w.name: w.dtype for w in dense.weights()} == {"W": ir.DataType.BFLOAT16, "K": ir.DataType.BFLOAT16}
    for program in (out, lowbit.load(out.save(tmp_path / "out.onnx"))):  # in memory and from the file
        with pytest.warns(UserWarning, match="already compressed"):
            again = lowbit.palettize_weights(program)  # a second pass sees them as compressed
        assert not again.report.compressed and len(again.report.rows) == 2
        assert {w.name: w.dtype for w in again.weights()} == {"W": ir.DataType.BFLOAT16, "K": ir.DataType.BFLOAT16}


# ------------------------------------------------------------------------------------------------ name clashes


def test_generated_names_never_clash_with_the_models_own(tmp_path):
    taken = ["W.indices", "W.scale", "W.lut", "lowbit.one.float32", "W.LutToDense", "W.quantized", "W.mask"]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"])]
    for name in taken:  # values of the model that happen to carry the names lowbit would generate
        nodes.append(helper.make_node("Identity", [nodes[-1].output[0]], [name]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info(taken[-1], TensorProto.FLOAT, [2, 32])],
        [numpy_helper.from_array(_w((64, 32)), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": _w((2, 64), scale=1.0)}
    for compress in ("palettize-4", "palettize-scaled-int8-lut", "int8", "sparse-lut", "mxfp4"):
        out = _compress(_load(model, tmp_path), compress)
        assert len(out.report.compressed) == 1
        _check_runs_like_decompressed(out, feeds)


# -------------------------------------------------------------------------------------------- If / Loop / Scan


def _control_flow_model() -> onnx.ModelProto:
    """Weights met in control flow: a main-graph ``W`` used in an If branch, ``V`` an else-branch initializer,
    ``U`` a Constant node in a Loop body, ``L`` a loop-carried weight passed through the body unchanged, ``S`` a
    Scan body initializer."""
    f32 = TensorProto.FLOAT

    def info(name, shape=None):
        return helper.make_tensor_value_info(name, f32, shape)

    then_branch = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [], [info("t", [2, 64])])
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "V"], ["e"])],
        "else",
        [],
        [info("e", [2, 64])],
        [numpy_helper.from_array(_w((64, 64)), "V")],
    )
    body = helper.make_graph(
        [
            helper.make_node("Constant", [], ["U"], value=numpy_helper.from_array(_w((64, 64)), "U")),
            helper.make_node("MatMul", ["h_in", "U"], ["a"]),
            helper.make_node("MatMul", ["a", "l_in"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["l_in"], ["l_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            info("h_in", [2, 64]),
            info("l_in", [64, 64]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), info("h_out", [2, 64]), info("l_out")],
    )
    scan_body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "S"], ["y_t"]), helper.make_node("Add", ["s_in", "y_t"], ["s_out"])],
        "scan_body",
        [info("s_in", [64]), info("x_t", [64])],
        [info("s_out", [64]), info("y_t", [64])],
        [numpy_helper.from_array(_w((64, 64)), "S")],
    )
    nodes = [
        helper.make_node("If", ["c"], ["h"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Loop", ["trips", "", "h", "L"], ["hf", "lf"], body=body),
        helper.make_node("ReduceMax", ["hf"], ["s0"], axes=[0], keepdims=0),
        helper.make_node("Scan", ["s0", "hf"], ["sf", "ys"], body=scan_body, num_scan_inputs=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), info("x", [2, 64])],
        [info("sf", [64]), info("ys", [2, 64])],
        [
            numpy_helper.from_array(_w((64, 64)), "W"),
            numpy_helper.from_array(_w((64, 64)), "L"),
            numpy_helper.from_array(np.array(2, np.int64), "trips"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("compress", ["palettize-4", "palettize-grouped", "int8", "int4-block", "sparse-int8", "mxfp4"])
def test_weights_in_and_around_control_flow(tmp_path, compress):
    program = _load(_control_flow_model(), tmp_path)
    assert sorted(w.name for w in program.weights()) == ["L", "S", "U", "V", "W"]
    out = _compress(program, compress)
    assert sorted(r.name for r in out.report.compressed) == ["L", "S", "U", "V", "W"]
    for branch in (True, False):
        _check_runs_like_decompressed(out, {"c": np.array(branch), "x": _w((2, 64), scale=1.0)})
    path = out.save(tmp_path / "out.onnx")
    reloaded = lowbit.load(path)
    assert all(w.compression for w in reloaded.weights())


# ---------------------------------------------------------------------------------------------------- IR 3


def test_ir3_initializers_listed_as_inputs_are_constants(tmp_path):
    w = numpy_helper.from_array(_w((64, 32)), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
            helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 32]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    program = _load(model, tmp_path)
    assert [w.name for w in program.weights()] == ["W"]
    for compress in ("palettize-4", "int8", "sparse"):
        out = _compress(program, compress)
        assert [r.name for r in out.report.compressed] == ["W"]
        assert [v.name for v in out.graph.inputs] == ["x"]
        _check_runs_like_decompressed(out, {"x": _w((2, 64), scale=1.0)})


# ------------------------------------------------------------------------------------- ORT's folding limit


def test_a_decode_ort_would_run_on_every_inference_is_warned(monkeypatch):
    from lowbit.onnx import encoding

    monkeypatch.setattr(encoding, "ORT_FOLDING_LIMIT_BYTES", 8 * 1024)  # stands in for 1 GiB
    w = _w((64, 48))  # 12 KiB dense
    program = lowbit.Program(ir.serde.deserialize_model(_embedding_and_matmul(17)))
    program.graph.initializers["W"].const_value = ir.tensor(w)
    with pytest.warns(UserWarning, match=r"weight 'W': decoded it takes .* ONNX Runtime will decode it on every run"):
        lowbit.palettize_weights(program, configs={"op_type_configs": {"Gather": None}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DequantizeLinear: fused or dequantized by ORT's design, never folded
        lowbit.quantize_weights(program, dtype="int8", configs={"op_type_configs": {"Gather": None}})


def test_a_users_cast_of_a_compressed_weight_stays_the_users(tmp_path):
    """fp16 W -> the user's Cast to float -> MatMul: after palettizing, the Cast reads the decode's output but is not
    part of it; decompressing gives W back as fp16 with the user's Cast in place."""
    w = numpy_helper.from_array(_w((64, 48)).astype(np.float16), "W")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "Wf"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])],
        [w],
    )
    program = _load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path)
    out = lowbit.palettize_weights(program)
    for compressed in (out, lowbit.load(out.save(tmp_path / "out.onnx"))):
        assert [(r.name, r.dtype) for r in compressed.weights()] == [("W", ir.DataType.FLOAT16)]
        dense = lowbit.decompress_weights(compressed)
        assert [n.op_type for n in dense.graph] == ["Cast", "MatMul"]
        assert dense.graph.initializers["W"].const_value.dtype == ir.DataType.FLOAT16
