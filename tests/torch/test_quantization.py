"""PostTrainingQuantizer: configs, GPTQ's error feedback from calibration, records, the report, and export to ONNX
Runtime."""

import copy
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ort_session
from tied_lm import TiedLM

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lowbit.torch  # noqa: E402
from lowbit.torch.quantization import (  # noqa: E402
    ModulePostTrainingQuantizerConfig,
    PostTrainingQuantizer,
    PostTrainingQuantizerConfig,
    quantization_of,
)

INT4_BLOCKS = {"weight_dtype": "int4", "granularity": "per_block", "block_size": 32}
CONFIGS = [
    INT4_BLOCKS,
    {**INT4_BLOCKS, "weight_dtype": "uint4", "quantization_scheme": "affine", "block_size": 48},  # a ragged block
    {"weight_dtype": "int8"},
    {"weight_dtype": "uint8", "granularity": "per_tensor", "quantization_scheme": "affine"},
    {"weight_dtype": "fp8_e4m3"},
]


def _ids(config: dict) -> str:
    return "-".join(str(v) for v in config.values())


def _quantized(model: nn.Module, config: dict, **compress) -> nn.Module:
    quantizer = PostTrainingQuantizer(model, PostTrainingQuantizerConfig.from_dict({"global_config": config}))
    return quantizer.compress(**compress)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"weight_dtype": "int3"}, "weight_dtype"),
        ({"granularity": "per_grouped_channel"}, "granularity"),
        ({"quantization_scheme": "asymmetric"}, "quantization_scheme"),
        ({"granularity": "per_block"}, "block_size"),
        ({"block_size": 32}, "block_size"),
        ({"granularity": "per_block", "block_size": 0}, "block_size"),
        ({"weight_dtype": "fp8_e5m2", "quantization_scheme": "affine"}, "quantization_scheme"),
        ({"weight_dtype": "fp8_e4m3", "scale_search": True}, "scale_search"),
    ],
)
def test_a_bad_option_is_refused_naming_it(options, named):
    with pytest.raises((ValueError, TypeError), match=named):
        ModulePostTrainingQuantizerConfig(**options)


def test_configs_take_torch_dtypes_and_round_trip_through_dicts():
    config = ModulePostTrainingQuantizerConfig(weight_dtype=torch.uint8, granularity="PER_BLOCK", block_size=16)
    assert config.weight_dtype == "uint8" and config.granularity == "per_block"
    whole = PostTrainingQuantizerConfig(global_config=config, module_name_configs={"head": None})
    assert PostTrainingQuantizerConfig.from_dict(whole.as_dict()) == whole


def _chain(rng: np.random.Generator) -> tuple[nn.Module, list[np.ndarray]]:
    """Three chained Linears and calibration inputs whose channels are correlated and unevenly scaled."""
    model = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 96), nn.Linear(96, 48))
    mixing = (rng.standard_normal((96, 96)) * 0.3 + np.diag(rng.uniform(0.2, 3.0, 96))).astype(np.float32)
    items = [(rng.standard_normal((32, 96)).astype(np.float32) @ mixing) for _ in range(6)]
    return model, items


def _output_error(dense: nn.Linear, quantized: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((dense(x) - quantized(x)).square().sum())


@pytest.mark.parametrize("config", CONFIGS[:3], ids=_ids)
def test_error_feedback_lowers_each_layers_output_error(config):
    torch.manual_seed(0)
    model, items = _chain(np.random.default_rng(1))
    calibration, held_out = [torch.from_numpy(x) for x in items[:4]], torch.from_numpy(np.concatenate(items[4:]))
    rounded = _quantized(model, config)
    fed_back = _quantized(model, config, calibration_data=calibration)
    error = _output_error(model[0], fed_back[0], held_out)
    assert error < 0.9 * _output_error(model[0], rounded[0], held_out)  # on inputs the calibration did not see
    for i in range(3):  # same scales: only the codes moved
        a, b = quantization_of(rounded[i])["weight"].quantized, quantization_of(fed_back[i])["weight"].quantized
        np.testing.assert_array_equal(a.scale, b.scale)
        assert not np.array_equal(a.q, b.q)


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_the_parameter_holds_the_records_decode_and_the_report_counts_the_codes(config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    before = model[0].weight.detach().clone()
    quantized = _quantized(model, config)
    records = quantization_of(quantized)
    assert set(records) == {"0.weight", "2.weight"}
    for name, record in records.items():
        np.testing.assert_array_equal(record.decode(), quantized.get_parameter(name).detach().numpy())
    rows = {r.name: r for r in lowbit.torch.report(quantized).rows}
    assert rows["0.weight"].compression == "quantized"
    assert rows["0.weight"].bytes_after == records["0.weight"].nbytes < rows["0.weight"].bytes_before
    assert torch.equal(model[0].weight, before) and not torch.equal(before, quantized[0].weight)  # a copy quantized


class Sequence3d(nn.Module):
    """Linears over a (batch, time, channels) input: the exporter stores their weights transposed for MatMul."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("three_d", [False, True], ids=["gemm", "matmul"])
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_export_writes_dequantize_linear_that_onnxruntime_runs_as_torch(tmp_path, config, three_d):
    torch.manual_seed(0)
    model = Sequence3d()
    x = torch.randn(4, 8, 64) if three_d else torch.randn(8, 64)
    quantized = _quantized(model, config, calibration_data=[torch.randn(16, 64) for _ in range(2)])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(stored|exported) dense")
        program = lowbit.torch.export_onnx(quantized, (x,), tmp_path / "q.onnx", input_names=["x"])
    assert [r.compression for r in program.report.rows] == ["quantized"] * 2
    nodes = [n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node]
    assert nodes.count("DequantizeLinear") == 2
    with torch.no_grad():
        expected = quantized(x).numpy()
    np.testing.assert_allclose(ort_session(tmp_path / "q.onnx", "basic").run(None, {"x": x.numpy()})[0], expected,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # at ONNX Runtime's default level the blocked int4 / int8 DequantizeLinear -> MatMul become MatMulNBits, whose
    # default accuracy level quantizes the activations to int8; level 0 keeps float arithmetic
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)
    dense = lowbit.torch.export_onnx(model, (x,), tmp_path / "dense.onnx", input_names=["x"])
    assert (tmp_path / "q.onnx").stat().st_size < 0.6 * (tmp_path / "dense.onnx").stat().st_size
    assert dense.report.rows == []


def test_records_survive_state_dict_torch_save_and_deepcopy(tmp_path):
    torch.manual_seed(0)
    quantized = _quantized(Sequence3d(), INT4_BLOCKS)
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    buffer.seek(0)
    fresh = lowbit.torch.load_state_dict(Sequence3d(), buffer)
    for copy_ in (fresh, copy.deepcopy(quantized)):
        for name, record in quantization_of(quantized).items():
            again = quantization_of(copy_)[name]
            np.testing.assert_array_equal(again.quantized.q, record.quantized.q)
            np.testing.assert_array_equal(again.quantized.scale, record.quantized.scale)
    program = lowbit.torch.export_onnx(fresh, (torch.randn(2, 64),), tmp_path / "q.onnx")
    assert len(program.report.compressed) == 2


def test_a_weight_edited_after_quantization_is_exported_dense_with_a_warning(tmp_path):
    torch.manual_seed(0)
    quantized = _quantized(Sequence3d(), INT4_BLOCKS)
    with torch.no_grad():
        quantized.up.weight.add_(0.01)
    with pytest.warns(UserWarning, match="'up.weight' changed since it was compressed"):
        program = lowbit.torch.export_onnx(quantized, (torch.randn(2, 64),), tmp_path / "q.onnx")
    assert [r.name for r in program.report.compressed] == ["down.weight"]


def test_conv_and_embedding_weights_are_quantized_along_their_input_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 64), nn.Conv1d(8, 32, 3))
    quantized = _quantized(model, {**INT4_BLOCKS, "block_size": 16})
    embed, conv = quantization_of(quantized[0])["weight"], quantization_of(quantized[1])["weight"]
    assert embed.quantized.block == (1, 16)  # [tokens, features]: blocks of features
    assert conv.quantized.block == (1, 8, 3)  # [out, in, kernel]: all 8 inputs (fewer than a block), whole kernel
    assert embed.rel_mse < 0.02 and conv.rel_mse < 0.02


def test_a_weight_that_cannot_be_quantized_is_skipped_with_a_warning():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight[3, 5] = float("nan")
    with pytest.warns(UserWarning, match=r"'0.weight' skipped: .*(NaN|finite)") as caught:
        quantized = _quantized(model, INT4_BLOCKS)
    assert {w.filename for w in caught if "skipped" in str(w.message)} == {__file__}  # the caller's line
    rows = {r.name: r for r in lowbit.torch.report(quantized).rows}
    assert rows["0.weight"].skipped and rows["1.weight"].compression == "quantized"


def test_a_tied_embedding_and_head_are_quantized_once_and_exported_quantized_in_both_places(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 8))
    quantized = _quantized(TiedLM().eval(), INT4_BLOCKS, calibration_data=[ids])
    assert set(quantization_of(quantized)) == {"embed.weight", "mid.weight"}  # one record for the shared parameter
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(stored|exported) dense")
        program = lowbit.torch.export_onnx(quantized, (ids,), tmp_path / "q.onnx", input_names=["ids"])
    assert [r.compression for r in program.report.rows] == ["quantized"] * 3  # the head's transposed copy too
    assert sum(1 for w in program.weights() if w.compression is None and w.numel > 1024) == 0
    with torch.no_grad():
        expected = quantized(ids).numpy()
    got = ort_session(tmp_path / "q.onnx", "basic").run(None, {"ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_quantizing_a_palettized_model_replaces_its_record():
    from lowbit.torch.palettization import PostTrainingPalettizer, palettization_of

    torch.manual_seed(0)
    palettized = PostTrainingPalettizer(nn.Sequential(nn.Linear(64, 64))).compress()
    assert set(palettization_of(palettized)) == {"0.weight"}
    quantized = _quantized(palettized, {"weight_dtype": "int8"})
    assert palettization_of(quantized) == {} and set(quantization_of(quantized)) == {"0.weight"}
    assert [r.compression for r in lowbit.torch.report(quantized).rows] == ["quantized"]
    again = PostTrainingPalettizer(quantized).compress()
    assert quantization_of(again) == {} and set(palettization_of(again)) == {"0.weight"}


def test_torch_float8_dtypes_name_the_fp8_weight_dtypes_and_calibration_is_not_used_for_them():
    config = ModulePostTrainingQuantizerConfig(weight_dtype=torch.float8_e4m3fn)
    assert config.weight_dtype == "fp8_e4m3"
    assert ModulePostTrainingQuantizerConfig(weight_dtype=torch.float8_e5m2).weight_dtype == "fp8_e5m2"
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.warns(UserWarning, match="calibration_data is not used"):
        quantized = _quantized(model, {"weight_dtype": "fp8_e4m3"}, calibration_data=[torch.randn(4, 64)])
    assert quantization_of(quantized)["0.weight"].quantized.q.dtype.name == "float8_e4m3fn"


def test_a_half_precision_model_keeps_its_dtype_and_exports_half_scales(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).half()
    quantized = _quantized(model, INT4_BLOCKS, calibration_data=[torch.randn(8, 64).half()])
    record = quantization_of(quantized)["0.weight"]
    assert quantized[0].weight.dtype == torch.float16 and record.quantized.scale.dtype == np.float16
    x = torch.randn(4, 64).half()
    lowbit.torch.export_onnx(quantized, (x,), tmp_path / "q.onnx", input_names=["x"])
    with torch.no_grad():
        expected = quantized.float()(x.float()).numpy()
    got = ort_session(tmp_path / "q.onnx", "basic").run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=0.01, atol=0.01)  # fp16 arithmetic


def test_a_quantized_recurrent_layer_is_exported_dense_with_a_warning_that_says_why(tmp_path):
    torch.manual_seed(0)
    quantized = _quantized(Wrapped(nn.GRU(16, 32, batch_first=True)), {"weight_dtype": "int8"})
    with pytest.warns(UserWarning, match="quantized weight 'inner.weight_ih_l0' matches no weight.*recurrent"):
        lowbit.torch.export_onnx(quantized, (torch.randn(2, 5, 16),), tmp_path / "gru.onnx")


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)[0]
