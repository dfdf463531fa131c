"""``target="onnxruntime"``: weights kept compressed in ONNX Runtime's fused kernels (MatMulNBits,
GatherBlockQuantized) hold exactly the values of the portable encoding, run in ONNX Runtime, and read back."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model

import lowbit
from lowbit.cli import main
from lowbit.onnx.fused import MS_DOMAIN

RNG = np.random.default_rng(7)
QUANTIZE = [
    dict(dtype="int4", granularity="per_block"),
    dict(dtype="int4", granularity="per_block", qscheme="asymmetric", block_size=64),
    dict(dtype="uint4", granularity="per_block", block_size=16),
    dict(dtype="int8"),
    dict(dtype="uint8", qscheme="asymmetric"),
    dict(dtype="int8", granularity="per_tensor"),
    dict(dtype="int8", granularity="per_block", block_size=128),
]
PALETTIZE = [
    dict(lut_dtype="int8"),
    dict(lut_dtype="uint8", n_bits=2),
    dict(lut_dtype="int8", n_bits=8),
    dict(lut_dtype="int8", n_bits=1),
    dict(lut_dtype="int8", granularity="per_grouped_channel", group_size=16),
    dict(lut_dtype="uint8", granularity="per_channel"),
]


def _program(dtype=np.float32) -> lowbit.Program:
    weights = {
        "w": (RNG.standard_normal((256, 96)) * 0.05).astype(dtype),
        "emb": (RNG.standard_normal((320, 128)) * 0.05).astype(dtype),
    }
    return lowbit.Program(make_model(weights, [("MatMul", "w", {}), ("Gather", "emb", {})]))


def _compress(program, kwargs, target):
    if "lut_dtype" in kwargs:
        return lowbit.palettize_weights(program, target=target, num_kmeans_workers=1, **kwargs)
    return lowbit.quantize_weights(program, target=target, **kwargs)


def _dense(program) -> dict[str, np.ndarray]:
    inits = lowbit.decompress_weights(program).graph.initializers
    return {name: inits[name].const_value.numpy() for name in ("w", "emb")}


def _run(path, dtype=np.float32):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 256)).astype(dtype)
    feeds = {"x0": x, "x1": np.array([0, 7, 299, 7])}
    return session.run(None, feeds)


@pytest.mark.parametrize("kwargs", QUANTIZE + PALETTIZE, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_fused_kernels_hold_the_portable_values_and_run(kwargs, tmp_path):
    program = _program()
    fused = _compress(program, kwargs, "onnxruntime")
    portable = _compress(program, kwargs, "portable")
    ops = {(n.domain, n.op_type) for n in fused.graph}
    assert {(MS_DOMAIN, "MatMulNBits"), (MS_DOMAIN, "GatherBlockQuantized")} <= ops
    assert not {n.op_type for n in fused.graph} & {"MatMul", "Gather"}
    dense, reference = _dense(fused), _dense(portable)
    for name in dense:
        np.testing.assert_array_equal(dense[name], reference[name])
    got = _run(fused.save(tmp_path / "fused.onnx"))
    expected = _run(lowbit.decompress_weights(fused).save(tmp_path / "dense.onnx"))
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)  # MatMulNBits, activations in float
    np.testing.assert_array_equal(got[1], expected[1])


def test_weights_the_kernels_cannot_take_keep_the_portable_encoding():
    weights = {
        "conv": (RNG.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32),
        "odd": (RNG.standard_normal((100, 64)) * 0.1).astype(np.float32),  # no power-of-two block divides 100
    }
    program = lowbit.Program(make_model(weights, [("Conv", "conv", {}), ("MatMul", "odd", {})]))
    out = lowbit.quantize_weights(program, dtype="int8", target="onnxruntime")
    assert not any(n.domain == MS_DOMAIN for n in out.graph)
    assert sum(n.op_type == "DequantizeLinear" for n in out.graph) == 2
    notes = {r.name: r.note for r in out.report.rows}  # each fallback is said, with its reason, per weight
    assert notes["conv"] == (
        "portable encoding, no onnxruntime kernel: a 4-D weight (the kernels take 2-D MatMul / Gather weights)"
    )
    assert notes["odd"].startswith("portable encoding, no onnxruntime kernel: the kernels take int4 / int8 codes")
    assert "compressed; portable encoding, no onnxruntime kernel: a 4-D weight" in out.report.table()
    block20 = lowbit.quantize_weights(
        _program(), dtype="int4", granularity="per_block", block_size=20, target="onnxruntime"
    )
    assert not any(n.domain == MS_DOMAIN for n in block20.graph)
    assert all("blocks of a power of two" in r.note for r in block20.report.rows)
    gemm = lowbit.Program(make_model({"w": weights["odd"]}, [("Gemm", "w", {})]))
    palettized = lowbit.palettize_weights(gemm, n_bits=4, lut_dtype="int8", target="onnxruntime")
    assert palettized.report.rows[0].note.endswith(
        "read by Gemm (input 1), not as a MatMul right operand or an axis-0 Gather table"
    )
    portable = lowbit.quantize_weights(lowbit.Program(make_model(weights, [("Conv", "conv", {})])), dtype="int8")
    assert portable.report.rows[0].note is None  # the portable target asked for nothing else


def test_fp16_weights(tmp_path):
    program = _program(np.float16)
    for kwargs in (dict(dtype="int4", granularity="per_block"), dict(lut_dtype="int8")):
        out = _compress(program, kwargs, "onnxruntime")
        assert {n.op_type for n in out.graph} >= {"MatMulNBits", "GatherBlockQuantized"}
        dense, reference = _dense(out), _dense(_compress(program, kwargs, "portable"))
        assert all(np.array_equal(dense[name], reference[name]) for name in dense)
        got = _run(out.save(tmp_path / "fused.onnx"), np.float16)
        expected = _run(lowbit.decompress_weights(out).save(tmp_path / "dense.onnx"), np.float16)
        np.testing.assert_allclose(got[0].astype(np.float32), expected[0], rtol=0, atol=4e-3)  # fp16 sums
        np.testing.assert_array_equal(got[1], expected[1])


def test_int8_lut_stays_8_bit_in_onnx_runtime_and_portable_one_folds(tmp_path):
    program = _program()
    fused = lowbit.palettize_weights(program, lut_dtype="int8", target="onnxruntime")
    portable = lowbit.palettize_weights(program, lut_dtype="int8")
    for name, model in (("fused", fused), ("portable", portable)):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
        ort.InferenceSession(str(model.save(tmp_path / f"{name}.onnx")), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(tmp_path / f"{name}.opt.onnx")
        left = {n.op_type for n in optimized.graph.node}
        assert not left & {"LutGather", "LutDequantize"}, left  # every decode folded at load
        types = {i.name: i.data_type for i in optimized.graph.initializer}
        if name == "fused":
            assert left == {"MatMulNBits", "GatherBlockQuantized"}
            assert types["w"] == types["emb"] == onnx.TensorProto.UINT8  # one byte per weight in RAM
        else:
            assert types["w"] == types["emb"] == onnx.TensorProto.FLOAT


def test_inspect_second_pass_and_cli(tmp_path, capsys):
    source = _program().save(tmp_path / "in.onnx")
    assert main(["quantize", str(source), str(tmp_path / "q.onnx"), "--dtype", "int4", "--granularity",
                 "per-block", "--target", "onnxruntime"]) == 0  # fmt: skip
    refs = {ref.name: ref for ref in lowbit.load(tmp_path / "q.onnx").weights()}
    assert refs["w"].op == "MatMulNBits" and refs["w"].shape == (256, 96)
    assert refs["emb"].compression == "GatherBlockQuantized 4-bit, block 32"
    assert 4.0 < refs["w"].bits_per_weight < 5.1
    with pytest.warns(UserWarning, match="'w' skipped: already compressed"):
        again = lowbit.palettize_weights(lowbit.load(tmp_path / "q.onnx"), n_bits=2)
    assert all(row.skipped and row.skipped.startswith("already compressed") for row in again.report.rows)
    assert main(["decompress", str(tmp_path / "q.onnx"), str(tmp_path / "d.onnx")]) == 0
    assert {n.op_type for n in onnx.load(tmp_path / "d.onnx").graph.node} == {"MatMul", "Gather"}
    capsys.readouterr()
    assert main(["palettize", str(source), str(tmp_path / "p.onnx"), "--target", "tflite"]) == 2
    assert "target must be one of {portable, onnxruntime, onnxruntime-int8}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="target must be one of"):
        lowbit.quantize_weights(_program(), dtype="int8", target="ort")


def test_int8_activation_target_trades_exactness_for_speed(tmp_path):
    program = _program()
    exact = lowbit.quantize_weights(program, dtype="int8", target="onnxruntime")
    fast = lowbit.quantize_weights(program, dtype="int8", target="onnxruntime-int8")
    levels = {n.attributes["accuracy_level"].as_int() for m in (exact, fast) for n in m.graph if n.domain == MS_DOMAIN
              and n.op_type == "MatMulNBits"}  # fmt: skip
    assert levels == {0, 4}
    reference = _run(lowbit.decompress_weights(exact).save(tmp_path / "dense.onnx"))[0]
    errors = [
        np.linalg.norm(_run(m.save(tmp_path / f"{i}.onnx"))[0] - reference) / np.linalg.norm(reference)
        for i, m in enumerate((exact, fast))
    ]
    assert errors[0] < 1e-6 < 1e-4 < errors[1] < 5e-2, errors  # int8 activations: measurably, boundedly off


def test_shared_and_subgraph_weights_decompress_and_report_once(tmp_path):
    import onnx_ir as ir

    w = (RNG.standard_normal((64, 32)) * 0.1).astype(np.float32)
    model = make_model({"w": w}, [("MatMul", "w", {}), ("MatMul", "w", {})])
    x = ir.Value(name="xb", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None, 64]))

    def branch(name: str) -> ir.Graph:  # a branch that reads the main graph's weight
        inner = ir.node("MatMul", [x, model.graph.initializers["w"]], name=name)
        inner.outputs[0].name, inner.outputs[0].dtype = f"{name}.y", ir.DataType.FLOAT
        return ir.Graph([], [inner.outputs[0]], nodes=[inner], name=name)

    cond = ir.Value(name="cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    branches = {"then_branch": branch("then"), "else_branch": branch("else")}
    node = ir.node("If", [cond], branches, num_outputs=1, name="if")
    node.outputs[0].name, node.outputs[0].dtype = "yif", ir.DataType.FLOAT
    model.graph.inputs.extend([cond, x])
    model.graph.append(node)
    model.graph.outputs.append(node.outputs[0])
    program = lowbit.Program(model)
    fused = lowbit.quantize_weights(program, dtype="int4", granularity="per_block", block_size=16, target="onnxruntime")
    assert fused.graph.opset_imports[""] == 17  # only fused kernels: no opset raise for DequantizeLinear
    refs = fused.weights()
    assert [ref.name for ref in refs] == ["w"] and refs[0].nbytes == 64 * 32 // 2 + 4 * 32 * 4  # codes + scales
    dense = lowbit.decompress_weights(fused)
    assert not any(n.domain == MS_DOMAIN for n in ir.traversal.RecursiveGraphIterator(dense.graph))
    np.testing.assert_array_equal(
        dense.graph.initializers["w"].const_value.numpy(),
        lowbit.decompress_weights(lowbit.quantize_weights(program, dtype="int4", granularity="per_block",
                                                          block_size=16)).graph.initializers["w"].const_value.numpy(),
    )  # fmt: skip
    feeds = {"x0": np.ones((2, 64), np.float32), "x1": np.ones((2, 64), np.float32), "cond": np.array(True),
             "xb": np.ones((2, 64), np.float32)}  # fmt: skip
    got = ort.InferenceSession(str(fused.save(tmp_path / "f.onnx")), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    want = ort.InferenceSession(str(dense.save(tmp_path / "d.onnx")), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    lowbit.quantize_weights(dense, dtype="int8")  # the decompressed program is whole


def test_fused_nodes_lowbit_does_not_write_are_left_alone():
    import onnx_ir as ir

    model = make_model({"w": (RNG.standard_normal((64, 32)) * 0.1).astype(np.float32)}, [("MatMul", "w", {})])
    out = lowbit.quantize_weights(lowbit.Program(model), dtype="int4", granularity="per_block", target="onnxruntime")
    node = next(n for n in out.graph if n.op_type == "MatMulNBits")
    bias = ir.Value(name="bias", const_value=ir.tensor(np.ones(32, np.float32)))
    out.graph.register_initializer(bias)
    node.resize_inputs(6)
    node.replace_input_with(5, bias)  # a bias lowbit never writes: not lowbit's layout
    assert out.weights() == [] and lowbit.decompress_weights(out).graph.node(0).op_type == "MatMulNBits"


def test_opset_follows_what_is_written():
    program = _program(np.float16)  # an fp16 LUT scale: Cast/Mul in lowbit.LutDequantize, no opset 19 needed
    assert lowbit.palettize_weights(program, lut_dtype="int8").graph.opset_imports[""] == 17
    weights = {"w": (RNG.standard_normal((256, 96)) * 0.05).astype(np.float32),
               "c": (RNG.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32)}  # fmt: skip
    mixed = lowbit.Program(make_model(weights, [("MatMul", "w", {}), ("Conv", "c", {})]))
    out = lowbit.quantize_weights(mixed, dtype="int4", granularity="per_block", block_size=16, target="onnxruntime")
    assert out.graph.opset_imports[""] == 21  # the Conv's int4 DequantizeLinear needs it
    assert {n.op_type for n in out.graph} >= {"MatMulNBits", "DequantizeLinear"}
