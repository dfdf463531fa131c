"""Error feedback for convolutions (one group): calibration takes ``X^T X`` over the windows the weight multiplies
(:mod:`lowbit.kernels.patches`), and the weight layer feeds each code's error forward over (input channel, kernel
position) as for a Linear of the flattened weight."""

import numpy as np
import pytest

from lowbit.config import PalettizeConfig, QuantizeConfig, SparsifyConfig
from lowbit.kernels.patches import Window, patches
from lowbit.statistics import InputMoments
from lowbit.weights import palettize_weight, sparsify_weight
from lowbit.weights.quantize import quantize_weight

CONFIGS = [
    PalettizeConfig(n_bits=3),
    PalettizeConfig(n_bits=4, granularity="per_grouped_channel", group_size=8),
    PalettizeConfig(n_bits=2, granularity="per_tensor"),
    PalettizeConfig(n_bits=3, enable_per_channel_scale=True),
]


def _conv_layer(seed: int, window: Window, channels: int = 6) -> tuple[np.ndarray, np.ndarray, InputMoments]:
    """(a weight [16, channels, *kernel], the rows it multiplies, their moments): inputs whose channels differ in
    scale by 30x and are correlated with each other and along the spatial axes (a smoothed image), as a network's
    are."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((16, channels, *window.kernel)) * 0.1).astype(np.float32)
    scales = np.logspace(-1, 1.5, channels).astype(np.float32)[None, :, None, None]
    noise = rng.standard_normal((4, channels, 13, 13)).astype(np.float32)
    mixed = np.einsum("ij,bjhw->bihw", rng.standard_normal((channels, channels)) + 2 * np.eye(channels), noise)
    x = ((mixed[:, :, 1:, 1:] + mixed[:, :, :-1, :-1] + mixed[:, :, 1:, :-1]) * scales).astype(np.float32)
    moments = InputMoments.empty(channels, full=True, kernel=window.kernel)
    rows = patches(x, window)
    moments.add(rows, -1)
    return weight, rows.astype(np.float64), moments


def _output_error(rows: np.ndarray, weight: np.ndarray, decoded: np.ndarray) -> float:
    change = (decoded.astype(np.float64) - weight).reshape(len(weight), -1)
    return float(np.linalg.norm(rows @ change.T))


WINDOWS = [
    Window((3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
    Window((3, 2), (2, 1), (1, 2), ((0, 1), (1, 0))),
    Window((1, 1), (1, 1), (1, 1), ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.n_bits}-{c.granularity.value}")
@pytest.mark.parametrize("window", WINDOWS, ids=["3x3", "strided", "1x1"])
def test_feedback_lowers_a_convolutions_output_error_below_weighted_kmeans(window, config):
    """On every test layer the codes chosen by feedback give a smaller output error ``||X (W - W_q)^T||`` than the
    activation-weighted k-means' nearest codes, with the same statistics."""
    for seed in range(3):
        weight, rows, moments = _conv_layer(seed, window)
        importance, damping = moments.weighting(weight.shape, 1)
        weighted = palettize_weight(weight, 0, config, "c", importance, damping=damping)
        fed = palettize_weight(weight, 0, config, "c", importance, damping=damping, gram=moments.gram)
        assert _output_error(rows, weight, fed.decode()) < _output_error(rows, weight, weighted.decode())


def test_a_convolution_gets_the_codes_of_its_flattened_weight():
    """The feedback reads a convolution as the Linear ``[out, in * kernel]`` its windows make: the same LUTs and
    codes as the flattened weight given the same statistics."""
    window = WINDOWS[0]
    weight, _, moments = _conv_layer(5, window)
    config = PalettizeConfig(n_bits=3, granularity="per_grouped_channel", group_size=4)
    importance, damping = moments.weighting(weight.shape, 1)
    conv = palettize_weight(weight, 0, config, "c", importance, damping=damping, gram=moments.gram)
    flat = palettize_weight(
        weight.reshape(16, -1), 0, config, "c", importance.reshape(16, -1), damping=damping, gram=moments.gram
    )
    np.testing.assert_array_equal(conv.decode().reshape(16, -1), flat.decode())


def test_a_gram_of_another_size_is_refused():
    weight, _, _ = _conv_layer(0, WINDOWS[0])
    with pytest.raises(ValueError, match="gram must be 54 x 54"):
        palettize_weight(weight, 0, PalettizeConfig(n_bits=3), gram=np.eye(6, dtype=np.float32))


def test_the_statistics_index_the_kernel_axes_after_the_input_channels():
    """A convolution's importance is per (input channel, kernel position); statistics for another kernel are
    refused with both shapes named."""
    weight, rows, moments = _conv_layer(0, WINDOWS[0])
    importance = moments.importance(weight.shape, 1)
    np.testing.assert_allclose(importance[3], (rows**2).mean(0).reshape(6, 3, 3), rtol=1e-6)
    assert moments.channels_first(weight, 1).shape == (54, 16)
    with pytest.raises(ValueError, match=r"statistics of 54 channels for a weight of 6 channels and a \(3, 3\) kernel"):
        moments.importance((16, 6, 3, 2), 1)


QUANTIZE_CONFIGS = [
    QuantizeConfig(dtype="int4"),
    QuantizeConfig(dtype="uint4", qscheme="asymmetric"),
    QuantizeConfig(dtype="int4", granularity="per_block", block_size=4),  # 6 input channels: a padded last block
    QuantizeConfig(dtype="int8"),
]


@pytest.mark.parametrize("config", QUANTIZE_CONFIGS, ids=lambda c: f"{c.dtype.value}-{c.granularity.value}")
@pytest.mark.parametrize("window", WINDOWS, ids=["3x3", "strided", "1x1"])
def test_feedback_lowers_a_quantized_convolutions_output_error_below_rounding(window, config):
    """Linear codes too: GPTQ's feedback over (input channel, kernel position), the scales kept, gives a smaller
    output error than rounding to the same scales on every test layer."""
    for seed in range(3):
        weight, rows, moments = _conv_layer(seed, window)
        rounded = quantize_weight(weight, 0, 1, config)
        fed = quantize_weight(weight, 0, 1, config, moments.gram)
        np.testing.assert_array_equal(fed.quantized.scale, rounded.quantized.scale)
        assert _output_error(rows, weight, fed.decode()) < _output_error(rows, weight, rounded.decode())


SPARSIFY_CONFIGS = [
    SparsifyConfig(target_sparsity=0.5),
    SparsifyConfig(target_sparsity=0.5, n_m_ratio=(2, 4)),
    SparsifyConfig(target_sparsity=0.5, block_size=4),
]


@pytest.mark.parametrize("config", SPARSIFY_CONFIGS, ids=["50%", "2:4", "blocks"])
@pytest.mark.parametrize("window", WINDOWS, ids=["3x3", "strided", "1x1"])
def test_pruning_a_convolution_for_its_output_beats_wandas_mask(window, config):
    """ADMM over a convolution's (input channel, kernel position) pairs: a smaller output error than Wanda's mask
    of the same structure (each output channel's half for unstructured pruning, as ADMM keeps; the same per-pair
    importance; no update) on every test layer, and n:m along the input channels at each kernel position, as
    without calibration."""
    for seed in range(3):
        weight, rows, moments = _conv_layer(seed, window, channels=8)
        importance = moments.importance(weight.shape, 1)
        wanda = sparsify_weight(weight, 0, 1, config, importance).decode()
        if config.n_m_ratio is None and config.block_size == 1:  # Wanda's mask is per output channel
            scores = (np.abs(weight) * np.sqrt(importance)).reshape(16, -1)
            kept = scores >= np.median(scores, axis=1, keepdims=True)
            wanda = np.where(kept.reshape(weight.shape), weight, 0)
        fed = sparsify_weight(weight, 0, 1, config, importance, moments.gram).decode()
        assert (fed != 0).sum() == (wanda != 0).sum()
        if config.n_m_ratio is not None:  # at most 2 of every 4 input channels, per output channel and position
            assert (np.moveaxis(fed != 0, 1, -1).reshape(-1, 4).sum(1) <= 2).all()
        assert _output_error(rows, weight, fed) < _output_error(rows, weight, wanda)


def _grouped_layer(seed: int, groups: int) -> tuple[np.ndarray, np.ndarray, InputMoments]:
    """(a 3 x 3 convolution's weight [16, 8 / groups, 3, 3] of ``groups`` groups, the rows of its whole input's
    windows, their moments: X^T X kept as the groups' blocks)."""
    window = WINDOWS[0]
    _, rows, _ = _conv_layer(seed, window, channels=8)
    rng = np.random.default_rng(seed + 100)
    weight = (rng.standard_normal((16, 8 // groups, 3, 3)) * 0.1).astype(np.float32)
    moments = InputMoments.empty(8, full=True, kernel=(3, 3), groups=groups)
    moments.add(rows.astype(np.float32), -1)
    return weight, rows, moments


def _grouped_error(rows: np.ndarray, weight: np.ndarray, decoded: np.ndarray, groups: int) -> float:
    """``||X (W - W_q)^T||`` of a grouped convolution: each group's output channels over its input's pairs."""
    change = (decoded.astype(np.float64) - weight).reshape(groups, len(weight) // groups, -1)
    by_group = rows.reshape(len(rows), groups, -1)
    return float(np.sqrt(sum(np.linalg.norm(by_group[:, g] @ change[g].T) ** 2 for g in range(groups))))


@pytest.mark.parametrize("groups", [2, 8])
def test_a_grouped_convolutions_moments_are_its_groups_blocks(groups):
    """X^T X of a grouped (8: depthwise) convolution is kept as the diagonal blocks of the whole input's: each
    group's pairs against each other; each output channel's importance is its own group's pairs'."""
    weight, rows, moments = _grouped_layer(0, groups)
    full = InputMoments.empty(8, full=True, kernel=(3, 3))
    full.add(rows.astype(np.float32), -1)
    n = 72 // groups
    assert moments.gram.shape == (groups, n, n)
    scale = float(np.diagonal(full.gram).max())  # float32 sums of other lengths: equal to their rounding
    for g in range(groups):
        block = full.gram[g * n : (g + 1) * n, g * n : (g + 1) * n]
        np.testing.assert_allclose(moments.gram[g], block, rtol=1e-5, atol=1e-6 * scale)
    importance = moments.importance(weight.shape, 1)
    per_output = 16 // groups
    for o in (0, 15):
        expected = (rows**2).mean(0).reshape(groups, -1)[o // per_output].reshape(weight.shape[1:])
        np.testing.assert_allclose(importance[o], expected, rtol=1e-6)


@pytest.mark.parametrize("groups", [2, 8])
def test_a_grouped_convolution_gets_each_groups_feedback(groups):
    """Integer codes per channel: exactly each group's slice quantized with its own block; LUT codes and ADMM
    pruning: a smaller output error than weighted k-means / Wanda's per-output-channel mask, on every test layer."""
    for seed in range(3):
        weight, rows, moments = _grouped_layer(seed, groups)
        config = QuantizeConfig(dtype="int4")
        fed = quantize_weight(weight, 0, 1, config, moments.gram).decode()
        per = 16 // groups
        for g in range(groups):
            part = quantize_weight(weight[g * per : (g + 1) * per], 0, 1, config, moments.gram[g]).decode()
            np.testing.assert_array_equal(fed[g * per : (g + 1) * per], part)
        importance, damping = moments.weighting(weight.shape, 1)
        palette = PalettizeConfig(n_bits=3)
        weighted = palettize_weight(weight, 0, palette, "c", importance, damping=damping).decode()
        lut_fed = palettize_weight(weight, 0, palette, "c", importance, damping=damping, gram=moments.gram).decode()
        assert _grouped_error(rows, weight, lut_fed, groups) < _grouped_error(rows, weight, weighted, groups)
        scores = (np.abs(weight) * np.sqrt(importance)).reshape(16, -1)
        wanda = np.where((scores >= np.median(scores, axis=1, keepdims=True)).reshape(weight.shape), weight, 0)
        pruned = sparsify_weight(weight, 0, 1, SparsifyConfig(target_sparsity=0.5), importance, moments.gram)
        assert _grouped_error(rows, weight, pruned.decode(), groups) < _grouped_error(rows, weight, wanda, groups)


def test_grouped_blocks_that_do_not_divide_the_output_channels_are_refused():
    weight, _, _ = _grouped_layer(0, 2)
    with pytest.raises(ValueError, match=r"groups dividing its 16 output channels"):
        palettize_weight(weight, 0, PalettizeConfig(n_bits=3), gram=np.zeros((3, 36, 36), np.float32))


@pytest.mark.parametrize("groups", [1, 2])
def test_outliers_of_a_convolution_chosen_from_its_gram_alone(groups):
    """Without an importance, the outliers' sensitivity is each pair's energy, its group's for a grouped conv: the
    fraction's count is kept exact and the rest fed back."""
    weight, rows, moments = _grouped_layer(1, groups)
    config = PalettizeConfig(n_bits=3, outlier_fraction=0.02)
    result = palettize_weight(weight, 0, config, "c", gram=moments.gram)
    assert len(result.outliers.positions) == round(0.02 * weight.size)
    plain = palettize_weight(weight, 0, PalettizeConfig(n_bits=3), "c", gram=moments.gram)
    assert _grouped_error(rows, weight, result.decode(), groups) < _grouped_error(rows, weight, plain.decode(), groups)


def test_a_grouped_convolutions_groups_give_the_same_codes_on_any_threads():
    weight, _, moments = _grouped_layer(2, 8)
    importance, damping = moments.weighting(weight.shape, 1)
    config = PalettizeConfig(n_bits=3)
    one, two = (palettize_weight(weight, 0, config, "c", importance, t, damping, moments.gram).decode() for t in (1, 2))
    np.testing.assert_array_equal(one, two)
    quantized = [quantize_weight(weight, 0, 1, QuantizeConfig(dtype="int4"), moments.gram, t).decode() for t in (1, 2)]
    np.testing.assert_array_equal(*quantized)
