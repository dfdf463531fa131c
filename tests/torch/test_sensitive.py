"""SKMPalettizer: sensitivities measured right, used right, and the model left as it was."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lowbit.torch.palettization import (  # noqa: E402
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
    SKMPalettizer,
    SKMPalettizerConfig,
)


def _task(seed: int = 0):
    """A linear teacher whose inputs differ in scale by 100x: the weights of the large inputs matter most, and they
    are the small ones (as in trained networks), which plain k-means lumps together."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, 64)
    x = torch.randn(256, 64, generator=gen) * scales
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(32, 64, generator=gen) * 0.1 / scales)
        y = model(x)
    return model, x, y


def _mse(model, item):
    x, y = item
    return ((model(x) - y) ** 2).mean()


def test_sensitivity_is_the_mean_squared_gradient_per_item():
    model, x, y = _task()
    items = [(x[i : i + 1], y[i : i + 1] + 0.1) for i in range(10)]
    config = SKMPalettizerConfig.from_dict({"global_config": {"n_bits": 4}, "calibration_nsamples": 6})
    got = SKMPalettizer(model, config).compute_sensitivity(items, _mse)["0.weight"]
    expected = torch.zeros_like(model[0].weight)
    for item in items[:6]:
        (grad,) = torch.autograd.grad(_mse(model, item), model[0].weight)
        expected += grad**2 / 6
    torch.testing.assert_close(got, expected)


def test_sensitive_kmeans_beats_plain_kmeans_on_the_task_loss():
    model, x, y = _task()
    gen = torch.Generator().manual_seed(1)
    items = [(x[i : i + 1], y[i : i + 1] + 0.05 * torch.randn(1, 32, generator=gen)) for i in range(128)]
    for bits in (2, 3, 4):
        options = {"global_config": {"n_bits": bits}}
        plain = PostTrainingPalettizer(model, PostTrainingPalettizerConfig.from_dict(options)).compress()
        skm = SKMPalettizer(model, SKMPalettizerConfig.from_dict(options)).compress(items, _mse)
        with torch.no_grad():
            loss_plain, loss_skm = (float(((m(x) - y) ** 2).mean()) for m in (plain, skm))
        assert loss_skm < 0.9 * loss_plain, (bits, loss_skm, loss_plain)
        assert torch.unique(skm[0].weight).numel() <= 2**bits


def test_calibration_leaves_modes_flags_and_gradients_as_they_were(tmp_path):
    model, x, _ = _task()
    model.add_module("1", nn.Linear(32, 8))
    model.train()
    model[1].weight.requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    drawn = []

    def items():
        for i in range(100):
            drawn.append(i)
            yield (x[i : i + 1], model(x[i : i + 1]).detach())

    config = SKMPalettizerConfig.from_dict({"global_config": {"n_bits": 2}, "calibration_nsamples": 4})
    path = tmp_path / "sensitivity.pt"
    palettizer = SKMPalettizer(model, config)
    sensitivities = palettizer.compute_sensitivity(items(), _mse, sensitivity_path=path)
    assert drawn == [0, 1, 2, 3] and set(sensitivities) == {"0.weight", "1.weight"}
    assert model.training and all(m.training for m in model.modules())
    assert not model[1].weight.requires_grad and model[0].weight.requires_grad
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[1].weight.grad is None
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n

    from_file = SKMPalettizer(model, config).compress(sensitivity_path=path)
    drawn.clear()
    from_data = SKMPalettizer(model, config).compress(items(), _mse)
    for a, b in zip(from_file.parameters(), from_data.parameters(), strict=True):
        assert torch.equal(a, b)
    measured_only = palettizer.report().rows  # compute_sensitivity measured the model, compressed nothing
    assert [r.skipped for r in measured_only] == ["not compressed"] * 2
    compressor = SKMPalettizer(model, config)
    compressor.compress(sensitivity_path=path)
    assert [r.skipped for r in compressor.report().rows] == [None, None]


def test_bad_calibration_inputs_are_named():
    model, x, y = _task()
    palettizer = SKMPalettizer(model)
    with pytest.raises(TypeError, match="needs dataloader and loss_fn"):
        palettizer.compress()
    with pytest.raises(ValueError, match="dataloader yielded nothing"):
        palettizer.compress([], _mse)
    with pytest.raises(TypeError, match="must return a scalar tensor"):
        palettizer.compress([(x, y)], lambda m, item: m(item[0]))
    with pytest.warns(UserWarning, match="lowbit computes sensitivities in this process"):
        palettizer.compress([(x, y)], _mse, num_sensitivity_workers=2)
    assert np.isfinite(x.numpy()).all()


def test_a_sensitivity_file_beats_the_dataloader_and_a_missing_one_is_written(tmp_path):
    """As coremltools: ``compress(dataloader, loss_fn, sensitivity_path=X)`` reads X when it exists (issue 25, 9)."""
    model, x, y = _task()
    config = SKMPalettizerConfig.from_dict({"global_config": {"n_bits": 2}, "calibration_nsamples": 4})
    path = tmp_path / "s.pt"
    items = [(x[i : i + 1], y[i : i + 1] + 0.1) for i in range(8)]
    first = SKMPalettizer(model, config).compress(items, _mse, sensitivity_path=path)  # computed, then saved
    assert path.is_file()
    saved = torch.load(path, weights_only=True)
    torch.save({k: torch.ones_like(v) for k, v in saved.items()}, path)  # uniform sensitivities: plain k-means
    second = SKMPalettizer(model, config).compress(items, _mse, sensitivity_path=path)
    other_data = [(x[i : i + 1] * 3, y[i : i + 1]) for i in range(8, 12)]
    third = SKMPalettizer(model, config).compress(other_data, _mse, sensitivity_path=path)
    assert torch.equal(second[0].weight, third[0].weight)  # the file was used, not the dataloader
    assert not torch.equal(first[0].weight, second[0].weight)


def test_nothing_to_palettize_returns_the_model_unchanged():
    """All configs None, or only float64 weights: no calibration, no error (issue 25, 7)."""
    model, x, y = _task()
    left_out = SKMPalettizerConfig.from_dict({"module_type_configs": {"Linear": None}})
    out = SKMPalettizer(model, left_out).compress([(x, y)], _mse)
    assert torch.equal(out[0].weight, model[0].weight)
    double, _, _ = _task()
    double = double.double()
    with pytest.warns(UserWarning, match="dtype float64 is not float32/float16/bfloat16"):
        out = SKMPalettizer(double).compress([(x.double(), y.double())], _mse)
    assert torch.equal(out[0].weight, double[0].weight)


def test_sensitivity_weighted_outliers_lower_the_task_loss():
    """SKM's sensitivities also choose the outliers (``outlier_fraction``): the task loss drops again."""
    model, x, y = _task()
    gen = torch.Generator().manual_seed(1)
    items = [(x[i : i + 1], y[i : i + 1] + 0.05 * torch.randn(1, 32, generator=gen)) for i in range(128)]
    losses = {}
    for fraction in (0.0, 0.01):
        options = {"global_config": {"n_bits": 2, "outlier_fraction": fraction}}
        skm = SKMPalettizer(model, SKMPalettizerConfig.from_dict(options)).compress(items, _mse)
        with torch.no_grad():
            losses[fraction] = float(((skm[0](x) - y) ** 2).mean())
    assert losses[0.01] < 0.9 * losses[0.0], losses


class _TwoBranches(nn.Module):
    """Two Linear layers of one shape whose outputs are summed, the second scaled down 10x: its errors cost the loss
    100x less."""

    def __init__(self) -> None:
        super().__init__()
        self.loud, self.quiet = nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.loud(x) + 0.1 * self.quiet(x)


def test_a_budget_gives_the_bits_to_the_weight_the_loss_feels():
    gen = torch.Generator().manual_seed(2)
    model = _TwoBranches()
    x = torch.randn(256, 64, generator=gen)
    with torch.no_grad():
        y = model(x)
    items = [(x[i : i + 1], y[i : i + 1] + 0.05 * torch.randn(1, 32, generator=gen)) for i in range(64)]
    options = SKMPalettizerConfig.from_dict({"global_config": {"n_bits": 3}})
    uniform = SKMPalettizer(model, options).compress(items, _mse)
    palettizer = SKMPalettizer(model, options)
    mixed = palettizer.compress(items, _mse, bits_per_weight=3.3)
    rows = {r.name: r for r in palettizer.report().rows}
    assert 8 * sum(r.bytes_after for r in rows.values()) <= 3.3 * 2 * 64 * 32
    widths = {name: int(row.note.split("-bit")[0]) for name, row in rows.items()}
    assert widths["loud.weight"] > widths["quiet.weight"], widths
    with torch.no_grad():
        loss_uniform, loss_mixed = (float(((m(x) - y) ** 2).mean()) for m in (uniform, mixed))
    assert loss_mixed < 0.7 * loss_uniform, (loss_mixed, loss_uniform)


def test_post_training_with_calibration_meets_a_budget_and_notes_the_widths():
    model, x, _ = _task()
    model = nn.Sequential(model[0], nn.ReLU(), nn.Linear(32, 64, bias=False))
    palettizer = PostTrainingPalettizer(model)
    palettizer.compress(calibration_data=[x[i : i + 32] for i in range(0, 256, 32)], bits_per_weight=3.5)
    rows = palettizer.report().compressed
    assert len(rows) == 2 and all("bits/weight budget" in r.note for r in rows)
    assert 8 * sum(r.bytes_after for r in rows) <= 3.5 * 2 * 64 * 32
    with pytest.raises(ValueError, match="bits_per_weight must be a finite number above 2"):
        PostTrainingPalettizer(model).compress(bits_per_weight=2)
