"""Dense-and-sparse palettization (``outlier_fraction``): the worst-served weights kept exact beside the LUTs, in the
weight layer, the ONNX encoding (decoded by ONNX Runtime bit for bit as ``decompress_weights`` does), the CLI and
a torch record."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model, ort_session, three_weights_feeds, three_weights_program

import lowbit
from lowbit.cli import main
from lowbit.config import PalettizeConfig
from lowbit.statistics import ACTIVATION_DAMPING
from lowbit.weight_bytes import palettized_from_bytes, palettized_to_bytes
from lowbit.weights import palettize_weight

RNG = np.random.default_rng(0)
HEAVY = (RNG.standard_t(3, (96, 128)) * 0.02).astype(np.float32)  # heavy tails: outliers matter
OPTIONS = {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 16, "weight_num_threshold": 0}


@pytest.mark.parametrize("fraction", [0.005, 0.02])
def test_outliers_are_kept_and_the_error_drops(fraction):
    plain = palettize_weight(HEAVY, 0, PalettizeConfig(**OPTIONS))
    dense_sparse = palettize_weight(HEAVY, 0, PalettizeConfig(outlier_fraction=fraction, **OPTIONS))
    assert dense_sparse.outliers is not None
    positions = dense_sparse.outliers.positions
    assert len(positions) == round(fraction * HEAVY.size)
    decoded = dense_sparse.decode()
    np.testing.assert_array_equal(decoded.reshape(-1)[positions], HEAVY.reshape(-1)[positions])  # to the bit
    assert dense_sparse.rel_mse < 0.8 * plain.rel_mse
    measured = float(((decoded.astype(np.float64) - HEAVY) ** 2).sum() / (HEAVY.astype(np.float64) ** 2).sum())
    assert dense_sparse.rel_mse == pytest.approx(measured, rel=1e-9)
    extra = 8 * len(positions)  # an int32 position and an fp32 value per outlier
    assert dense_sparse.nbytes == dense_sparse.without_outliers().nbytes + extra
    again = palettize_weight(HEAVY, 0, PalettizeConfig(outlier_fraction=fraction, **OPTIONS))
    assert palettized_to_bytes(again) == palettized_to_bytes(dense_sparse)  # deterministic
    restored = palettized_from_bytes(palettized_to_bytes(dense_sparse))
    np.testing.assert_array_equal(restored.decode(), decoded)


def test_outliers_with_error_feedback_lower_the_layer_output_error():
    x = RNG.standard_normal((1024, 128)).astype(np.float32) * np.linspace(0.1, 3, 128, dtype=np.float32)
    gram = x.T.astype(np.float64) @ x
    errors = {}
    for fraction in (0.0, 0.01):
        weight = palettize_weight(HEAVY, 0, PalettizeConfig(outlier_fraction=fraction, **OPTIONS), gram=gram)
        out = x @ weight.decode().T.astype(np.float64)
        errors[fraction] = float(((out - x @ HEAVY.T.astype(np.float64)) ** 2).sum())
    assert errors[0.01] < 0.7 * errors[0.0]


def test_a_weight_too_small_for_one_outlier_gets_none():
    """``round(fraction * size)`` is 0: no empty correction is stored (Core AI's runtime dies on an empty scatter)."""
    small = HEAVY[:16, :16]
    with_fraction = palettize_weight(small, 0, PalettizeConfig(outlier_fraction=0.001, **OPTIONS))
    assert with_fraction.outliers is None
    plain = palettize_weight(small, 0, PalettizeConfig(**OPTIONS))
    assert palettized_to_bytes(with_fraction) == palettized_to_bytes(plain)


def test_permuted_outliers_follow_their_elements():
    weight = palettize_weight(HEAVY, 0, PalettizeConfig(outlier_fraction=0.01, **OPTIONS))
    np.testing.assert_array_equal(weight.permuted((1, 0)).decode(), weight.decode().T)


def test_onnx_runtime_decodes_what_decompress_does(tmp_path):
    program = three_weights_program(np.float32)
    out = lowbit.palettize_weights(program, outlier_fraction=0.01, **OPTIONS)
    plain = lowbit.palettize_weights(three_weights_program(np.float32), **OPTIONS)
    for row, base in zip(out.report.rows, plain.report.rows, strict=True):
        assert row.rel_mse < base.rel_mse and row.bytes_after > base.bytes_after
    saved = out.save(tmp_path / "outliers.onnx")
    again = lowbit.load(saved)
    assert all("outliers kept exact" in w.compression for w in again.weights())
    dense = lowbit.decompress_weights(again).save(tmp_path / "dense.onnx")
    feeds = three_weights_feeds(np.float32)
    want = ort_session(Path(dense)).run(None, feeds)
    for level, tolerance in (("disable", 1e-6), ("all", 1e-4)):  # "all": ORT's own conv kernels differ a little
        got = ort_session(Path(saved), level).run(None, feeds)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=tolerance, atol=tolerance)
    decoded = again.weight_arrays()
    for weight in again.weights():  # the decode, read back, is the weight layer's, bit for bit
        source = three_weights_program(np.float32).graph.initializers[weight.name].const_value.numpy()
        config = PalettizeConfig(outlier_fraction=0.01, **OPTIONS)
        expected = palettize_weight(source, weight.output_axis, config, damping=ACTIVATION_DAMPING)
        np.testing.assert_array_equal(decoded[weight.name], expected.decode())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = lowbit.palettize_weights(again, **OPTIONS)
    assert not second.report.compressed and caught  # a second pass leaves them, saying why


def test_onnxruntime_target_says_outliers_need_the_portable_encoding():
    weights = {"w": (RNG.standard_normal((64, 64)) * 0.1).astype(np.float32)}
    program = lowbit.Program(make_model(weights, [("MatMul", "w", {})]))
    out = lowbit.palettize_weights(
        program, n_bits=4, lut_dtype="int8", outlier_fraction=0.01, target="onnxruntime", weight_num_threshold=0
    )
    assert out.report.rows[0].note.endswith("outliers need the portable encoding")


def test_invalid_fractions_are_refused(tmp_path, capsys):
    program = three_weights_program(np.float32)
    for bad, error in ((0.2, ValueError), (-0.01, ValueError), ("1%", TypeError)):
        with pytest.raises(error, match="outlier_fraction must be"):
            lowbit.palettize_weights(program, outlier_fraction=bad)
    with pytest.raises(ValueError, match="outlier_fraction needs mode='kmeans'"):
        lowbit.palettize_weights(program, outlier_fraction=0.01, mode="uniform")
    source = lowbit.Program(program.model).save(tmp_path / "m.onnx")
    assert main(["palettize", str(source), str(tmp_path / "o.onnx"), "--outlier-fraction", "0.5"]) == 2
    assert "outlier_fraction must be in [0, 0.1], got 0.5" in capsys.readouterr().err
    assert main(["palettize", str(source), str(tmp_path / "o.onnx"), "--outlier-fraction", "0.01"]) == 0
    assert all("outliers kept exact" in w.compression for w in lowbit.load(tmp_path / "o.onnx").weights())


def test_torch_record_keeps_the_outliers_through_export(tmp_path):
    torch = pytest.importorskip("torch")
    import lowbit.torch
    from lowbit.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(HEAVY))
    config = PostTrainingPalettizerConfig.from_dict({"global_config": {"n_bits": 3, "outlier_fraction": 0.01}})
    small = PostTrainingPalettizer(model, config).compress()
    record = lowbit.torch.palettization_of(small)["0.weight"]
    assert record.outliers is not None
    np.testing.assert_array_equal(small[0].weight.detach().numpy(), record.decode())
    x = torch.randn(3, 128)
    program = lowbit.torch.export_onnx(small, (x,), tmp_path / "t.onnx", input_names=["x"])
    assert {r.name for r in program.report.rows} == {"0.weight", "2.weight"}
    with torch.no_grad():
        want = small(x).numpy()
    np.testing.assert_allclose(
        ort_session(tmp_path / "t.onnx", "all").run(None, {"x": x.numpy()})[0], want, rtol=1e-5, atol=1e-6
    )


def test_outliers_with_calibration_on_a_weight_with_more_inputs_than_outputs():
    """Per tensor the weight keeps its own layout (input channels first for a MatMul): the outliers' mask follows."""
    weight = (RNG.standard_t(3, (64, 40)) * 0.05).astype(np.float32)  # MatMul B: 64 inputs, 40 outputs
    x = RNG.standard_normal((256, 64)).astype(np.float32)
    gram = x.T.astype(np.float64) @ x
    config = PalettizeConfig(n_bits=3, outlier_fraction=0.01, weight_num_threshold=0)
    result = palettize_weight(weight, 1, config, gram=gram)
    plain = palettize_weight(weight, 1, PalettizeConfig(n_bits=3, weight_num_threshold=0), gram=gram)
    errors = [float(((x @ r.decode() - x @ weight) ** 2).sum()) for r in (result, plain)]
    assert len(result.outliers.positions) == round(0.01 * weight.size) and errors[0] < errors[1]
