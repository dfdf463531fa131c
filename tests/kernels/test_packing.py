import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels.packing import pack_bits, packed_nbytes, unpack_bits


def reference_pack(codes: np.ndarray, n_bits: int) -> np.ndarray:
    """The bit stream spelled out: bit j of code i is stream bit i*n + j, little-endian within bytes."""
    bits = (codes.reshape(-1, 1).astype(np.int64) >> np.arange(n_bits)) & 1
    return np.packbits(bits.reshape(-1).astype(np.uint8), bitorder="little")


@settings(max_examples=200, deadline=None)
@given(n_bits=st.integers(1, 8), count=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_pack_matches_reference_stream_and_round_trips(n_bits, count, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << n_bits, count).astype(np.uint8)
    packed = pack_bits(codes, n_bits)
    assert packed.dtype == np.uint8
    assert packed.size == packed_nbytes(count, n_bits) == (count * n_bits + 7) // 8
    np.testing.assert_array_equal(packed, reference_pack(codes, n_bits))
    np.testing.assert_array_equal(unpack_bits(packed, n_bits, count), codes)


def test_low_bits_first():
    assert pack_bits(np.array([1, 2]), 4).tolist() == [0x21]
    assert pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0x81]
    # 3-bit codes straddle bytes: 0b101 | 0b011 << 3 | 0b111 << 6 -> low byte 0b11_011_101, then bit 1 of byte 2
    assert pack_bits(np.array([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]


@pytest.mark.parametrize("n_bits", [0, 9, 2.0, True])
def test_bad_n_bits(n_bits):
    with pytest.raises(ValueError, match="n_bits"):
        pack_bits(np.zeros(4, np.uint8), n_bits)


def test_code_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_bits(np.array([16]), 4)
    with pytest.raises(ValueError, match="codes"):
        pack_bits(np.array([-1]), 4)


def test_unpack_too_few_bytes():
    with pytest.raises(ValueError, match="needed"):
        unpack_bits(np.zeros(1, np.uint8), 3, 4)
