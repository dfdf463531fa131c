"""The same weight through the graph door and the torch door gives the same LUTs and indices, bit for bit."""

import functools

import numpy as np
import pytest
from conftest import make_model

import lowbit
from lowbit.kernels.packing import unpack_bits

torch = pytest.importorskip("torch")
from lowbit.torch.palettization import (  # noqa: E402
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
    palettization_of,
)
from lowbit.torch.quantization import (  # noqa: E402
    PostTrainingQuantizer,
    PostTrainingQuantizerConfig,
    quantization_of,
)

CASES = [
    dict(n_bits=4),
    dict(n_bits=3, granularity="per_grouped_channel", group_size=16),
    dict(n_bits=2, granularity="per_grouped_channel", group_size=8, cluster_dim=2),
    dict(n_bits=4, enable_per_channel_scale=True),
    dict(n_bits=4, lut_dtype="int8"),
]


def _graph_kwargs(config: dict) -> dict:
    kwargs = {**config, "num_kmeans_workers": 1}
    if kwargs.pop("lut_dtype", None):
        kwargs["lut_dtype"] = "int8"
    return kwargs


def _initializer(program: lowbit.Program, name: str) -> np.ndarray:
    return program.graph.initializers[name].const_value.numpy()


@pytest.mark.parametrize("config", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fp16_linear_weight_gives_the_same_lut_and_indices_through_either_door(config):
    rng = np.random.default_rng(3)
    weight = (rng.standard_t(5, (64, 96)) * 0.03).astype(np.float16)  # Linear [out, in]
    linear = torch.nn.Linear(96, 64, bias=False).half()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
    model = torch.nn.Sequential(linear)
    torch_cfg = PostTrainingPalettizerConfig.from_dict({"global_config": config})
    record = palettization_of(PostTrainingPalettizer(model, torch_cfg).compress()[0])["weight"]

    # the graph door sees the exporter's form of a Linear: MatMul with B = W^T [in, out], output axis 1
    program = lowbit.Program(make_model({"0.weight": np.ascontiguousarray(weight.T)}, [("MatMul", "0.weight", {})]))
    small = lowbit.palettize_weights(program, **_graph_kwargs(config))
    assert len(small.report.compressed) == 1
    graph_lut = small.graph.initializers.get("0.weight.lut")
    if graph_lut is not None:
        np.testing.assert_array_equal(
            graph_lut.const_value.numpy().view(np.uint16), record.palettized.lut.view(np.uint16)
        )
    else:  # an int8 LUT is a DequantizeLinear of int8 codes and one scale per LUT
        np.testing.assert_array_equal(_initializer(small, "0.weight.lut_q"), record.palettized.lut_quantized.q)
    dense = lowbit.decompress_weights(small).graph.initializers["0.weight"].const_value.numpy()
    np.testing.assert_array_equal(dense.T.view(np.uint16), record.decode().view(np.uint16))
    if config.get("granularity") or config.get("enable_per_channel_scale"):
        # channel-first canonical layout in both doors: the very same packed bytes
        np.testing.assert_array_equal(_initializer(small, "0.weight.indices"), record.palettized.packed)
    else:  # one LUT: each door keeps its weight's own layout, so the codes are the same per element
        n_bits = record.palettized.n_bits
        graph_codes = unpack_bits(_initializer(small, "0.weight.indices"), n_bits, weight.size).reshape(96, 64)
        np.testing.assert_array_equal(graph_codes.T, record.palettized.codes)


def test_conv_weight_gives_the_same_packed_bytes_through_either_door():
    rng = np.random.default_rng(4)
    weight = (rng.standard_normal((32, 8, 3, 3)) * 0.1).astype(np.float16)
    conv = torch.nn.Conv2d(8, 32, 3, bias=False).half()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
    config = {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 8}
    model = PostTrainingPalettizer(
        torch.nn.Sequential(conv), PostTrainingPalettizerConfig.from_dict({"global_config": config})
    ).compress()
    record = palettization_of(model[0])["weight"]
    program = lowbit.Program(make_model({"0.weight": weight}, [("Conv", "0.weight", {})]))
    small = lowbit.palettize_weights(program, num_kmeans_workers=1, **config)
    np.testing.assert_array_equal(_initializer(small, "0.weight.indices"), record.palettized.packed)
    np.testing.assert_array_equal(
        _initializer(small, "0.weight.lut").view(np.uint16), record.palettized.lut.view(np.uint16)
    )


def test_mixed_bits_choose_the_same_widths_and_codes_through_either_door():
    rng = np.random.default_rng(5)
    shapes = [(64, 96), (96, 64), (48, 96)]  # Linear [out, in], chained
    tails = (3, 30, 5)  # degrees of freedom: unlike tails, unlike errors at each width
    weights = [(rng.standard_t(df, shape) * 0.05).astype(np.float32) for df, shape in zip(tails, shapes, strict=True)]
    model = torch.nn.Sequential(*(torch.nn.Linear(s[1], s[0], bias=False) for s in shapes))
    with torch.no_grad():
        for linear, w in zip(model, weights, strict=True):
            linear.weight.copy_(torch.from_numpy(w))
    config = {"granularity": "per_grouped_channel", "group_size": 16}
    palettizer = PostTrainingPalettizer(model, PostTrainingPalettizerConfig.from_dict({"global_config": config}))
    palettized = palettizer.compress(bits_per_weight=4)
    torch_rows = {r.name.split(".")[0]: r for r in palettizer.report().rows}
    program = lowbit.Program(
        make_model(
            {str(i): np.ascontiguousarray(w.T) for i, w in enumerate(weights)},
            [("MatMul", str(i), {}) for i in range(3)],
        )
    )
    small = lowbit.palettize_weights(program, bits_per_weight=4, num_kmeans_workers=1, **config)
    graph_rows = {r.name: r for r in small.report.rows}
    dense = lowbit.decompress_weights(small).graph.initializers
    for i in range(3):
        assert torch_rows[str(i)].note == graph_rows[str(i)].note and "bits/weight budget" in graph_rows[str(i)].note
        record = palettization_of(palettized[i])["weight"]
        np.testing.assert_array_equal(dense[str(i)].const_value.numpy().T, record.decode())
    assert len({r.note for r in graph_rows.values()}) > 1  # mixed


@pytest.mark.parametrize("config", [dict(n_bits=3, granularity="per_grouped_channel", group_size=16), dict(n_bits=4)])
def test_calibrated_palettization_gives_the_same_codes_through_either_door(config):
    """Each weight's statistics are those of the dense model on both doors (the torch door takes its blocks one at
    a time, the graph door all at once), so the activation-weighted k-means and the error feedback land on the
    same codes."""
    model, items, program, feeds = _calibrated_chain()
    torch_config = PostTrainingPalettizerConfig.from_dict({"global_config": config})
    palettized = PostTrainingPalettizer(model, torch_config).compress(
        calibration_data=[torch.from_numpy(x) for x in items]
    )
    small = lowbit.palettize_weights(program, calibration_data=feeds, num_kmeans_workers=1, **config)
    plain = lowbit.palettize_weights(program, num_kmeans_workers=1, **config)
    dense = lowbit.decompress_weights(small).graph.initializers
    data_free = lowbit.decompress_weights(plain).graph.initializers
    for i in range(3):
        decoded = palettization_of(palettized[i])["weight"].decode()
        np.testing.assert_array_equal(dense[str(i)].const_value.numpy().T, decoded)
        assert not np.array_equal(data_free[str(i)].const_value.numpy().T, decoded)  # the data was used


def _calibrated_chain() -> tuple:
    """(model, items, program, feeds): three chained Linears, calibration inputs with correlated, unevenly scaled
    channels, the graph door's program of the same weights (MatMul with B = W^T), and its feeds: each MatMul fed
    what its Linear reads in the dense torch model."""
    rng = np.random.default_rng(8)
    shapes = [(64, 96), (96, 64), (48, 96)]  # Linear [out, in], chained
    weights = [(rng.standard_normal(shape) * 0.05).astype(np.float32) for shape in shapes]
    model = torch.nn.Sequential(*(torch.nn.Linear(s[1], s[0], bias=False) for s in shapes))
    with torch.no_grad():
        for linear, w in zip(model, weights, strict=True):
            linear.weight.copy_(torch.from_numpy(w))
    mixing = (rng.standard_normal((96, 96)) * 0.3 + np.diag(rng.uniform(0.2, 3.0, 96))).astype(np.float32)
    items = [(rng.standard_normal((32, 96)).astype(np.float32) @ mixing) for _ in range(4)]
    program = lowbit.Program(
        make_model(
            {str(i): np.ascontiguousarray(w.T) for i, w in enumerate(weights)},
            [("MatMul", str(i), {}) for i in range(3)],
        )
    )
    feeds = []
    with torch.no_grad():
        for x in items:
            hidden = [torch.from_numpy(x)]
            for linear in list(model)[:-1]:
                hidden.append(linear(hidden[-1]))
            feeds.append({f"x{i}": h.numpy() for i, h in enumerate(hidden)})
    return model, items, program, feeds


@pytest.mark.parametrize(
    "config",
    [
        dict(weight_dtype="int4", granularity="per_block", block_size=32),
        dict(weight_dtype="uint4", granularity="per_block", block_size=48, quantization_scheme="affine"),
        dict(weight_dtype="int8"),
    ],
    ids=lambda c: "-".join(str(v) for v in c.values()),
)
def test_calibrated_quantization_gives_the_same_codes_through_either_door(config):
    """GPTQ's error feedback on both doors, from the dense model's statistics: the same codes and scales."""
    model, items, program, feeds = _calibrated_chain()
    torch_config = PostTrainingQuantizerConfig.from_dict({"global_config": config})
    quantized = PostTrainingQuantizer(model, torch_config).compress(
        calibration_data=[torch.from_numpy(x) for x in items]
    )
    graph = {
        "dtype": config["weight_dtype"].upper(),
        "granularity": config.get("granularity", "per_channel").upper(),
        "qscheme": "ASYMMETRIC" if config.get("quantization_scheme") == "affine" else "SYMMETRIC",
        "block_size": config.get("block_size", 32),
    }
    small = lowbit.quantize_weights(program, calibration_data=feeds, **graph)
    plain = lowbit.quantize_weights(program, **graph)
    dense = lowbit.decompress_weights(small).graph.initializers
    data_free = lowbit.decompress_weights(plain).graph.initializers
    for i in range(3):
        record = quantization_of(quantized[i])["weight"]
        np.testing.assert_array_equal(dense[str(i)].const_value.numpy().T, record.decode())
        assert not np.array_equal(data_free[str(i)].const_value.numpy().T, record.decode())  # the data was used


@pytest.mark.parametrize("calibrated", [False, True])
def test_outliers_give_the_same_weights_through_either_door(calibrated):
    """Outliers kept exact beside the LUTs: the same elements, the same LUTs refitted to the rest, data-free and
    with calibration. With calibration an outlier keeps the value the error feedback leaves it, computed from
    ``X^T X``, which the torch door sums with torch's BLAS and the graph door with numpy's: the same to float32's
    rounding only where the two libraries order the sums differently (MKL and OpenBLAS on an AMD EPYC)."""
    rng = np.random.default_rng(9)
    w = (rng.standard_t(3, (48, 64)) * 0.05).astype(np.float32)  # Linear [out, in]: heavy tails
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w))
    items = [rng.standard_normal((32, 64)).astype(np.float32) * rng.uniform(0.1, 3.0, 64).astype(np.float32)]
    config = dict(n_bits=3, granularity="per_grouped_channel", group_size=16, outlier_fraction=0.01)
    torch_config = PostTrainingPalettizerConfig.from_dict({"global_config": config})
    data = [torch.from_numpy(x) for x in items] if calibrated else None
    palettized = PostTrainingPalettizer(model, torch_config).compress(calibration_data=data)
    program = lowbit.Program(make_model({"w": np.ascontiguousarray(w.T)}, [("MatMul", "w", {})]))
    feeds = [{"x0": x} for x in items] if calibrated else None
    small = lowbit.palettize_weights(program, calibration_data=feeds, num_kmeans_workers=1, **config)
    dense = lowbit.decompress_weights(small).graph.initializers["w"].const_value.numpy().T
    decoded = palettization_of(palettized[0])["weight"].decode()
    if calibrated:  # another element kept, or another code, would differ by a LUT step, not 1e-6
        np.testing.assert_allclose(dense, decoded, rtol=1e-6, atol=1e-7)
    else:
        np.testing.assert_array_equal(dense, decoded)


def _one_weight_through_both_doors(
    module: torch.nn.Module,
    weight: np.ndarray,
    op: str,
    items: list[np.ndarray],
    config: dict,
    attributes=None,
    holder: type[torch.nn.Module] = torch.nn.Sequential,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(torch door's decode, graph door's decode, graph door's data-free decode) of ``weight``, held by ``module``
    (in a ``holder(module)``, its child ``0``) and by a one-op graph (``op`` with ``attributes``), palettized as
    ``config`` says with ``items`` as calibration on both doors."""
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
    torch_config = PostTrainingPalettizerConfig.from_dict({"global_config": config})
    model = PostTrainingPalettizer(holder(module), torch_config).compress(
        calibration_data=[torch.from_numpy(x) for x in items]
    )
    program = lowbit.Program(make_model({"w": weight}, [(op, "w", attributes or {})]))
    graph_config = {"weight_num_threshold": min(1024, weight.size - 1), **config}  # a depthwise weight is small
    small = lowbit.palettize_weights(program, calibration_data=[{"x0": x} for x in items], **graph_config)
    assert len(small.report.compressed) == 1
    plain = lowbit.palettize_weights(program, **graph_config)
    decoded = palettization_of(model.get_submodule("0"))["weight"].decode()
    return (
        decoded,
        _initializer(lowbit.decompress_weights(small), "w"),
        _initializer(lowbit.decompress_weights(plain), "w"),
    )


CONV_GEOMETRIES = [
    ({}, {}),
    ({"stride": 2, "padding": 1}, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ({"dilation": (1, 2), "padding": "same"}, {"dilations": [1, 2], "pads": [1, 2, 1, 2]}),
    ({"groups": 2, "padding": 1}, {"group": 2, "pads": [1, 1, 1, 1]}),
    ({"groups": 6}, {"group": 6}),
]


@pytest.mark.parametrize(
    ("geometry", "attributes"), CONV_GEOMETRIES, ids=["plain", "strided", "dilated", "grouped", "depthwise"]
)
def test_a_calibrated_conv_gets_the_same_error_feedback_through_either_door(geometry, attributes):
    """A convolution's statistics are over the windows its weight multiplies (its strides, dilations and padding
    read from the module on one door, from the Conv's attributes on the other): the same weighted k-means and the
    same error feedback over (input channel, kernel position), the same LUTs and codes."""
    rng = np.random.default_rng(11)
    weight = (rng.standard_normal((24, 6 // geometry.get("groups", 1), 3, 3)) * 0.1).astype(np.float32)
    scales = np.array([0.1, 0.3, 1.0, 3.0, 10.0, 30.0], np.float32)[None, :, None, None]
    items = [(rng.standard_normal((2, 6, 8, 8)) * scales).astype(np.float32) for _ in range(3)]
    conv = torch.nn.Conv2d(6, 24, 3, bias=False, **geometry)
    decoded, graph, data_free = _one_weight_through_both_doors(conv, weight, "Conv", items, {"n_bits": 3}, attributes)
    np.testing.assert_array_equal(graph, decoded)
    assert not np.array_equal(data_free, decoded)


TRANSPOSED_GEOMETRIES = [
    ({"stride": 2}, {"strides": [2, 2]}, {}),
    (
        {"stride": 2, "padding": 1, "output_padding": 1},
        {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
        {},
    ),
    ({"stride": 2, "padding": 1}, {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, {"size": 16}),
    ({"dilation": 2, "padding": 2}, {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, {}),
    ({"stride": 2, "groups": 2}, {"strides": [2, 2], "group": 2}, {}),
]


@pytest.mark.parametrize(
    ("geometry", "attributes", "call"),
    TRANSPOSED_GEOMETRIES,
    ids=["upsample", "padded", "output_size", "dilated", "grouped"],
)
def test_a_calibrated_conv_transpose_gets_the_same_error_feedback_through_either_door(geometry, attributes, call):
    """A transposed convolution's statistics are over the windows its weight multiplies (its input with the
    stride's zeros between values): read from the module (and, called with ``output_size``, from its output's
    size) on one door, from the ConvTranspose's attributes on the other; the same LUTs and codes."""
    rng = np.random.default_rng(14)
    weight = (rng.standard_normal((6, 16 // geometry.get("groups", 1), 3, 3)) * 0.1).astype(np.float32)
    scales = np.array([0.1, 0.3, 1.0, 3.0, 10.0, 30.0], np.float32)[None, :, None, None]
    items = [(rng.standard_normal((2, 6, 8, 8)) * scales).astype(np.float32) for _ in range(3)]
    up = torch.nn.ConvTranspose2d(6, 16, 3, bias=False, **geometry)
    holder = functools.partial(_Sized, size=call["size"]) if call else torch.nn.Sequential
    decoded, graph, data_free = _one_weight_through_both_doors(
        up, weight, "ConvTranspose", items, {"n_bits": 3}, attributes, holder
    )
    np.testing.assert_array_equal(graph, decoded)
    assert not np.array_equal(data_free, decoded)


class _Sized(torch.nn.Module):
    """Its child ``0``, a transposed convolution, called with ``output_size`` (its output padding set by the
    call)."""

    def __init__(self, up: torch.nn.ConvTranspose2d, size: int) -> None:
        super().__init__()
        self.add_module("0", up)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule("0")(x, output_size=[self.size, self.size])


@pytest.mark.parametrize("config", [dict(n_bits=3), dict(n_bits=2, granularity="per_grouped_channel", group_size=8)])
def test_a_calibrated_embedding_gets_the_same_lookup_weighted_palette_through_either_door(config):
    """An embedding's statistics are its rows' lookup counts on both doors (a Gather's one-hot input): the same
    weighted k-means, the same LUTs and codes, and not the data-free ones."""
    rng = np.random.default_rng(12)
    table = (rng.standard_normal((96, 16)) * 0.1).astype(np.float32)
    items = [rng.choice(12, 20) for _ in range(3)]  # a few rows looked up, often
    embedding = torch.nn.Embedding(96, 16)
    decoded, graph, data_free = _one_weight_through_both_doors(embedding, table, "Gather", items, config)
    np.testing.assert_array_equal(graph, decoded)
    assert not np.array_equal(data_free, decoded)
    looked_up = np.unique(np.concatenate(items))
    errors = [np.abs(w - table)[looked_up].sum() for w in (decoded, data_free)]
    assert errors[0] < errors[1], errors  # the rows looked up are served better


@pytest.mark.parametrize(
    "config",
    [dict(weight_dtype="int4"), dict(weight_dtype="int4", granularity="per_block", block_size=4)],
    ids=["int4", "int4-block4"],
)
def test_a_calibrated_conv_gets_the_same_integer_codes_through_either_door(config):
    """GPTQ's feedback over a convolution's (input channel, kernel position) pairs on both doors: the same codes,
    and not the rounded ones."""
    rng = np.random.default_rng(13)
    weight = (rng.standard_normal((16, 6, 3, 3)) * 0.1).astype(np.float32)
    scales = np.array([0.1, 0.3, 1.0, 3.0, 10.0, 30.0], np.float32)[None, :, None, None]
    items = [(rng.standard_normal((2, 6, 8, 8)) * scales).astype(np.float32) for _ in range(3)]
    conv = torch.nn.Conv2d(6, 16, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
    torch_config = PostTrainingQuantizerConfig.from_dict({"global_config": config})
    quantized = PostTrainingQuantizer(torch.nn.Sequential(conv), torch_config).compress(
        calibration_data=[torch.from_numpy(x) for x in items]
    )
    program = lowbit.Program(make_model({"w": weight}, [("Conv", "w", {"strides": [2, 2], "pads": [1, 1, 1, 1]})]))
    graph = {"dtype": "INT4", "granularity": config.get("granularity", "per_channel").upper(), "block_size": 4}
    graph["weight_num_threshold"] = 512  # 864 elements
    small = lowbit.quantize_weights(program, calibration_data=[{"x0": x} for x in items], **graph)
    plain = lowbit.quantize_weights(program, **graph)
    decoded = quantization_of(quantized[0])["weight"].decode()
    np.testing.assert_array_equal(_initializer(lowbit.decompress_weights(small), "w"), decoded)
    assert not np.array_equal(_initializer(lowbit.decompress_weights(plain), "w"), decoded)
