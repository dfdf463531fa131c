"""Palettization and quantization records as bytes: equal after the round trip, deterministic, and refused when they
are not one."""

import ml_dtypes
import numpy as np
import pytest

from lowbit.config import PalettizeConfig, QuantizeConfig
from lowbit.types import CompressionGranularity, DType
from lowbit.weight_bytes import (
    palettized_from_bytes,
    palettized_to_bytes,
    quantized_from_bytes,
    quantized_to_bytes,
)
from lowbit.weights import palettize_weight, quantize_weight

CASES = [
    ({"n_bits": 4}, np.float32),
    ({"n_bits": 3, "granularity": CompressionGranularity.PER_GROUPED_CHANNEL, "group_size": 5}, np.float16),
    ({"n_bits": 2, "lut_dtype": DType.INT8, "enable_per_channel_scale": True}, np.float32),
    ({"n_bits": 2, "cluster_dim": 2}, ml_dtypes.bfloat16),
]


@pytest.mark.parametrize(("options", "dtype"), CASES)
def test_round_trip_is_exact_and_deterministic(options, dtype):
    array = np.random.default_rng(0).standard_normal((24, 40)).astype(dtype)
    weight = palettize_weight(array, 0, PalettizeConfig(weight_num_threshold=0, **options))
    blob = palettized_to_bytes(weight)
    assert blob == palettized_to_bytes(weight)
    again = palettized_from_bytes(blob)
    assert again.shape == weight.shape and again.forward == weight.forward
    assert again.rel_mse == weight.rel_mse and again.nbytes == weight.nbytes
    np.testing.assert_array_equal(again.decode().view(np.uint8), weight.decode().view(np.uint8))
    assert palettized_to_bytes(again) == blob


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x05" + b"\x00" * 7 + b"{}",
        palettized_to_bytes(
            palettize_weight(np.ones((4, 300), np.float32), 0, PalettizeConfig(weight_num_threshold=0))
        )[:-1],
    ],
)
def test_what_is_not_a_record_is_refused(blob):
    with pytest.raises(ValueError, match="not a lowbit palettization record"):
        palettized_from_bytes(blob)


QUANTIZE_CASES = [
    ({"dtype": DType.INT4, "granularity": CompressionGranularity.PER_BLOCK, "block_size": 16}, np.float32),
    ({"dtype": DType.UINT4, "qscheme": "ASYMMETRIC", "granularity": "PER_BLOCK", "block_size": 12}, np.float16),
    ({"dtype": DType.INT8}, ml_dtypes.bfloat16),
    ({"dtype": DType.FP8_E4M3FN, "granularity": "PER_TENSOR"}, np.float32),
]


@pytest.mark.parametrize(("options", "dtype"), QUANTIZE_CASES)
def test_a_quantization_round_trip_is_exact_and_deterministic(options, dtype):
    array = np.random.default_rng(1).standard_normal((24, 40)).astype(dtype)
    weight = quantize_weight(array, 0, 1, QuantizeConfig(weight_num_threshold=0, **options))
    blob = quantized_to_bytes(weight)
    again = quantized_from_bytes(blob)
    assert again.shape == weight.shape and again.quantized.block == weight.quantized.block
    assert again.rel_mse == weight.rel_mse and again.nbytes == weight.nbytes
    np.testing.assert_array_equal(again.decode().view(np.uint8), weight.decode().view(np.uint8))
    assert quantized_to_bytes(again) == blob


def test_a_record_of_one_kind_is_refused_as_the_other():
    array = np.ones((4, 300), np.float32)
    palettized = palettized_to_bytes(palettize_weight(array, 0, PalettizeConfig(weight_num_threshold=0)))
    quantized = quantized_to_bytes(quantize_weight(array, 0, 1, QuantizeConfig(DType.INT8, weight_num_threshold=0)))
    with pytest.raises(ValueError, match="not a lowbit quantization record"):
        quantized_from_bytes(palettized)
    with pytest.raises(ValueError, match="not a lowbit palettization record"):
        palettized_from_bytes(quantized)
    with pytest.raises(ValueError, match="not a lowbit quantization record"):
        quantized_from_bytes(quantized[:-1])
