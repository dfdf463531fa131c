"""Program: load / save (atomic, external data, IR version) / optimize / copy."""

import gc
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
    out = program.save(src)  # same path: a fresh data file, then the model, then the old data file removed
    assert program.data_path == tmp_path / "ext.onnx.1.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.1.data"]
    assert np.array_equal(program.graph.initializers["w"].const_value.numpy(), w)
    assert np.array_equal(lowbit.load(out).graph.initializers["w"].const_value.numpy(), w)
    for n in (2, 3):  # again: the file it was loaded from is gone, its tensors were pointed at the new one
        program.save(src)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", f"ext.onnx.{n}.data"]
        assert np.array_equal(lowbit.load(src).graph.initializers["w"].const_value.numpy(), w)
    lowbit.load(out).save(out)  # another program over it: numbers only grow while a data file of it exists
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.4.data"]
    program = lowbit.load(out)
    inline = program.save(tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    assert not onnx.external_data_helper.uses_external_data(onnx.load(inline).graph.initializer[0])
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


def _external_program(tmp_path: Path, value: float, name: str = "ext.onnx") -> Path:
    model = make_model({"w": np.full((64, 64), value, np.float32)}, [("MatMul", "w", {})])
    ir.save(model, tmp_path / name, external_data=f"{name}.data")
    return tmp_path / name


def test_a_crash_between_data_and_model_keeps_the_input(tmp_path, monkeypatch):
    src = _external_program(tmp_path, 1.0)
    program = lowbit.load(src)
    program.graph.initializers["w"].const_value = ir.tensor(np.full((64, 64), 5.0, np.float32))
    real_replace = os.replace

    def crash_on_the_model(a, b):
        if Path(b) == src.resolve():
            raise OSError("killed")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", crash_on_the_model)
    with pytest.raises(OSError, match="killed"):
        program.save(src)
    monkeypatch.undo()
    assert np.all(lowbit.load(src).graph.initializers["w"].const_value.numpy() == 1.0)


def _save_many(src: str, value: float, dest: str, rounds: int) -> None:
    program = lowbit.load(src)
    program.graph.initializers["w"].const_value = ir.tensor(np.full((64, 64), value, np.float32))
    for _ in range(rounds):
        program.save(dest, external_data=True)


def test_two_processes_saving_to_one_path_leave_a_matching_pair(tmp_path):
    import multiprocessing

    src = _external_program(tmp_path, 0.0, "src.onnx")
    dest = tmp_path / "out" / "m.onnx"
    context = multiprocessing.get_context("fork")
    for _ in range(10):
        workers = [context.Process(target=_save_many, args=(str(src), v, str(dest), 5)) for v in (1.0, 2.0)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
            assert w.exitcode == 0
        values = np.unique(lowbit.load(dest).graph.initializers["w"].const_value.numpy())
        assert values.tolist() in ([1.0], [2.0])


def test_stale_temporaries_of_killed_saves_are_cleaned_up(tmp_path):
    src = _matmul_program(tmp_path)
    stale = tmp_path / ".lowbit-save-999999999-abc"  # no such process
    stale.mkdir()
    (stale / "m.onnx").write_bytes(b"partial")
    mine = tmp_path / f".lowbit-save-{os.getpid()}-abc"  # a live process's save in progress stays
    mine.mkdir()
    lowbit.load(src).save(tmp_path / "out.onnx")
    assert not stale.exists() and mine.exists()


def test_read_only_output_is_not_replaced(tmp_path):
    src = _matmul_program(tmp_path)
    dest = _matmul_program(tmp_path, "ro.onnx", n=32)
    before = dest.read_bytes()
    dest.chmod(0o444)
    with pytest.raises(PermissionError, match="read-only"):
        lowbit.load(src).save(dest)
    assert dest.read_bytes() == before


def test_empty_file_and_external_data_outside_the_folder_are_refused(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(lowbit.ModelLoadError, match="empty file"):
        lowbit.load(tmp_path / "empty.onnx")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(64 * 64, np.float32).tobytes())
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    src = _external_program(model_dir, 1.0)
    proto = onnx.load(src, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    onnx.save(proto, src)
    with pytest.raises(lowbit.ModelLoadError, match="outside the model's folder"):
        lowbit.load(src)


def _with_training_info(path: Path, bound: str) -> Path:
    program = lowbit.load(_matmul_program(path.parent, path.name))
    proto = ir.serde.serialize_model(program.model)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), "step"))
    info = proto.training_info.add()
    info.algorithm.name = "update"
    info.algorithm.node.append(onnx.helper.make_node("Identity", [bound], ["new"]))
    info.algorithm.output.append(onnx.helper.make_tensor_value_info("new", onnx.TensorProto.FLOAT, None))
    binding = info.update_binding.add()
    binding.key, binding.value = bound, "new"
    onnx.save(proto, path)
    return path


def test_training_info_is_kept_unless_it_updates_a_compressed_weight(tmp_path):
    src = _with_training_info(tmp_path / "t.onnx", "step")
    out = lowbit.palettize_weights(lowbit.load(src), num_kmeans_workers=1).save(tmp_path / "out.onnx")
    kept = onnx.load(out)
    assert [i.update_binding[0].key for i in kept.training_info] == ["step"]
    onnx.checker.check_model(kept)
    src = _with_training_info(tmp_path / "w.onnx", "w")
    result = lowbit.palettize_weights(lowbit.load(src), num_kmeans_workers=1)
    with pytest.warns(UserWarning, match=r"training_info dropped: it updates \['w'\]"):
        out = result.save(tmp_path / "out2.onnx")
    assert not onnx.load(out).training_info


@pytest.mark.parametrize(
    ("compress", "options"),
    [
        (lowbit.palettize_weights, dict(n_bits=4, granularity="per_grouped_channel", group_size=16)),
        (lowbit.quantize_weights, dict(dtype="int4", granularity="per_block", block_size=32)),
        (lowbit.sparsify_weights, dict(target_sparsity=0.5)),
    ],
)
def test_a_model_saved_with_external_data_keeps_compressed_weights_on_disk(tmp_path, monkeypatch, compress, options):
    """Above protobuf's limit (lowered here) compressed tensors are spilled to a scratch file and read from there: the
    saved model is the same, the scratch folder lasts while any tensor in it does, and the input stays readable."""
    from lowbit.onnx import backend

    rng = np.random.default_rng(0)
    weights = {f"w{i}": (rng.standard_normal((256, 512)) * 0.02).astype(np.float16) for i in range(3)}
    model = make_model(weights, [("MatMul", name, {}) for name in weights])
    src = tmp_path / "big.onnx"
    ir.save(model, src, external_data="big.onnx.data")
    plain = compress(lowbit.load(src), **options).save(tmp_path / "plain" / "out.onnx")
    monkeypatch.setattr(backend, "PROTO_LIMIT_BYTES", 1000)
    source = lowbit.load(src)
    out = compress(source, **options)
    spilled = [v for v in out.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    scratch = {Path(v.const_value.path).parent for v in spilled} - {tmp_path}
    assert len(scratch) == 1 and next(iter(scratch)).parent == tmp_path  # beside the model
    in_memory = [v for v in out.graph.initializers.values() if not isinstance(v.const_value, ir.ExternalTensor)]
    assert min(v.const_value.nbytes for v in spilled) >= 1 << 16 > max(v.const_value.nbytes for v in in_memory)
    saved = out.save(tmp_path / "spilled" / "out.onnx")
    for a, b in zip(onnx.load(plain).graph.initializer, onnx.load(saved).graph.initializer, strict=True):
        assert onnx.numpy_helper.to_array(a).tobytes() == onnx.numpy_helper.to_array(b).tobytes()
    for name, w in weights.items():  # the input's pages were released, not lost
        assert source.graph.initializers[name].const_value.numpy().tobytes() == w.tobytes()
    x = {f"x{i}": np.ones((1, 256), np.float16) for i in range(3)}
    y_plain, y_saved = (ort_session(p).run(None, x) for p in (plain, saved))
    for a, b in zip(y_plain, y_saved, strict=True):
        assert a.tobytes() == b.tobytes()
    copy = out.copy()  # shares the spilled tensors: the scratch file must outlive the program that wrote it
    del out, spilled, in_memory
    gc.collect()
    assert all(folder.exists() for folder in scratch)
    again = copy.save(tmp_path / "copy" / "out.onnx")
    for a, b in zip(onnx.load(plain).graph.initializer, onnx.load(again).graph.initializer, strict=True):
        assert onnx.numpy_helper.to_array(a).tobytes() == onnx.numpy_helper.to_array(b).tobytes()
    del copy
    gc.collect()
    assert not any(folder.exists() for folder in scratch)


def test_large_model_measures_fail_soft_where_the_platform_lacks_them(tmp_path, monkeypatch):
    """No madvise / posix_fadvise constants (Windows, macOS) and no /proc (macOS): the pass and the save still run,
    and a save beside the model keeps this process's own scratch folder."""
    import mmap

    from lowbit.onnx import backend, program

    for module, name in ((mmap, "MADV_WILLNEED"), (mmap, "MADV_DONTNEED"), (os, "POSIX_FADV_DONTNEED")):
        monkeypatch.delattr(module, name, raising=False)
    monkeypatch.setattr(backend, "PROTO_LIMIT_BYTES", 1000)
    real_is_dir = Path.is_dir
    monkeypatch.setattr(Path, "is_dir", lambda self: False if str(self) == "/proc/self" else real_is_dir(self))
    w = (np.random.default_rng(0).standard_normal((256, 512)) * 0.02).astype(np.float16)
    src = tmp_path / "m.onnx"
    ir.save(make_model({"w": w}, [("MatMul", "w", {})]), src, external_data="m.onnx.data")
    out = lowbit.palettize_weights(lowbit.load(src), n_bits=4)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in out.graph.initializers.values())
    saved = out.save(tmp_path / "out.onnx")  # beside the scratch folder: not taken for a dead process's
    assert ort_session(saved).run(None, {"x0": np.ones((1, 256), np.float16)})[0].shape == (1, 512)
    assert not program._alive(2**22 + 12345) or not Path("/proc").exists()
