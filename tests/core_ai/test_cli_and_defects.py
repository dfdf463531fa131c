"""The CLI on ``.aimodel`` paths (the same commands and one-line errors as on ``.onnx``), and each defect of
coreai-opt 0.3.0 that issue 24 lists, as a test lowbit passes (the runtime decodes every program)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("coreai.authoring", reason="needs lowbit[coreai] (coreai-core, Python >= 3.11)")
pytest.importorskip("coreai_torch", reason="needs coreai-torch (Python >= 3.11)")

import torch
from coreai_support import convert, make_probe, probe_weights, run_asset

import lowbit.coreai as lc
from lowbit.cli import main
from lowbit.config import PalettizeConfig
from lowbit.coreai import _mlir, encoding
from lowbit.coreai.decode import evaluate
from lowbit.driver import ALGORITHMS


@pytest.fixture(scope="module")
def probe_path(tmp_path_factory):
    program, feeds, dense = make_probe("fp16")
    path = tmp_path_factory.mktemp("probe") / "probe.aimodel"
    program.save_asset(path)
    return path, feeds, dense


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _decoded(path, feeds) -> dict[str, np.ndarray]:
    return probe_weights(run_asset(path, feeds))


def test_cli_compresses_inspects_and_decompresses_aimodel(capsys, tmp_path, probe_path):
    path, feeds, _ = probe_path
    out = tmp_path / "small.aimodel"
    code, text, _ = _run(capsys, "palettize", path, out, "--n-bits", "3", "--weight-num-threshold", "512")
    assert code == 0 and "4 compressed, 0 skipped" in text
    code, text, _ = _run(capsys, "inspect", out)
    assert code == 0 and text.count("lut ui3") == 4 and "4 weights (4 compressed)" in text
    code, text, _ = _run(capsys, "report", out, "-o", tmp_path / "r.html", "--reference", path)
    page = (tmp_path / "r.html").read_text()
    assert code == 0 and page.count("<td>lut ui3</td>") == 4 and "e-02</td>" in page  # errors against the dense
    code, text, _ = _run(capsys, "decompress", out, tmp_path / "dense.aimodel")
    assert code == 0
    decoded = _decoded(tmp_path / "dense.aimodel", feeds)
    assert all(np.array_equal(a, b) for a, b in zip(decoded.values(), _decoded(out, feeds).values(), strict=True))
    for command in (
        ["quantize", "--dtype", "fp4_e2m1fn", "--granularity", "per-block"],
        ["sparsify", "--target-sparsity", "0.5"],
    ):
        code, text, _ = _run(
            capsys, command[0], path, tmp_path / f"{command[0]}.aimodel", *command[1:], "--weight-num-threshold", "512"
        )
        assert code == 0 and "4 compressed" in text, text


@pytest.mark.parametrize(
    ("make", "argv", "message"),
    [
        (None, ["inspect", "{tmp}/missing.aimodel"], "no such file"),
        ("empty", ["inspect", "{tmp}/empty.aimodel"], "not a Core AI asset"),
        ("junk", ["quantize", "{tmp}/junk.aimodel", "{tmp}/o.aimodel", "--dtype", "int8"], "not MLIR bytecode"),
        (None, ["quantize", "{probe}", "{probe}/inner.aimodel", "--dtype", "int8"], "lies inside the input asset"),
        (None, ["quantize", "{probe}", "{tmp}/o.aimodel", "--dtype", "int8", "--target", "onnxruntime"], "applies to"),
        (None, ["palettize", "{probe}", "{tmp}/o.aimodel", "--n-bits", "5"], "n_bits"),
        (None, ["quantize", "{probe}", "{tmp}/o.onnx", "--dtype", "int8"], "must end in .aimodel"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(capsys, tmp_path, probe_path, make, argv, message):
    if make == "empty":
        (tmp_path / "empty.aimodel").mkdir()
    elif make == "junk":
        (tmp_path / "junk.aimodel").mkdir()
        (tmp_path / "junk.aimodel" / "main.mlirb").write_bytes(b"\0" * 64)
    args = [a.format(tmp=tmp_path, probe=probe_path[0]) for a in argv]
    code, _, err = _run(capsys, *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (probe_path[0] / "inner.aimodel").exists()


# ---- coreai-opt 0.3.0's defects (issue 24), each seen through the runtime


def _outputs(program, feeds, tmp_path, name="out") -> dict[str, np.ndarray]:
    return _decoded(program.save(tmp_path / f"{name}.aimodel"), feeds)


def test_3_bits_and_vectors_on_a_program_with_convs(tmp_path, probe_path):
    """coreai-opt raises on n_bits=3, and fails with cluster_dim > 1 on any program holding a conv2d."""
    path, feeds, dense = probe_path
    for params in ({"n_bits": 3}, {"n_bits": 4, "cluster_dim": 2}):
        small = lc.palettize_weights(lc.load(path), weight_num_threshold=512, **params)
        assert all(r.skipped is None for r in small.report.rows)
        got = _outputs(small, feeds, tmp_path)
        for k, w in got.items():
            ref = dense[k].astype(np.float32)
            assert np.linalg.norm(w.astype(np.float32) - ref) < 0.35 * np.linalg.norm(ref), (params, k)


def test_fast_mode_stays_finite_on_large_fp16_weights(tmp_path):
    """coreai-opt's fast mode rounds fp16 weights with np.round(w, 4), which overflows above 6.55 to inf."""
    model = torch.nn.Linear(64, 64, bias=False).half()
    with torch.no_grad():
        model.weight.mul_(1000.0)  # |w| up to ~125
    eye = torch.eye(64, dtype=torch.float16)
    program = convert(model, (eye,))
    small = lc.palettize_weights(program, n_bits=4)
    (out,) = run_asset(small.save(tmp_path / "big.aimodel"), {"input": eye.numpy()})
    assert np.isfinite(out).all()
    assert small.report.rows[0].rel_mse < 0.02


def test_fp8_e5m2_of_fp16_weights_is_not_zero(tmp_path, probe_path):
    """coreai-opt gives FP8_E5M2 of fp16 weights a zero scale: every weight decodes to 0."""
    path, feeds, dense = probe_path
    got = _outputs(lc.quantize_weights(lc.load(path), dtype="fp8_e5m2", weight_num_threshold=512), feeds, tmp_path)
    for k, w in got.items():
        ref = dense[k].astype(np.float32)
        assert np.abs(w).max() > 0 and np.linalg.norm(w.astype(np.float32) - ref) < 0.1 * np.linalg.norm(ref)


def test_mxfp4_is_packed_and_decodes_with_the_ocp_scale_rule(tmp_path, probe_path):
    """coreai-opt stores MXFP4 one byte per element (the runtime misreads it) and rounds E8M0 scales after the
    codes (2.8-4.7x the OCP MX rule's error)."""
    path, feeds, dense = probe_path
    mx = lc.quantize_weights(lc.load(path), dtype="fp4_e2m1fn", granularity="per_block", block_size=32)
    weights = mx.weights()
    linear = weights[0]
    fp4 = [op for op in _chain_constants(linear.value) if _mlir.element_type_name(op.results[0]) == "f4E2M1FN"]
    assert sorted(_mlir.stored_nbytes(op) for op in fp4) == [0, 48 * 64 // 2]  # a splat zero offset; packed codes
    got = _outputs(mx, feeds, tmp_path)["linear"].astype(np.float32)
    w = dense["linear"].astype(np.float32)
    blocks = np.abs(w.reshape(48, 2, 32)).max(axis=2)
    scale = np.exp2(np.floor(np.log2(blocks)) - 2)  # OCP MX v1.0: floor(log2(amax)) - emax(E2M1) = ... - 2
    ocp = np.clip(w.reshape(48, 2, 32) / scale[..., None], -6, 6)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    nearest = grid[np.abs(np.abs(ocp)[..., None] - grid).argmin(-1)] * np.sign(ocp)
    reference = (nearest * scale[..., None]).reshape(48, 64)
    assert np.linalg.norm(got - w) <= 1.0001 * np.linalg.norm(reference - w)


def _chain_constants(value) -> list:
    found, stack = [], [value]
    while stack:
        op = stack.pop().owner
        if op.name == "coreai.constant":
            found.append(op)
        else:
            stack.extend(op.operands)
    return found


def test_per_channel_scale_is_per_output_channel_and_survives_an_int8_lut(tmp_path, probe_path):
    """coreai-opt's "per-channel" scale runs along the input columns, and with an int8 LUT only its first value
    survives."""
    path, feeds, dense = probe_path
    small = lc.palettize_weights(
        lc.load(path), n_bits=4, lut_dtype="int8", enable_per_channel_scale=True, weight_num_threshold=512
    )
    linear = small.weights()[0]
    scales = [op for op in _chain_constants(linear.value) if _mlir.tensor_shape(op.results[0]) == (48, 1)]
    assert len(scales) == 1 and len(np.unique(_mlir.read_constant(scales[0]))) > 10  # one per output channel
    got = _outputs(small, feeds, tmp_path)["linear"].astype(np.float32)
    ref = dense["linear"].astype(np.float32)
    assert np.linalg.norm(got - ref) < 0.15 * np.linalg.norm(ref)


def test_bf16_weights_are_compressed_and_replaced_constants_are_gone(tmp_path):
    """coreai-opt refuses bf16 weights and keeps the original constants in the graph until save."""
    program, feeds, dense = make_probe("bf16")
    small = lc.quantize_weights(program, dtype="int8", weight_num_threshold=512)
    assert all(r.skipped is None for r in small.report.rows)
    shapes = {tuple(d.shape) for d in dense.values()}
    constants = [op for op in _mlir.module_ops(small) if op.name == "coreai.constant"]
    assert not any(
        _mlir.tensor_shape(op.results[0]) in shapes and _mlir.element_type_name(op.results[0]) == "bf16"
        for op in constants
    )
    got = _outputs(small, feeds, tmp_path)
    for k, w in got.items():
        assert (
            np.abs(w.astype(np.float32) - dense[k].astype(np.float32)).max()
            < 0.05 * np.abs(dense[k].astype(np.float32)).max()
        )


@pytest.mark.parametrize(
    "compress",
    [
        lambda opt, p: opt.palettize_weights(
            coreai_program=p, lut_dtype=None, n_bits=4, weight_num_threshold=512, enable_fast_kmeans_mode=False
        ),
        lambda opt, p: opt.palettize_weights(
            coreai_program=p,
            lut_dtype=opt.DType.INT8,
            n_bits=2,
            weight_num_threshold=512,
            granularity=opt.CompressionGranularity.PER_GROUPED_CHANNEL,
            group_size=8,
            enable_fast_kmeans_mode=False,
        ),
        lambda opt, p: opt.quantize_weights(coreai_program=p, dtype=opt.DType.INT8, weight_num_threshold=512),
        lambda opt, p: opt.sparsify_weights(
            coreai_program=p, target_sparsity=0.5, quantize_dtype=opt.DType.INT8, weight_num_threshold=512
        ),
    ],
    ids=["palettize", "palettize-int8-lut", "int8", "sparse-int8"],
)
def test_what_coreai_opt_wrote_is_read_and_decompressed_as_the_runtime_decodes_it(compress, tmp_path):
    """Runs where coreai-opt is installed (the benchmark environment; it is no lowbit dependency)."""
    opt = pytest.importorskip("coreai_opt.coreai_utils", reason="coreai-opt lives in the benchmark environment only")
    program, feeds, _ = make_probe("fp32")
    path = tmp_path / "opt.aimodel"
    compress(opt, program).save_asset(path)
    written = lc.load(path)
    assert sum(w.compression is not None for w in written.weights()) >= 3
    runtime = _decoded(path, feeds)
    for w, decoded in zip(written.weights(), runtime.values(), strict=True):
        assert np.array_equal(evaluate(w.value), decoded)
    dense = _decoded(lc.decompress_weights(written).save(tmp_path / "dense.aimodel"), feeds)
    assert all(np.array_equal(a, b) for a, b in zip(runtime.values(), dense.values(), strict=True))


def test_per_weight_configs_by_core_ai_op_and_by_location_name(probe_path):
    path, _, _ = probe_path
    configs = {
        "op_type_configs": {"gather_nd": {"n_bits": 8}, "conv_transpose2d": None},
        "op_name_configs": {r"main/Probe\$1\.Conv2d\$1/.*": {"n_bits": 2}},
    }
    small = lc.palettize_weights(lc.load(path), n_bits=4, weight_num_threshold=512, configs=configs)
    found = {w.op: w.compression for w in small.weights()}
    assert found == {
        "broadcasting_batch_matmul": "lut ui4",
        "gather_nd": "lut ui8",
        "conv2d": "lut ui2",
        "conv_transpose2d": None,
    }
    with pytest.warns(UserWarning, match="matches no weight"):
        lc.palettize_weights(lc.load(path), weight_num_threshold=512, configs={"op_name_configs": {"fc1": None}})


def test_outliers_run_in_the_runtime_cost_what_was_predicted_and_a_second_pass_skips_them(capsys, tmp_path, probe_path):
    """``--outlier-fraction`` on an ``.aimodel``: the runtime decodes every weight as ``decompress_weights`` does,
    with the outliers exact (fewer errors than the same LUTs without them), the bytes planned are the bytes written,
    and a second pass skips the weights as compressed."""
    path, feeds, dense = probe_path
    argv = ["--n-bits", "2", "--weight-num-threshold", "512"]
    out, plain = tmp_path / "outliers.aimodel", tmp_path / "plain.aimodel"
    code, text, _ = _run(capsys, "palettize", path, out, *argv, "--outlier-fraction", "0.05")
    assert code == 0 and "4 compressed, 0 skipped" in text, text
    assert _run(capsys, "palettize", path, plain, *argv)[0] == 0
    program = lc.load(out)
    weights = {w.shape: w for w in program.weights()}
    assert {w.compression for w in weights.values()} == {"lut ui2 + outliers"}
    runtime, without = _decoded(out, feeds), _decoded(plain, feeds)
    for (module, got), weight in zip(runtime.items(), weights.values(), strict=True):
        np.testing.assert_array_equal(got, evaluate(weight.value))
        ref = dense[module].astype(np.float32)
        assert np.count_nonzero(got == dense[module]) >= round(0.05 * got.size), module
        err, err_plain = (np.linalg.norm(a.astype(np.float32) - ref) for a in (got, without[module]))
        assert err < err_plain, module
    config = PalettizeConfig(n_bits=2, outlier_fraction=0.05)
    source = lc.load(path)  # held: its weights' values live in it
    for weight in source.weights():  # the bytes the driver plans with (a budget's) are the bytes written
        result = ALGORITHMS["palettize"].job(_mlir.read_constant(weight.constant), weight, config, 1, None)()
        assert encoding.stored_nbytes(result) == weights[weight.shape].nbytes, weight.name
    again = lc.palettize_weights(program, n_bits=4, weight_num_threshold=512)
    assert [r.skipped for r in again.report.rows] == ["already compressed (lut ui2 + outliers)"] * 4


class _OwnScatter(torch.nn.Module):
    """A weight the model itself updates with ``index_put`` (a ``scatter_nd`` over the constant) before its matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("rows", torch.tensor([1, 5]))
        self.register_buffer("values", torch.ones(2, 64))

    def forward(self, x):
        return x @ torch.index_put(self.w, (self.rows,), self.values).T


def test_a_models_own_scatter_over_a_weight_is_not_taken_for_outliers():
    program = lc.Program.of(convert(_OwnScatter(), (torch.eye(64),)))
    assert [w.compression for w in program.weights()] == []  # not "already compressed (outliers)"


def test_a_budget_with_outliers_counts_their_coordinates(probe_path):
    """Mixed bits with outliers on Core AI: the budget holds in the bytes the program stores (a conv's outliers
    cost four int16 coordinates each, not ONNX's one int32 position)."""
    path, _, _ = probe_path
    program = lc.palettize_weights(lc.load(path), bits_per_weight=4.0, outlier_fraction=0.02, weight_num_threshold=512)
    weights = program.weights()
    assert {w.compression.endswith("+ outliers") for w in weights} == {True}
    assert 8 * sum(w.nbytes for w in weights) <= 4.0 * sum(w.numel for w in weights)
