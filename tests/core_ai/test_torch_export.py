"""lowbit.torch.export_coreai: a palettized torch model converted by coreai-torch with every recorded palette written
into the .aimodel; the Core AI runtime's output is the finalized torch model's, and the program's weights decode to
the torch weights bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("coreai.authoring", reason="needs lowbit[coreai] (coreai-core, Python >= 3.11)")
pytest.importorskip("coreai_torch", reason="needs coreai-torch (Python >= 3.11)")

import torch
from coreai_support import run_asset
from tied_lm import TiedLM
from torch import nn

import lowbit.coreai
import lowbit.torch
from lowbit.torch.palettization import (
    DKMPalettizer,
    DKMPalettizerConfig,
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.conv = nn.Conv1d(32, 48, 3)
        self.norm = nn.BatchNorm1d(48)
        self.head = nn.Linear(48, 10)

    def forward(self, ids):
        x = self.norm(self.conv(self.embed(ids).transpose(1, 2)))
        return self.head(torch.relu(x).mean(-1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    net.train()
    net(torch.randint(0, 100, (8, 12)))  # BatchNorm statistics that are not the identity
    return net.eval()


def _check(model: nn.Module, tmp_path, ids: torch.Tensor) -> None:
    model.head.train()  # a module in its own mode: exported in eval mode, left as it was
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stored dense")
        program = lowbit.torch.export_coreai(model, (ids,), tmp_path / "net.aimodel")
    assert model.head.training and not model.conv.training
    model.head.eval()
    records = lowbit.torch.palettization_of(model)
    assert len(program.report.rows) == len(records) == 3
    assert sum(r.bytes_after for r in program.report.rows) <= sum(r.nbytes for r in records.values()) + 48 * 4 + 64
    (got,) = run_asset(tmp_path / "net.aimodel", {"ids": ids.numpy().astype(np.int32)})  # Core AI: int32 ids
    with torch.no_grad():
        np.testing.assert_allclose(got, model(ids).numpy(), rtol=1e-5, atol=1e-5)
    decoded = lowbit.coreai.load(tmp_path / "net.aimodel").weight_arrays()
    torch_weights = {
        p.detach().numpy().tobytes(): name
        for name, p in model.named_parameters()
        if name in ("embed.weight", "head.weight")
    }
    exact = [torch_weights.get(np.ascontiguousarray(a).tobytes()) for a in decoded.values()]
    assert {"embed.weight", "head.weight"} <= set(exact)  # the LUTs and indices of the records, bit for bit


def test_post_training_palettes_reach_the_core_ai_runtime(tmp_path):
    config = PostTrainingPalettizerConfig.from_dict(
        {"global_config": {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16}}
    )
    model = PostTrainingPalettizer(_net(), config).compress()
    _check(model, tmp_path, torch.randint(0, 100, (2, 12)))


def test_palettes_with_outliers_reach_the_core_ai_runtime(tmp_path):
    config = PostTrainingPalettizerConfig.from_dict({"global_config": {"n_bits": 2, "outlier_fraction": 0.01}})
    model = PostTrainingPalettizer(_net(), config).compress()
    assert all(r.outliers is not None for r in lowbit.torch.palettization_of(model).values())
    _check(model, tmp_path, torch.randint(0, 100, (2, 12)))
    kinds = {w.compression for w in lowbit.coreai.load(tmp_path / "net.aimodel").weights()}
    assert kinds == {"lut ui2 + outliers"}


def test_dkm_finalized_palettes_reach_the_core_ai_runtime(tmp_path):
    model = _net()
    config = DKMPalettizerConfig.from_dict({"global_config": {"n_bits": 2, "weight_threshold": 0}})
    palettizer = DKMPalettizer(model, config)
    prepared = palettizer.prepare()
    palettizer.step()
    prepared.train()
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(2):
        prepared(torch.randint(0, 100, (8, 12))).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    final = palettizer.finalize().eval()
    _check(final, tmp_path, torch.randint(0, 100, (2, 12)))


def test_sixteen_bit_casting_then_conversion_runs_on_the_core_ai_runtime(tmp_path):
    """The Core AI flow: export, cast to 16 bits, convert, compress, run: within float16 tolerance of float32."""
    import coreai_torch
    from conftest import digits_split, digits_torch_model

    _, _, images, _ = digits_split()
    x = torch.from_numpy(images[:64]).float()
    model = digits_torch_model()
    exported = lowbit.torch.cast_to_16_bit_precision(torch.export.export(model, (x,)))
    program = (
        coreai_torch.TorchConverter()
        .add_exported_program(exported.run_decompositions(coreai_torch.get_decomp_table()))
        .to_coreai()
    )
    small = lowbit.coreai.palettize_weights(program, n_bits=8)
    assert all(w.dtype == np.float16 for w in small.weights())
    (got,) = run_asset(small.save(tmp_path / "digits16.aimodel"), {"x": x.numpy().astype(np.float16)})
    with torch.no_grad():
        want = model(x).numpy()
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=0, atol=0.02 * np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.98


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.up, self.head = nn.Embedding(100, 64), nn.Linear(64, 96), nn.Linear(96, 10)

    def forward(self, ids):
        return self.head(torch.relu(self.up(self.embed(ids))).mean(1))


@pytest.mark.parametrize("weight_dtype", ["int4", "uint8"])
def test_quantized_codes_reach_the_core_ai_runtime(tmp_path, weight_dtype):
    from lowbit.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig, quantization_of

    torch.manual_seed(0)
    module = {"weight_dtype": weight_dtype, "granularity": "per_block", "block_size": 32}
    config = PostTrainingQuantizerConfig.from_dict({"global_config": module})
    ids = torch.randint(0, 100, (2, 12))
    model = PostTrainingQuantizer(Tokens().eval(), config).compress(calibration_data=[ids, (ids + 1) % 100])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stored dense")
        program = lowbit.torch.export_coreai(model, (ids,), tmp_path / "q.aimodel")
    records = quantization_of(model)
    assert [r.compression for r in program.report.rows] == ["quantized"] * len(records) == ["quantized"] * 3
    assert sum(r.bytes_after for r in program.report.rows) <= sum(r.nbytes for r in records.values()) + 64
    (got,) = run_asset(tmp_path / "q.aimodel", {"ids": ids.numpy().astype(np.int32)})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(ids).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["palettized", "quantized"])
def test_a_tied_embedding_and_head_are_one_compressed_constant_on_core_ai(tmp_path, kind):
    """coreai-torch keeps a tied weight as one constant (ONNX's exporter stores the head's transposed copy too):
    it is written compressed once, and no weight of the program stays dense."""
    from lowbit.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 8))
    if kind == "palettized":
        model = PostTrainingPalettizer(TiedLM().eval()).compress()
    else:
        module = {"weight_dtype": "int4", "granularity": "per_block", "block_size": 32}
        config = PostTrainingQuantizerConfig.from_dict({"global_config": module})
        model = PostTrainingQuantizer(TiedLM().eval(), config).compress(calibration_data=[ids])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(stored|exported) dense")
        program = lowbit.torch.export_coreai(model, (ids,), tmp_path / "tied.aimodel")
    assert [r.compression for r in program.report.rows] == [kind, kind]
    assert [w.compression is not None for w in program.weights() if w.numel > 1024] == [True, True]
    (got,) = run_asset(tmp_path / "tied.aimodel", {"ids": ids.numpy().astype(np.int32)})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(ids).numpy(), rtol=1e-5, atol=1e-5)
