"""Program: load / save (atomic, external data, IR version) / optimize / copy."""

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import make_model, ort_session, peak_rss_anon, save_model

import lowbit

MIB = 1 << 20


def _matmul_program(tmp_path: Path, name="m.onnx", n=64) -> Path:
    w = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return save_model(make_model({"w": w}, [("MatMul", "w", {})]), tmp_path / name)


def test_load_save_round_trip_keeps_ir_version_and_opset(tmp_path):
    src = save_model(
        make_model({"w": np.ones((8, 8), np.float32)}, [("MatMul", "w", {})], ir_version=7),
        tmp_path / "a.onnx",
    )
    out = lowbit.load(src).save(tmp_path / "b.onnx")
    proto = onnx.load(out)
    assert proto.ir_version == 7
    assert {o.domain: o.version for o in proto.opset_import} == {"": 17}
    x = np.ones((2, 8), np.float32)
    assert np.array_equal(ort_session(out).run(None, {"x0": x})[0], x @ np.ones((8, 8), np.float32))


def test_save_over_the_input_is_atomic(tmp_path, monkeypatch):
    src = _matmul_program(tmp_path)
    before = src.read_bytes()
    program = lowbit.load(src)

    def broken_save(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        program.save(src)
    assert src.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind
    expected = program.graph.initializers["w"].const_value.numpy().copy()
    monkeypatch.undo()
    program.save(src)
    assert np.array_equal(lowbit.load(src).graph.initializers["w"].const_value.numpy(), expected)


def test_external_data_round_trip_and_overwrite_in_place(tmp_path):
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    model = make_model({"w": w}, [("MatMul", "w", {})])
    src = tmp_path / "ext.onnx"
    ir.save(model, src, external_data="ext.onnx.data")
    program = lowbit.load(src)
    assert isinstance(program.graph.initializers["w"].const_value, ir.ExternalTensor)
    out = program.save(src)  # same path: data file replaced atomically, program still readable
    assert (tmp_path / "ext.onnx.data").is_file()
    assert np.array_equal(program.graph.initializers["w"].const_value.numpy(), w)
    assert np.array_equal(lowbit.load(out).graph.initializers["w"].const_value.numpy(), w)
    inline = program.save(tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    assert np.array_equal(lowbit.load(inline).graph.initializers["w"].const_value.numpy(), w)


def test_optimize_removes_dead_code_and_dedupes():
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    model = make_model(
        {"a": w, "b": w.copy(), "dead": np.ones(4, np.float32)}, [("MatMul", "a", {}), ("MatMul", "b", {})]
    )
    dead = ir.node("Relu", [model.graph.initializers["dead"]], name="dead_relu")
    model.graph.append(dead)
    program = lowbit.Program(model).optimize()
    assert set(program.graph.initializers) == {"a"}
    assert [n.op_type for n in program.graph] == ["MatMul", "MatMul"]


def test_copy_is_independent_and_shares_weight_bytes(tmp_path):
    big = np.random.default_rng(0).standard_normal((64, 1024 * 1024 // 4 * 4)).astype(np.float32)  # 256 MiB
    src = save_model(make_model({"w": big}, [("MatMul", "w", {})]), tmp_path / "big.onnx")
    del big
    program = lowbit.load(src)
    program.graph.initializers["w"].const_value.numpy()  # bring the bytes in once
    with peak_rss_anon() as grew:
        clone = program.copy()
    assert grew[0] < 32 * MIB, f"copy() grew anonymous RSS by {grew[0] / MIB:.0f} MiB"
    clone.graph.initializers["w"].name = "renamed"
    clone.graph.remove(clone.graph.node(0), safe=False)
    assert "w" in program.graph.initializers and len(program.graph) == 1


def test_save_and_reload_over_2gb_external_without_reading_it(tmp_path):
    """A model with 2.25 GB of external data (a sparse file) saves and reloads without copying it into memory."""
    chunk = 256 * MIB
    shape = (chunk // 4,)
    data = tmp_path / "huge.onnx.data"
    count = 9  # 9 x 256 MiB = 2.25 GiB
    with open(data, "wb") as f:
        f.truncate(chunk * count)
    inits = []
    for i in range(count):
        tensor = ir.ExternalTensor(
            "huge.onnx.data",
            offset=i * chunk,
            length=chunk,
            dtype=ir.DataType.FLOAT,
            shape=ir.Shape(shape),
            name=f"w{i}",
            base_dir=tmp_path,
        )
        inits.append(ir.Value(name=f"w{i}", const_value=tensor))
    graph = ir.Graph([], [], nodes=[], initializers=inits, opset_imports={"": 17}, name="huge")
    for v in inits:
        node = ir.node("Identity", [v], name=f"id_{v.name}")
        node.outputs[0].name = f"y_{v.name}"
        node.outputs[0].dtype = ir.DataType.FLOAT
        graph.append(node)
        graph.outputs.append(node.outputs[0])
    ir.save(ir.Model(graph, ir_version=8), tmp_path / "huge.onnx")

    program = lowbit.load(tmp_path / "huge.onnx")
    assert program.tensor_nbytes() > 2 * 10**9
    with peak_rss_anon() as grew:
        out = program.save(tmp_path / "out" / "copy.onnx", external_data=None)
    assert grew[0] < 600 * MIB, f"save grew anonymous RSS by {grew[0] / MIB:.0f} MiB"
    assert (tmp_path / "out" / "copy.onnx.data").stat().st_size >= chunk * count
    assert out.stat().st_size < MIB
    reloaded = lowbit.load(out)
    assert len(reloaded.graph.initializers) == count
    assert not reloaded.graph.initializers["w8"].const_value.numpy()[-4:].any()
    os.remove(tmp_path / "out" / "copy.onnx.data")
