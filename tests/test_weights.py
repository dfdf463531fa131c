"""The backend-neutral weight layer: layouts, refusals, importance."""

import pickle

import numpy as np
import pytest

from lowbit.config import PalettizeConfig, SparsifyConfig
from lowbit.errors import SkipWeight
from lowbit.weights import check_eligible, palettize_weight, sparsify_weight


def test_a_refusal_survives_pickling_with_its_warn_flag():
    for skip in (SkipWeight("contains NaN or Inf"), SkipWeight("small", warn=False)):
        again = pickle.loads(pickle.dumps(skip))
        assert (str(again), again.reason, again.warn) == (str(skip), skip.reason, skip.warn)


def test_eligibility():
    with pytest.raises(SkipWeight, match="dtype float64 is not float32/float16/bfloat16") as caught:
        check_eligible((64, 64), np.dtype(np.float64), 0)
    assert caught.value.warn
    with pytest.raises(SkipWeight, match="1024 elements <= weight_num_threshold 1024") as caught:
        check_eligible((32, 32), np.dtype(np.float32), 1024)
    assert not caught.value.warn
    check_eligible((32, 33), np.dtype(np.float16), 1024)


@pytest.mark.parametrize("config", [PalettizeConfig(n_bits=3), PalettizeConfig(granularity="per_channel")])
def test_a_palettized_weight_seen_transposed_decodes_transposed(config):
    w = np.random.default_rng(0).standard_normal((16, 8, 3)).astype(np.float32)
    result = palettize_weight(w, 0, config)
    np.testing.assert_array_equal(result.decode(), result.palettized.decode().reshape(w.shape))
    moved = result.permuted((2, 0, 1))
    assert moved.shape == (3, 16, 8) and moved.rel_mse == result.rel_mse
    np.testing.assert_array_equal(moved.decode(), result.decode().transpose(2, 0, 1))


def test_importance_steers_the_centroids_and_zero_importance_falls_back_to_plain_kmeans():
    w = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float16)
    config = PalettizeConfig(n_bits=2, granularity="per_grouped_channel", group_size=4)
    plain = palettize_weight(w, 0, config)
    important = np.zeros(w.shape, bool)
    important[4:] = np.abs(w[4:]) < 0.3  # the second LUT cares about its small values, the first about none
    weighted = palettize_weight(w, 0, config, importance=important.astype(np.float64))
    np.testing.assert_array_equal(weighted.palettized.lut[0], plain.palettized.lut[0])
    assert np.abs(weighted.palettized.lut[1]).max() < 0.3
    errors = [np.square(r.decode()[important].astype(np.float64) - w[important]).sum() for r in (plain, weighted)]
    assert errors[1] < errors[0] / 10


def test_importance_that_is_not_finite_weighs_nothing():
    """NaN and infinite sensitivities count as zero (then damped like any other), in float16 and float32 alike."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 128)).astype(np.float32)
    config = PalettizeConfig(n_bits=3, granularity="per_grouped_channel", group_size=4)
    for dtype in (np.float16, np.float32):
        importance = rng.uniform(0.0, 1.0, w.shape).astype(dtype)
        broken, zeroed = importance.copy(), importance.copy()
        broken[1, :3] = [np.nan, np.inf, -np.inf]
        zeroed[1, :3] = 0.0
        results = [palettize_weight(w, 0, config, importance=i, damping=0.01) for i in (broken, zeroed)]
        assert results[0].palettized.packed.tobytes() == results[1].palettized.packed.tobytes()
        np.testing.assert_array_equal(results[0].palettized.lut, results[1].palettized.lut)
        assert np.isfinite(results[0].palettized.lut).all()


def test_the_weight_layer_refuses_shapes_that_do_not_split():
    w = np.ones((30, 64), np.float32)
    refusals = [  # LUT groups and quantization blocks may be ragged (tests/onnx); vectors and n:m groups not
        (
            lambda: palettize_weight(
                w, 0, PalettizeConfig(granularity="per_grouped_channel", group_size=7, cluster_dim=2)
            ),
            "group_size 7 does not divide by cluster_dim 2",
        ),
        (lambda: palettize_weight(w, 0, PalettizeConfig(cluster_dim=4)), "cluster_dim 4"),
        (lambda: sparsify_weight(w, 0, 1, SparsifyConfig(0.5, n_m_ratio=(2, 7))), "m=7"),
    ]
    for call, reason in refusals:
        with pytest.raises(SkipWeight, match=reason):
            call()


@pytest.mark.parametrize("kind", ["palettize", "quantize"])
def test_the_error_feedback_gives_the_same_bytes_on_any_threads(kind, monkeypatch):
    """A weight layer's feedback over output channels in several spans (one short), on 1 or 3 threads."""
    import lowbit.kernels.feedback as feedback
    from lowbit.config import QuantizeConfig
    from lowbit.weights import quantize_weight

    monkeypatch.setattr(feedback, "COLUMNS", 4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 160)) @ rng.standard_normal((160, 160))
    w = rng.standard_normal((10, 160)).astype(np.float32)  # [outputs, inputs]: past a block of 128 rows

    def compressed(threads: int) -> np.ndarray:
        if kind == "palettize":
            config = PalettizeConfig(n_bits=3, granularity="per_grouped_channel", group_size=1)
            return palettize_weight(w, 0, config, gram=x.T @ x, threads=threads).decode()
        config = QuantizeConfig(dtype="int4", granularity="per_block", block_size=8)
        return quantize_weight(w, 0, 1, config, gram=x.T @ x, threads=threads).decode()

    one = compressed(1)
    np.testing.assert_array_equal(compressed(3), one)
    monkeypatch.setattr(feedback, "COLUMNS", 256)
    np.testing.assert_array_equal(compressed(1), one)
