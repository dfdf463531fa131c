"""palettize_weights end to end: ONNX Runtime == decompress_weights, errors, skips, in_place, determinism."""

import hashlib
import warnings
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from conftest import check_model, make_model, ort_session, three_weights_feeds, three_weights_program

import lowbit
from lowbit import CompressionGranularity as G
from lowbit import DType


def _digest(program: lowbit.Program) -> str:
    return hashlib.sha256(ir.serde.serialize_model(program.model).SerializeToString()).hexdigest()


def _dense_weights(program: lowbit.Program) -> dict[str, np.ndarray]:
    dense = lowbit.decompress_weights(program)
    return {w.name: w.value.const_value.numpy() for w in dense.weights()}


CONFIGS = [
    dict(n_bits=4),
    dict(n_bits=1),
    dict(n_bits=3, granularity=G.PER_CHANNEL),
    dict(n_bits=6, granularity="per_grouped_channel", group_size=16),
    dict(n_bits=8),
    dict(n_bits=2, cluster_dim=2),
    dict(n_bits=4, granularity=G.PER_GROUPED_CHANNEL, group_size=8, cluster_dim=4),
    dict(n_bits=4, enable_per_channel_scale=True),
    dict(n_bits=4, lut_dtype=DType.INT8),
    dict(n_bits=4, lut_dtype="uint8", granularity=G.PER_CHANNEL),
    dict(n_bits=4, lut_dtype=DType.FP8_E4M3FN),
    dict(n_bits=3, lut_dtype=DType.FP8_E5M2),
    dict(n_bits=4, mode="uniform"),
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: "-".join(f"{k}={getattr(v, 'name', v)}" for k, v in c.items())
)
def test_ort_matches_decompressed_weights(config):
    program = three_weights_program()
    out = lowbit.palettize_weights(program, num_kmeans_workers=1, **config)
    assert len(out.report.compressed) == 3
    dense = lowbit.decompress_weights(out)
    feeds = three_weights_feeds()
    for level in ("disable", "basic"):
        got = ort_session(out.model, level).run(None, feeds)
        want = ort_session(dense.model, "disable").run(None, feeds)
        for g, w in zip(got, want, strict=True):
            assert g.tobytes() == w.tobytes(), level
    original = {w.name: w.value.const_value.numpy() for w in program.weights()}
    decoded = _dense_weights(out)
    for row in out.report.compressed:  # the reported error is the real error of the decoded weight
        a, b = original[row.name].astype(np.float64), decoded[row.name].astype(np.float64)
        assert row.rel_mse == pytest.approx(((a - b) ** 2).sum() / (a**2).sum(), rel=1e-9)
        assert row.bytes_after < row.bytes_before
        assert len(np.unique(decoded[row.name].view(np.uint16))) <= row.bytes_after * 8  # sanity: a small LUT


def test_lut_has_2n_entries_and_codes_are_real_n_bit():
    program = three_weights_program()
    out = lowbit.palettize_weights(program, n_bits=3, num_kmeans_workers=1)
    for w in out.weights():
        node = w.value.producer()
        indices, lut = node.inputs[0].const_value, node.inputs[1].const_value
        assert lut.shape[-2] == 8 and indices.nbytes == (w.numel * 3 + 7) // 8
        assert len(np.unique(_dense_weights(out)[w.name].view(np.uint16))) <= 8  # bit patterns: exact


def test_digits_accuracy_is_kept(digits_path):
    program = lowbit.load(digits_path)
    out = lowbit.palettize_weights(program, n_bits=4, num_kmeans_workers=1)
    split = np.load(digits_path.parent / "test_split.npz")
    acc = {}
    for name, prog in (("dense", program), ("4bit", out)):
        logits = ort_session(prog.model, "all").run(None, {"image": split["images"]})[0]
        acc[name] = (logits.argmax(1) == split["labels"]).mean()
    assert acc["4bit"] >= acc["dense"] - 0.02


@pytest.mark.parametrize("dtype", [np.float16, np.float32])  # fp32: exact values even in the default fast mode
def test_unique_mode_reproduces_a_palettized_weight_bit_for_bit(dtype):
    program = three_weights_program(dtype)
    first = lowbit.palettize_weights(program, n_bits=4, granularity=G.PER_CHANNEL, num_kmeans_workers=1)
    dense = lowbit.decompress_weights(first)
    again = lowbit.palettize_weights(dense, n_bits=4, granularity=G.PER_CHANNEL, mode="unique", num_kmeans_workers=1)
    assert all(r.rel_mse == 0.0 for r in again.report.compressed) and len(again.report.compressed) == 3
    expected, got = _dense_weights(first), _dense_weights(again)
    for name in expected:
        assert expected[name].tobytes() == got[name].tobytes()


def test_fewer_distinct_values_than_entries_is_exact():
    w = np.repeat(np.array([-0.5, 0.0, 0.25], np.float32), 700).reshape(60, 35)
    program = lowbit.Program(make_model({"w": w}, [("Gemm", "w", {"transB": 1})]))
    out = lowbit.palettize_weights(program, n_bits=4, num_kmeans_workers=1)
    (row,) = out.report.rows
    assert row.rel_mse == 0.0
    node = out.weights()[0].value.producer()
    lut = node.inputs[1].const_value.numpy().reshape(-1)
    assert np.all(np.isfinite(lut)) and set(lut[:3]) == {-0.5, 0.0, 0.25}
    assert np.array_equal(_dense_weights(out)["w"], w)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(n_bits=5), ValueError, r"n_bits must be one of \{1, 2, 3, 4, 6, 8\}, got 5"),
        (dict(n_bits=4.0), TypeError, "n_bits must be an int"),
        (dict(lut_dtype=DType.FP16), ValueError, "lut_dtype must be one of"),
        (dict(lut_dtype="int3"), ValueError, "lut_dtype must be one of"),
        (dict(granularity=G.PER_BLOCK), ValueError, "granularity must be one of"),
        (dict(granularity="per-row"), ValueError, "granularity must be one of"),
        (dict(group_size=0), ValueError, "group_size must be >= 1"),
        (dict(cluster_dim=0), ValueError, "cluster_dim must be >= 1"),
        (dict(cluster_dim=2, enable_per_channel_scale=True), ValueError, "cluster_dim > 1 cannot be combined"),
        (dict(weight_num_threshold=-1), ValueError, "weight_num_threshold must be >= 0"),
        (dict(num_kmeans_workers=0), ValueError, "num_kmeans_workers must be >= 1"),
        (dict(mode="median"), ValueError, "mode must be one of"),
        (dict(mode="uniform", cluster_dim=2), ValueError, "mode='uniform' is scalar only"),
        (dict(rounding_precision=-1), ValueError, "rounding_precision must be >= 0"),
        (dict(in_place="yes"), TypeError, "in_place must be a bool"),
        (dict(enable_fast_kmeans_mode=1), TypeError, "enable_fast_kmeans_mode must be a bool"),
    ],
)
def test_invalid_parameters(kwargs, error, match):
    program = three_weights_program()
    before = _digest(program)
    with pytest.raises(error, match=match):
        lowbit.palettize_weights(program, **kwargs)
    assert _digest(program) == before


def test_program_argument_type():
    with pytest.raises(TypeError, match=r"program must be a lowbit\.Program"):
        lowbit.palettize_weights("model.onnx")


def test_in_place_semantics():
    program = three_weights_program()
    before = _digest(program)
    out = lowbit.palettize_weights(program, num_kmeans_workers=1)
    assert out is not program and _digest(program) == before
    assert all(w.compression is None for w in program.weights())
    same = lowbit.palettize_weights(program, in_place=True, num_kmeans_workers=1)
    assert same is program and all(w.compression for w in program.weights())


def test_deterministic_across_runs_workers_and_executors():
    program = three_weights_program()
    configs = [dict(n_bits=4, granularity=G.PER_CHANNEL), dict(n_bits=2, cluster_dim=2)]
    for config in configs:
        digests = {
            _digest(lowbit.palettize_weights(program, num_kmeans_workers=1, **config)),
            _digest(lowbit.palettize_weights(program, num_kmeans_workers=1, **config)),
            _digest(lowbit.palettize_weights(program, num_kmeans_workers=2, **config)),
        }
        with ThreadPoolExecutor(3) as pool:
            digests.add(_digest(lowbit.palettize_weights(program, executor=pool, **config)))
        assert len(digests) == 1


def _skips(program: lowbit.Program, **kwargs) -> dict[str, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = lowbit.palettize_weights(program, num_kmeans_workers=1, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    at = {w.filename for w in caught if "skipped:" in str(w.message)}
    assert at <= {__file__}, [(w.filename, str(w.message)) for w in caught]  # the caller's line, not lowbit's
    reasons = {r.name: r.skipped for r in out.report.skipped}
    for name, reason in reasons.items():
        if "weight_num_threshold" not in reason:
            assert f"weight '{name}' skipped: {reason}" in messages, (name, messages)
    return reasons


def test_skips_with_warnings():
    rng = np.random.default_rng(0)
    weights = {
        "nan": np.where(rng.random((40, 32)) < 0.01, np.nan, 1.0).astype(np.float32),
        "inf": np.full((40, 32), np.inf, np.float32),
        "odd": rng.standard_normal((40, 30)).astype(np.float32),  # MatMul: 30 channels, not a multiple of 16
        "small": rng.standard_normal((10, 10)).astype(np.float32),
        "ints": rng.integers(-5, 5, (40, 40)).astype(np.int8),
        "ok": rng.standard_normal((40, 32)).astype(np.float32),
    }
    program = lowbit.Program(make_model(weights, [("MatMul", n, {}) for n in weights]))
    reasons = _skips(program, granularity=G.PER_GROUPED_CHANNEL, group_size=16)
    assert reasons["nan"] == reasons["inf"] == "contains NaN or Inf"
    assert "odd" not in reasons  # a ragged last group: 16 + 14 channels
    assert reasons["small"] == "100 elements <= weight_num_threshold 1024"
    assert reasons["ints"] == "dtype int8 is not float32/float16/bfloat16"
    assert "ok" not in reasons
    reasons = _skips(program, cluster_dim=4)
    assert reasons["odd"] == "30 output channels do not divide by cluster_dim 4"
    reasons = _skips(program, n_bits=1, mode="unique")
    assert reasons["ok"].startswith("mode='unique' needs at most 2 distinct values per LUT")


def test_already_compressed_weights_are_skipped():
    once = lowbit.palettize_weights(three_weights_program(), num_kmeans_workers=1)
    reasons = _skips(once)
    assert set(reasons) == {"mm", "gemm_t", "conv"}
    assert all(r.startswith("already compressed (palettized 4-bit") for r in reasons.values())


def test_bfloat16_and_fp32_exact_mode():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((48, 40)) * 0.1).astype(np.float32)
    for program in (
        lowbit.Program(make_model({"w": w}, [("MatMul", "w", {})])),
        lowbit.Program(make_model({"w": w.astype(ml_dtypes.bfloat16)}, [("MatMul", "w", {})])),
    ):
        for fast in (True, False):
            out = lowbit.palettize_weights(program, enable_fast_kmeans_mode=fast, num_kmeans_workers=1)
            (row,) = out.report.compressed
            assert 0 < row.rel_mse < 0.02


@pytest.mark.parametrize("how", ["script", "stdin"])
def test_default_workers_from_a_plain_script(tmp_path, how):
    """The README's example as a script with no ``__main__`` guard, and from stdin: the default workers are
    threads, no child process is started (it would re-run the script, and could outlive a killed parent)."""
    import subprocess
    import sys

    from conftest import ROOT

    script = (
        "import os, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "import lowbit\n"
        "from conftest import three_weights_program\n"
        "out = lowbit.palettize_weights(three_weights_program())\n"
        "children = open(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read().split()\n"
        "print(len(out.report.compressed), len(children))\n"
    )
    path = tmp_path / "plain.py"
    path.write_text(script)
    argv, stdin = ([sys.executable, str(path)], None) if how == "script" else ([sys.executable, "-"], script)
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=ROOT, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[:2] == ["3", "0"]


@pytest.mark.parametrize("magnitude", [1e-8, 1e-3, 1e6])
def test_fast_mode_keeps_tiny_and_huge_fp32_weights(magnitude):
    """fp32 weights far below (or above) fp16's range: fast mode keys a power-of-two rescaled copy, so it loses
    nothing against exact mode (it used to round std-1e-8 weights to zero: rel-MSE 0.99, reported compressed)."""
    w = (np.random.default_rng(3).standard_normal((96, 64)) * magnitude).astype(np.float32)
    program = lowbit.Program(make_model({"w": w}, [("MatMul", "w", {})]))
    errors = {}
    for fast in (True, False):
        out = lowbit.palettize_weights(program, enable_fast_kmeans_mode=fast, num_kmeans_workers=1)
        (row,) = out.report.compressed
        errors[fast] = row.rel_mse
        lut = next(v for n, v in out.graph.initializers.items() if n.endswith(".lut")).const_value.numpy()
        assert np.abs(lut).max() == pytest.approx(np.abs(w).max(), rel=0.5)
    assert errors[True] < 1.001 * errors[False] < 0.02


@pytest.mark.parametrize(("cluster_dim", "per_channel_scale"), [(1, False), (1, True), (2, False)])
def test_ragged_last_lut_group(cluster_dim, per_channel_scale):
    """30 channels in groups of 8: three LUTs of 8 and one of 6, stored as four groups of 8 whose padding the
    decode slices off; each group is the one a weight of just those channels gets."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 30)).astype(np.float16)  # MatMul: 30 output channels
    kwargs = dict(
        n_bits=2,
        granularity=G.PER_GROUPED_CHANNEL,
        group_size=8,
        cluster_dim=cluster_dim,
        enable_per_channel_scale=per_channel_scale,
        num_kmeans_workers=1,
        weight_num_threshold=0,
    )
    out = lowbit.palettize_weights(lowbit.Program(make_model({"w": w}, [("MatMul", "w", {})])), **kwargs)
    (row,) = out.report.compressed
    check_model(out.model)
    dense = lowbit.decompress_weights(out).graph.initializers["w"].const_value.numpy()
    assert dense.shape == w.shape
    error = ((dense.astype(np.float64) - w) ** 2).sum() / (w.astype(np.float64) ** 2).sum()
    assert row.rel_mse == pytest.approx(error, rel=1e-9)
    tail = lowbit.palettize_weights(lowbit.Program(make_model({"w": w[:, 24:]}, [("MatMul", "w", {})])), **kwargs)
    tail_dense = lowbit.decompress_weights(tail).graph.initializers["w"].const_value.numpy()
    if cluster_dim == 1:  # vector k-means seeds by position, scalar k-means is exact: the same LUT either way
        assert np.array_equal(dense[:, 24:], tail_dense)
    feeds = {"x0": rng.standard_normal((2, 40)).astype(np.float16)}
    got = ort_session(out.model, "basic").run(None, feeds)[0]
    want = ort_session(lowbit.decompress_weights(out).model, "disable").run(None, feeds)[0]
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
