"""sparsify_weights: exact zero counts, block and n:m structure, joint compression, ORT == decompress."""

import numpy as np
import pytest
from conftest import check_model, make_model, ort_session, ort_weights, three_weights_feeds, three_weights_program

import lowbit
from lowbit import DType
from lowbit.kernels.prune import block_mask, magnitude_mask, n_m_mask

CONFIGS = [
    dict(target_sparsity=0.5),
    dict(target_sparsity=0.75),
    dict(target_sparsity=0.0),
    dict(target_sparsity=0.5, block_size=4),
    dict(target_sparsity=0.0, n_m_ratio=(2, 4)),
    dict(target_sparsity=0.5, quantize_dtype=DType.INT8),
    dict(target_sparsity=0.5, n_m_ratio=(1, 4), quantize_dtype="int8"),
    dict(target_sparsity=0.6, palettize_nbits=4),
    dict(target_sparsity=0.5, block_size=2, palettize_nbits=2),
]


@pytest.mark.parametrize("weight_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(getattr(v, "name", v)) for v in c.values()))
def test_ort_matches_decompressed(config, weight_dtype):
    program = three_weights_program(weight_dtype)
    out = lowbit.sparsify_weights(program, **config)
    if config == dict(target_sparsity=0.0):  # a mask plus every value would be larger than the weight
        assert all(r.skipped.startswith("compressed it would take") for r in out.report.rows)
        return
    assert [r.name for r in out.report.compressed] == ["mm", "gemm_t", "conv"]
    check_model(out.model)
    dense = lowbit.decompress_weights(out)
    decoded = {w.name: w.value.const_value.numpy() for w in dense.weights()}
    feeds = three_weights_feeds(weight_dtype)
    want = ort_session(dense.model, "disable").run(None, feeds)
    for level in ("disable", "basic"):
        got = ort_weights(out, feeds, level)
        for name, array in decoded.items():
            assert got[name].tobytes() == array.tobytes(), (name, level)
        for i, expected in enumerate(want):  # fp16 kernels may differ in summation order for non-constant weights
            np.testing.assert_allclose(
                got[f"y{i}"].astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3
            )
    original = {w.name: w.value.const_value.numpy() for w in program.weights()}
    for row in out.report.compressed:
        a, b = original[row.name].astype(np.float64), decoded[row.name].astype(np.float64)
        assert row.rel_mse == pytest.approx(((a - b) ** 2).sum() / (a**2).sum(), rel=1e-9, abs=1e-15)
        target = config["n_m_ratio"][0] / config["n_m_ratio"][1] if "n_m_ratio" in config else config["target_sparsity"]
        zeros, wanted = int((b == 0).sum()), max(round(target * a.size), int((a == 0).sum()))
        if config.get("block_size", 1) == 1 and "quantize_dtype" not in config and "palettize_nbits" not in config:
            assert zeros == wanted  # exact count (quantization/LUTs may add zeros)
        assert zeros >= wanted
        assert np.all(b[a == 0] == 0)


def test_storage_is_mask_plus_nonzeros():
    w = np.random.default_rng(0).standard_normal((128, 256)).astype(np.float16)
    program = lowbit.Program(make_model({"w": w}, [("Gemm", "w", {"transB": 1})]))
    for target in (0.5, 0.75):
        (row,) = lowbit.sparsify_weights(program, target).report.compressed
        expected = w.size // 8 + round(w.size * (1 - target)) * 2
        assert row.bytes_after == expected
        assert row.bytes_after / row.bytes_before == pytest.approx(1 - target + 1 / 16)
    inspected = lowbit.sparsify_weights(program, 0.75).weights()[0]
    assert inspected.compression == "sparse 75%"


def test_joint_palettization_clusters_only_non_zeros():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 64)) + np.sign(rng.standard_normal((64, 64))) * 2).astype(np.float32)
    program = lowbit.Program(make_model({"w": w}, [("Gemm", "w", {"transB": 1})]))
    out = lowbit.sparsify_weights(program, 0.5, palettize_nbits=1)
    lut = out.weights()[0].value.producer().inputs[1].producer().inputs[1].const_value.numpy().reshape(-1)
    assert np.all(np.abs(lut) > 1.0)  # two centroids, one per sign: zeros pulled neither toward 0
    assert out.weights()[0].compression == "sparse 50% + palettized 1-bit, 1 LUT(s)"


def test_masks_exact_counts_ties_and_existing_zeros():
    w = np.array([[0.0, 0.0, 1.0, -1.0], [1.0, 2.0, -2.0, 3.0]], np.float32)
    keep = magnitude_mask(w, 0.5)
    assert keep.tolist() == [[False, False, False, False], [True, True, True, True]]  # ties: lower index first
    assert np.array_equal(magnitude_mask(w, 0.2), w != 0)  # already meets the target: values kept
    groups = n_m_mask(np.array([[1.0, -3.0, 2.0, 0.5, 4.0, 4.0, 4.0, 4.0]]), 2, 4)
    assert groups.tolist() == [[False, True, True, False, False, False, True, True]]
    blocks = block_mask(np.array([[1.0], [1.0], [0.1], [0.1], [5.0], [0.0]], np.float32), 1 / 3, 2)
    assert blocks[:, 0].tolist() == [True, True, False, False, True, True]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(target_sparsity=1.0), ValueError, r"target_sparsity must be in \[0, 1\), got 1.0"),
        (dict(target_sparsity=-0.1), ValueError, "target_sparsity must be in"),
        (dict(target_sparsity="half"), TypeError, "target_sparsity must be a number"),
        (dict(target_sparsity=0.5, block_size=0), ValueError, "block_size must be >= 1"),
        (dict(target_sparsity=0.5, n_m_ratio=(4, 2)), ValueError, "n_m_ratio must be a pair"),
        (dict(target_sparsity=0.5, n_m_ratio=(0, 4)), ValueError, "n_m_ratio must be a pair"),
        (dict(target_sparsity=0.5, n_m_ratio=(2, 4, 1)), ValueError, "n_m_ratio must be a pair"),
        (dict(target_sparsity=0.5, quantize_dtype="int8", palettize_nbits=4), ValueError, "cannot both be set"),
        (dict(target_sparsity=0.5, quantize_dtype=DType.UINT8), ValueError, "quantize_dtype must be one of"),
        (dict(target_sparsity=0.5, palettize_nbits=5), ValueError, "palettize_nbits must be one of"),
    ],
)
def test_invalid_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        lowbit.sparsify_weights(three_weights_program(), **kwargs)


def test_non_dividing_structures_are_skipped_with_warnings():
    w = np.random.default_rng(0).standard_normal((30, 62)).astype(np.float32)  # Gemm transB: 30 out, 62 in
    program = lowbit.Program(make_model({"w": w}, [("Gemm", "w", {"transB": 1})]))
    with pytest.warns(UserWarning, match="'w' skipped: 30 output channels do not divide by block_size 4"):
        lowbit.sparsify_weights(program, 0.5, block_size=4)
    with pytest.warns(UserWarning, match="'w' skipped: 62 input channels do not divide by m=4"):
        lowbit.sparsify_weights(program, 0.5, n_m_ratio=(2, 4))


def test_sparsify_cli(capsys, tmp_path, digits_path):
    from lowbit.cli import main

    out = tmp_path / "s.onnx"
    assert main(["sparsify", str(digits_path), str(out), "--target-sparsity", "0.5", "--quantize-dtype", "int8"]) == 0
    assert "4 compressed" in capsys.readouterr().out
    assert all("sparse 50%" in w.compression for w in lowbit.load(out).weights() if w.compression)
    assert main(["sparsify", str(digits_path), str(out), "--target-sparsity", "1.5"]) == 2
    assert "target_sparsity must be in [0, 1)" in capsys.readouterr().err
    assert main(["sparsify", str(digits_path), str(out), "--target-sparsity", "0.5", "--n-m", "2x4"]) == 2
