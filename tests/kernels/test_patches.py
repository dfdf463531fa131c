"""The rows a convolution multiplies its weight by (im2col), against PyTorch's convolutions: the patches times the
flattened weight are the convolution's output, for 1-D / 2-D / 3-D kernels, strides, dilations, every padding."""

import numpy as np
import pytest

from lowbit.kernels.patches import Window, patch_blocks, patches

torch = pytest.importorskip("torch")

TORCH_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
CASES = [  # kernel, stride, dilation, pads (before, after) per axis, torch's padding_mode
    ((3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), "zeros"),
    ((3, 5), (2, 1), (1, 2), ((0, 0), (0, 0)), "zeros"),
    ((4,), (1,), (2,), ((3, 0),), "zeros"),  # uneven padding: torch pads first
    ((2, 3, 1), (1, 2, 1), (1, 1, 1), ((1, 1), (0, 1), (0, 0)), "zeros"),
    ((3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), "reflect"),
    ((3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)), "circular"),
    ((3, 3), (1, 1), (1, 1), ((2, 2), (1, 1)), "replicate"),
]


@pytest.mark.parametrize(("kernel", "stride", "dilation", "pads", "mode"), CASES)
def test_patches_times_the_weight_are_the_convolution(kernel, stride, dilation, pads, mode):
    rng = np.random.default_rng(0)
    rank = len(kernel)
    x = rng.standard_normal((2, 3, *(9,) * rank)).astype(np.float32)
    w = rng.standard_normal((4, 3, *kernel)).astype(np.float32)
    padded = torch.nn.functional.pad(
        torch.from_numpy(x), [p for pair in pads[::-1] for p in pair], mode="constant" if mode == "zeros" else mode
    )
    conv = getattr(torch.nn.functional, f"conv{rank}d")
    y = conv(padded, torch.from_numpy(w), stride=stride, dilation=dilation).numpy()
    rows = patches(x, Window(kernel, stride, dilation, pads, pad_mode=TORCH_PAD_MODES[mode]))
    ours = np.moveaxis((rows @ w.reshape(4, -1).T).reshape(2, *y.shape[2:], 4), -1, 1)
    np.testing.assert_allclose(ours, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("same", "stride"), [("upper", 1), ("lower", 1), ("upper", 2)])
def test_same_padding_keeps_ceil_size_over_stride_positions(same, stride):
    """ONNX's SAME_UPPER / SAME_LOWER: the odd padding element after / before; torch's padding="same" is upper."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 7, 8)).astype(np.float32)
    w = rng.standard_normal((3, 2, 2, 3)).astype(np.float32)
    window = Window((2, 3), (stride, stride), (1, 1), ((0, 0), (0, 0)), same)
    pairs = window.padding((7, 8))
    totals = [max(0, (-(-n // stride) - 1) * stride + k - n) for n, k in ((7, 2), (8, 3))]
    assert [sum(p) for p in pairs] == totals
    padded = torch.nn.functional.pad(torch.from_numpy(x), [p for pair in pairs[::-1] for p in pair])
    y = torch.nn.functional.conv2d(padded, torch.from_numpy(w), stride=stride).numpy()
    assert y.shape[2:] == (-(-7 // stride), -(-8 // stride))
    rows = patches(x, window)
    np.testing.assert_allclose(rows @ w.reshape(3, -1).T, np.moveaxis(y, 1, -1).reshape(-1, 3), rtol=1e-5, atol=1e-5)
    if stride == 1:
        assert pairs[0] == ((0, 1) if same == "upper" else (1, 0))


def test_bad_windows_and_inputs_are_refused():
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        Window((3, 3), (1,), (1, 1), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="positive"):
        Window((3,), (0,), (1,), ((0, 0),))
    with pytest.raises(ValueError, match="pad_mode"):
        Window((3,), (1,), (1,), ((0, 0),), pad_mode="mirror")
    window = Window((3, 3), (1, 1), (1, 1), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="must have 4 axes"):
        patches(np.zeros((1, 2, 5), np.float32), window)
    with pytest.raises(ValueError, match="smaller than its kernel"):
        patches(np.zeros((1, 2, 2, 5), np.float32), window)


@pytest.mark.parametrize("elements", [1, 300, 5000, 1 << 24])
def test_blocks_of_rows_are_the_patches_in_order_and_bounded(elements):
    """A high-resolution input's rows come a slab of output positions at a time: concatenated they are the rows,
    each block within ``elements`` values unless one line of positions is more."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 11, 9)).astype(np.float32)
    window = Window((3, 3), (2, 1), (1, 1), ((1, 1), (1, 1)))
    blocks = list(patch_blocks(x, window, elements))
    np.testing.assert_array_equal(np.concatenate(blocks), patches(x, window))
    line = 9 * 27  # one output line: 9 positions of 27 values
    assert all(b.size <= max(elements, line) for b in blocks)
    assert len(blocks) == (2 if elements >= 6 * line else 2 * -(-6 // max(1, elements // line)))


TRANSPOSED = [  # kernel, stride, dilation, pads (before, after), output_padding
    ((2, 2), (2, 2), (1, 1), ((0, 0), (0, 0)), (0, 0)),  # PP-OCR's upsampling
    ((3, 3), (2, 2), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((4,), (2,), (1,), ((1, 1),), (0,)),
    ((16,), (8,), (1,), ((4, 4),), (0,)),  # a vocoder's upsampler
    ((3, 2), (1, 3), (2, 1), ((2, 2), (0, 0)), (0, 2)),
    ((3, 3, 2), (2, 1, 2), (1, 1, 1), ((1, 1), (0, 0), (1, 1)), (1, 0, 0)),
    ((3,), (2,), (1,), ((3, 3),), (0,)),  # pads past the kernel's reach: the output cropped
]


@pytest.mark.parametrize(("kernel", "stride", "dilation", "pads", "extra"), TRANSPOSED)
def test_patches_times_the_weight_are_the_transposed_convolution(kernel, stride, dilation, pads, extra):
    rng = np.random.default_rng(2)
    rank = len(kernel)
    x = rng.standard_normal((2, 3, *(5,) * rank)).astype(np.float32)
    w = rng.standard_normal((3, 4, *kernel)).astype(np.float32)  # [in, out, *kernel]
    conv = getattr(torch.nn.functional, f"conv_transpose{rank}d")
    padding = [before for before, _ in pads]
    assert all(before == after for before, after in pads)  # torch pads both sides alike
    y = conv(
        torch.from_numpy(x),
        torch.from_numpy(w),
        stride=stride,
        padding=padding,
        output_padding=extra,
        dilation=dilation,
    ).numpy()
    rows = patches(x, Window(kernel, stride, dilation, pads, transposed=True, output_padding=extra))
    ours = np.moveaxis((rows @ w.swapaxes(0, 1).reshape(4, -1).T).reshape(2, *y.shape[2:], 4), -1, 1)
    np.testing.assert_allclose(ours, y, rtol=1e-5, atol=1e-5)


def test_transposed_windows_pad_with_zeros_only():
    with pytest.raises(ValueError, match="transposed window pads with zeros"):
        Window((2,), (2,), (1,), ((0, 0),), pad_mode="reflect", transposed=True)
    with pytest.raises(ValueError, match="output_padding is a transposed window's"):
        Window((2,), (2,), (1,), ((0, 0),), output_padding=(1,))
    with pytest.raises(ValueError, match="output_shape is a transposed window's"):
        Window((2,), (2,), (1,), ((0, 0),), transposed=True, output_shape=(4, 4))
