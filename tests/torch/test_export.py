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


def test_recurrent_weights_the_exporter_restacks_are_palettized_losslessly(tmp_path):
    torch.manual_seed(0)
    lstm = _palettized(nn.LSTM(16, 32, batch_first=True), granularity="per_grouped_channel", group_size=32)
    x = torch.randn(2, 5, 16)
    program = lowbit.torch.export_onnx(Wrapper(lstm).eval(), (x,), tmp_path / "lstm.onnx", input_names=["x"])
    compressed = {r.name: r for r in program.report.rows}
    assert len(compressed) == 2 and all(r.rel_mse == 0.0 for r in compressed.values())  # W and R, exact LUTs
    with torch.no_grad():
        expected = Wrapper(lstm).eval()(x).numpy()
    got = ort_session(tmp_path / "lstm.onnx", "all").run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


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
