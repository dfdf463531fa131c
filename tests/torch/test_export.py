"""export_onnx on small models: what the exporter does to weights, and what it must not do to the user's model."""

import warnings

import numpy as np
import pytest
from conftest import ort_session

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lowbit.torch  # noqa: E402
from lowbit.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig  # noqa: E402


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out[0] if isinstance(out, tuple) else out


def _palettized(module: nn.Module, **options) -> nn.Module:
    config = PostTrainingPalettizerConfig.from_dict({"global_config": {"n_bits": 4, **options}})
    return PostTrainingPalettizer(module, config).compress()


def _assert_ort_runs_it_as_torch(path, model: nn.Module, x) -> None:
    with torch.no_grad():
        np.testing.assert_allclose(
            ort_session(path, "all").run(None, {"x": x.numpy()})[0], model(x).numpy(), rtol=1e-5, atol=1e-6
        )


def test_export_leaves_every_module_in_its_own_mode(tmp_path):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.5), nn.Linear(64, 8)).eval()
    model = Wrapper(_palettized(inner))  # a fresh wrapper is in training mode, its contents in eval mode
    x = torch.randn(3, 32)
    lowbit.torch.export_onnx(model, (x,), tmp_path / "m.onnx", input_names=["x"])
    assert model.training and not any(m.training for m in model.inner.modules())
    _assert_ort_runs_it_as_torch(tmp_path / "m.onnx", model, x)


def test_a_second_palettization_is_exported_with_the_new_luts(tmp_path):
    torch.manual_seed(0)
    model = _palettized(nn.Sequential(nn.Linear(64, 64)))
    again = _palettized(model, n_bits=2)
    assert torch.unique(again[0].weight).numel() <= 4
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "palettized weight")
        program = lowbit.torch.export_onnx(again, (torch.randn(1, 64),), tmp_path / "m.onnx")
    lut = program.graph.initializers["0.weight.lut"].const_value.numpy()
    assert lut.shape == (1, 4, 1)


def test_a_ragged_last_group_exports_with_its_own_lut(tmp_path):
    """30 output channels in LUT groups of 8: the export writes the same four LUTs (the last one of 6 channels,
    stored padded and sliced), and ORT computes what the palettized torch model computes."""
    torch.manual_seed(0)
    model = _palettized(nn.Sequential(nn.Linear(64, 30)), granularity="per_grouped_channel", group_size=8).eval()
    x = torch.randn(3, 64)
    program = lowbit.torch.export_onnx(model, (x,), tmp_path / "m.onnx", input_names=["x"])
    (row,) = program.report.rows
    assert row.skipped is None and row.bytes_after < row.bytes_before
    (weight,) = lowbit.load(tmp_path / "m.onnx").weights()
    assert weight.compression == "palettized 4-bit, 4 LUT(s)"
    _assert_ort_runs_it_as_torch(tmp_path / "m.onnx", model, x)


FUNCTIONS_NBYTES = 8192  # the decode functions' definitions and the graph: a fixed cost, whatever the weights


def _stored_nbytes(program, model: nn.Module) -> tuple[int, int]:
    """(bytes of the palettized weights as written, bytes of the model's parameters that are not palettized)."""
    records = lowbit.torch.palettization_of(model)
    dense = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if name not in records)
    return sum(r.bytes_after for r in program.report.rows), dense


@pytest.mark.parametrize(("n_bits", "group_size"), [(4, 16), (3, 8)])
def test_palettes_survive_state_dict_torch_save_deepcopy_and_pickle(tmp_path, n_bits, group_size):
    import copy
    import io

    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128)).eval()

    options = {"granularity": "per_grouped_channel", "group_size": group_size, "n_bits": n_bits}
    palettized = _palettized(make(), **options)
    records = lowbit.torch.palettization_of(palettized)
    assert set(records) == {"0.weight", "2.weight"}
    torch.save(palettized.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(RuntimeError, match="lowbit_palettized_weight"):  # a plain load says what it cannot take
        make().load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    fresh = lowbit.torch.load_state_dict(make(), tmp_path / "sd.pt")
    buffer = io.BytesIO()
    torch.save(palettized, buffer)
    buffer.seek(0)
    copies = {
        "state_dict": fresh,
        "deepcopy": copy.deepcopy(palettized),
        "pickle": torch.load(buffer, weights_only=False),
    }
    x = torch.randn(3, 64)
    for how, model in copies.items():
        again = lowbit.torch.palettization_of(model)
        for name, record in records.items():
            assert again[name].palettized.n_bits == n_bits, how
            np.testing.assert_array_equal(again[name].palettized.lut, record.palettized.lut)
            np.testing.assert_array_equal(again[name].palettized.packed, record.palettized.packed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            program = lowbit.torch.export_onnx(model, (x,), tmp_path / f"{how}.onnx", input_names=["x"])
        assert {r.name for r in program.report.rows} == {"0.weight", "2.weight"}, how
        palette_bytes = sum(r.nbytes for r in records.values())
        stored, dense = _stored_nbytes(program, model)
        assert stored <= 1.1 * palette_bytes, how
        assert (tmp_path / f"{how}.onnx").stat().st_size <= 1.1 * (palette_bytes + dense) + FUNCTIONS_NBYTES, how
        _assert_ort_runs_it_as_torch(tmp_path / f"{how}.onnx", model, x)


def test_a_weight_trained_after_palettization_is_exported_dense_with_a_warning(tmp_path):
    torch.manual_seed(0)
    model = _palettized(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval())
    with torch.no_grad():
        model[0].weight.add_(0.01 * torch.randn_like(model[0].weight))
    x = torch.randn(2, 64)
    with pytest.warns(UserWarning, match=r"weight '0.weight' changed since it was compressed"):
        program = lowbit.torch.export_onnx(model, (x,), tmp_path / "m.onnx", input_names=["x"])
    assert [r.name for r in program.report.rows] == ["2.weight"]
    _assert_ort_runs_it_as_torch(tmp_path / "m.onnx", model, x)


def test_a_corrupt_record_is_refused_on_load():
    model = _palettized(nn.Sequential(nn.Linear(64, 64)))
    state = model.state_dict()
    state["0.lowbit_palettized_weight"] = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a lowbit palettization record"):
        lowbit.torch.load_state_dict(nn.Sequential(nn.Linear(64, 64)), state)


GROUPED16 = {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16}
RECURRENT = {
    "bidirectional LSTM 8-bit": (lambda: nn.LSTM(64, 128, batch_first=True, bidirectional=True), {"n_bits": 8}),
    "bidirectional LSTM grouped(16)": (lambda: nn.LSTM(64, 128, batch_first=True, bidirectional=True), GROUPED16),
    "2-layer bidirectional LSTM": (
        lambda: nn.LSTM(64, 64, num_layers=2, batch_first=True, bidirectional=True),
        GROUPED16,
    ),
    "bidirectional GRU": (lambda: nn.GRU(64, 64, batch_first=True, bidirectional=True), GROUPED16),
    "small LSTM 4-bit": (lambda: nn.LSTM(16, 32, batch_first=True), {"n_bits": 4}),
}


@pytest.mark.parametrize("case", list(RECURRENT))
def test_recurrent_layers_export_at_their_requested_bits(tmp_path, case):
    make, options = RECURRENT[case]
    torch.manual_seed(0)
    model = Wrapper(_palettized(make(), **options)).eval()
    records = lowbit.torch.palettization_of(model)
    x = torch.randn(2, 7, model.inner.input_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stored dense")
        program = lowbit.torch.export_onnx(model, (x,), tmp_path / "rnn.onnx", input_names=["x"])
    palette_bytes = sum(r.nbytes for r in records.values())
    stored, dense = _stored_nbytes(program, model)
    assert len(program.report.rows) == len(records) // (2 if model.inner.bidirectional else 1)
    assert all(r.compression == "palettized" for r in program.report.rows)
    assert stored <= 1.1 * palette_bytes  # each direction at its own bits, not a lossless wider LUT
    assert (tmp_path / "rnn.onnx").stat().st_size <= 1.1 * (palette_bytes + dense) + FUNCTIONS_NBYTES
    _assert_ort_runs_it_as_torch(tmp_path / "rnn.onnx", model, x)
    reloaded = lowbit.load(tmp_path / "rnn.onnx")
    assert all(w.compression.startswith(f"palettized {options['n_bits']}-bit") for w in reloaded.weights())
    dense_file = tmp_path / "dense.onnx"
    lowbit.decompress_weights(reloaded).save(dense_file)
    _assert_ort_runs_it_as_torch(dense_file, model, x)


BN_CASES = {
    "per tensor": {"n_bits": 4},
    "grouped(16)": GROUPED16,
    "per tensor, input-channel axis": {"n_bits": 4, "channel_axis": 1},
}


@pytest.mark.parametrize("case", list(BN_CASES))
def test_batchnorm_folded_into_a_palettized_conv_keeps_its_palette(tmp_path, case):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.BatchNorm2d(32), nn.ReLU()
    )
    model.train()
    model(torch.randn(8, 16, 12, 12))  # BatchNorm statistics that are not the identity
    model.eval()
    palettized = _palettized(model, **BN_CASES[case])
    x = torch.randn(2, 16, 12, 12)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stored dense")
        program = lowbit.torch.export_onnx(palettized, (x,), tmp_path / "bn.onnx", input_names=["x"])
    records = lowbit.torch.palettization_of(palettized)
    assert len(program.report.rows) == 2  # the default export folds BatchNorm: each conv keeps its codes and LUTs
    stored, dense = _stored_nbytes(program, palettized)
    palette_bytes = sum(r.nbytes for r in records.values()) + 2 * 32 * 4  # plus one factor per output channel
    assert stored <= palette_bytes + 64
    assert (tmp_path / "bn.onnx").stat().st_size <= 1.1 * (palette_bytes + dense) + FUNCTIONS_NBYTES
    _assert_ort_runs_it_as_torch(tmp_path / "bn.onnx", palettized, x)


def _conv_batchnorm(inputs: int, outputs: int) -> nn.Module:
    """A conv and a BatchNorm whose variances are not 1 (the export folds a factor per channel into the conv)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(inputs, outputs, 3), nn.BatchNorm2d(outputs)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def test_a_folded_weight_the_palette_cannot_express_is_stored_dense_with_a_warning(tmp_path):
    model = _conv_batchnorm(16, 32)
    options = {"n_bits": 4, "channel_axis": 1, "granularity": "per_grouped_channel", "group_size": 4}
    palettized = _palettized(model, **options)  # LUTs along the input channels: a per-output factor mixes them
    x = torch.randn(1, 16, 8, 8)
    with pytest.warns(UserWarning, match=r"palettized weight '0.weight' matches no weight .* stored dense"):
        lowbit.torch.export_onnx(palettized, (x,), tmp_path / "bn.onnx", input_names=["x"])
    _assert_ort_runs_it_as_torch(tmp_path / "bn.onnx", palettized, x)


def test_a_folded_batchnorm_over_a_ragged_last_lut_group(tmp_path):
    model = _conv_batchnorm(3, 10)
    palettized = _palettized(model, granularity="per_grouped_channel", group_size=4)  # groups of 4, 4, 2
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stored dense")
        program = lowbit.torch.export_onnx(palettized, (x,), tmp_path / "ragged.onnx", input_names=["x"])
    assert len(program.report.rows) == 1
    _assert_ort_runs_it_as_torch(tmp_path / "ragged.onnx", palettized, x)


def test_a_record_whose_weight_is_parametrized_since_is_exported_as_computed(tmp_path):
    model = _palettized(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval())
    nn.utils.parametrizations.weight_norm(model[0])
    x = torch.randn(2, 32)
    with pytest.warns(UserWarning, match=r"weight '0.weight' is computed by a parametrization now"):
        program = lowbit.torch.export_onnx(model, (x,), tmp_path / "p.onnx", input_names=["x"])
    assert [r.name for r in program.report.rows] == ["2.weight"]
    _assert_ort_runs_it_as_torch(tmp_path / "p.onnx", model, x)
