"""The CLI and bad input: one clear line and exit code 2, never a traceback; inputs untouched."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import make_model, ort_session, save_model

import lowbit
from lowbit.cli import main
from lowbit.kernels.packing import pack_bits
from lowbit.onnx import encoding


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_digits(capsys, digits_path):
    code, out, err = _run(capsys, "inspect", digits_path)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["weight", "op", "shape", "dtype", "compression", "bits/w", "bytes"]
    assert any(line.split()[:4] == ["features.2.weight", "Conv", "32x16x3x3", "float"] for line in lines)
    assert lines[-1].startswith("5 weights (0 compressed), 57232 parameters")


def _lut_model(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    model = make_model({"w": np.zeros((16, 8), np.float32)}, [("MatMul", "w", {})])
    lut = rng.standard_normal((1, 4, 1)).astype(np.float32)
    codes = rng.integers(0, 4, (8, 16))
    encoding.write_lut(
        model,
        model.graph.initializers["w"],
        packed=pack_bits(codes, 2),
        lut=lut,
        scale=None,
        n_bits=2,
        canonical_shape=[8, 16],
        perm=[1, 0],
    )
    return save_model(model, tmp_path / "lut.onnx"), lut.reshape(-1)[codes].T


def test_inspect_and_decompress_a_compressed_model(capsys, tmp_path):
    path, dense = _lut_model(tmp_path)
    before = _digest(path)
    code, out, _ = _run(capsys, "inspect", path)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("w "))
    assert "palettized 2-bit, 1 LUT(s)" in row
    assert float(row.split()[-2]) == pytest.approx(8 * (32 + 16) / 128)  # indices + LUT (no scale input)
    code, out, _ = _run(capsys, "decompress", path, tmp_path / "dense.onnx")
    assert code == 0 and "wrote" in out
    assert _digest(path) == before
    restored = lowbit.load(tmp_path / "dense.onnx")
    assert not restored.model.functions
    np.testing.assert_array_equal(restored.graph.initializers["w"].const_value.numpy(), dense)
    x = np.eye(16, dtype=np.float32)
    np.testing.assert_array_equal(ort_session(tmp_path / "dense.onnx").run(None, {"x0": x})[0], dense)
    np.testing.assert_array_equal(ort_session(path).run(None, {"x0": x})[0], dense)


def test_decompress_in_place_path(capsys, tmp_path):
    path, dense = _lut_model(tmp_path)
    code, _, _ = _run(capsys, "decompress", path, path)
    assert code == 0
    np.testing.assert_array_equal(lowbit.load(path).graph.initializers["w"].const_value.numpy(), dense)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"this is not a model", "not a valid ONNX model"),
        (b"", "empty file (0 bytes)"),  # protobuf would parse it as an empty model
    ],
)
def test_bad_files(capsys, tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    code, out, err = _run(capsys, "inspect", path)
    text = out + err
    assert message in text
    assert code == (0 if message == "no weights found" else 2)
    assert "Traceback" not in text and len(err.splitlines()) <= 1


def test_truncated_model_and_external_data(capsys, tmp_path, digits_path):
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(digits_path.read_bytes()[:5000])
    code, _, err = _run(capsys, "inspect", truncated)
    assert code == 2 and "not a valid ONNX model" in err and len(err.splitlines()) == 1

    model = make_model({"w": np.ones((64, 64), np.float32)}, [("MatMul", "w", {})])
    ir.save(model, tmp_path / "ext.onnx", external_data="ext.onnx.data")
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    code, _, err = _run(capsys, "inspect", tmp_path / "ext.onnx")
    assert code == 2 and "truncated" in err
    data.unlink()
    code, _, err = _run(capsys, "inspect", tmp_path / "ext.onnx")
    assert code == 2 and "missing" in err


def test_summary_counts_external_data_and_read_only_output_exits_2(capsys, tmp_path):
    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    ir.save(make_model({"w": w}, [("MatMul", "w", {})]), tmp_path / "ext.onnx", external_data="ext.onnx.data")
    code, out, _ = _run(capsys, "palettize", tmp_path / "ext.onnx", tmp_path / "out.onnx")
    assert code == 0
    before, after = (int(n) for n in re.search(r": (\d+) -> (\d+) bytes", out).groups())
    assert before > 256 * 256 * 4 and after == sum(p.stat().st_size for p in tmp_path.glob("out.onnx*"))
    assert 7.0 < before / after < 8.1
    (tmp_path / "out.onnx").chmod(0o444)
    code, _, err = _run(capsys, "palettize", tmp_path / "ext.onnx", tmp_path / "out.onnx")
    assert code == 2 and "read-only" in err and len(err.splitlines()) == 1


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect"])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_unknown_op_nan_and_empty_weights(capsys, tmp_path):
    weights = {
        "nan": np.full((8, 8), np.nan, np.float32),
        "inf": np.full((8, 8), np.inf, np.float32),
        "empty": np.zeros((0, 8), np.float32),
        "custom": np.ones((8, 8), np.float32),
    }
    model = make_model(weights, [("MatMul", "nan", {}), ("MatMul", "inf", {}), ("MatMul", "empty", {})])
    x = ir.Value(name="xc", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([8]))
    custom = ir.node("Frobnicate", [x, model.graph.initializers["custom"]], domain="example.custom", name="f")
    custom.outputs[0].dtype = ir.DataType.FLOAT
    model.graph.inputs.append(x)
    model.graph.append(custom)
    model.graph.outputs.append(custom.outputs[0])
    model.graph.opset_imports["example.custom"] = 1
    path = save_model(model, tmp_path / "odd.onnx")
    before = _digest(path)
    code, out, _ = _run(capsys, "inspect", path)
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()[2:-1]]
    assert names == ["nan", "inf", "empty"]  # the custom op's input is not a known weight
    assert "0.00" in next(line for line in out.splitlines() if line.startswith("empty"))
    code, _, _ = _run(capsys, "decompress", path, tmp_path / "out.onnx")
    assert code == 0 and _digest(path) == before


def test_console_script_entry_point(digits_path):
    result = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "inspect", str(digits_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "classifier.1.weight" in result.stdout


def test_palettize_command(capsys, tmp_path, digits_path):
    before = _digest(digits_path)
    out = tmp_path / "p.onnx"
    code, stdout, _ = _run(
        capsys, "palettize", digits_path, out, "--n-bits", "3", "--granularity", "per-channel", "--workers", "1"
    )
    assert code == 0 and _digest(digits_path) == before
    assert "4 compressed, 1 skipped" in stdout and "rel-MSE" in stdout
    assert out.stat().st_size < digits_path.stat().st_size / 4
    inspected = {w.name: w.compression for w in lowbit.load(out).weights()}
    assert inspected["classifier.1.weight"] == "palettized 3-bit, 128 LUT(s)"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n-bits", "5"], "n_bits must be one of {1, 2, 3, 4, 6, 8}, got 5"),
        (["--granularity", "per-block"], "granularity must be one of"),
        (["--lut-dtype", "fp16"], "lut_dtype must be one of"),
    ],
)
def test_palettize_bad_options(capsys, tmp_path, digits_path, flags, message):
    code, _, err = _run(capsys, "palettize", digits_path, tmp_path / "p.onnx", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.onnx").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sparsify", "--target", "onnxruntime"], "unrecognized arguments: --target"),  # not --target-sparsity
        (["sparsify", "--target", "0.5"], "unrecognized arguments: --target"),
        (["sparsify"], "give one of --target-sparsity"),
        (["sparsify", "--n-m", "2:4", "--target-sparsity", "0.5"], "give one of --target-sparsity"),
        (["palettize", "--group-size", "16"], "--group-size applies to --granularity per-grouped-channel"),
        (["quantize", "--dtype", "int8", "--block", "16"], "unrecognized arguments: --block"),
    ],
)
def test_options_are_never_abbreviated_or_silently_ignored(capsys, tmp_path, digits_path, argv, message):
    try:
        code, _, err = _run(capsys, argv[0], digits_path, tmp_path / "o.onnx", *argv[1:])
    except SystemExit as usage:  # argparse's own errors
        code, err = usage.code, capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.onnx").exists()


def test_n_m_sparsity_needs_no_target_sparsity(capsys, tmp_path, digits_path):
    code, out, _ = _run(capsys, "sparsify", digits_path, tmp_path / "s.onnx", "--n-m", "2:4")
    assert code == 0 and "compressed" in out


def test_a_model_onnx_ir_cannot_represent_is_refused_with_the_reason(capsys):
    import onnxruntime

    iris = Path(onnxruntime.__file__).parent / "datasets" / "logreg_iris.onnx"  # ZipMap: a sequence of maps
    code, _, err = _run(capsys, "palettize", iris, iris.with_name("never-written.onnx"))
    assert code == 2 and "Map types are not supported" in err and len(err.splitlines()) == 1
    assert not iris.with_name("never-written.onnx").exists()
