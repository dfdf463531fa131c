"""A palettization record as bytes: equal after the round trip, deterministic, and refused when it is not one."""

import ml_dtypes
import numpy as np
import pytest

from lowbit.config import PalettizeConfig
from lowbit.types import CompressionGranularity, DType
from lowbit.weight_bytes import palettized_from_bytes, palettized_to_bytes
from lowbit.weights import palettize_weight

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
