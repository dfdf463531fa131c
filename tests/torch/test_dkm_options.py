"""DKMPalettizer's options with coremltools 9.0's meanings, each checked on what it does (benchmarks/dkm_options.py
measures them against coremltools on the digits CNN)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from conftest import ort_session  # noqa: E402
from torch import nn  # noqa: E402

import lowbit.torch  # noqa: E402
from lowbit.torch.palettization import DKMPalettizer, DKMPalettizerConfig, FakePalettize  # noqa: E402


def _prepared(model: nn.Module, **options) -> tuple[DKMPalettizer, nn.Module]:
    config = DKMPalettizerConfig.from_dict({"global_config": {"n_bits": 2, "weight_threshold": 0, **options}})
    palettizer = DKMPalettizer(model, config)
    return palettizer, palettizer.prepare()


def _train(palettizer: DKMPalettizer, model: nn.Module, steps: int, batch: int = 8) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(steps):
        x = torch.randn(batch + step % 3, model[0].in_features)  # batches of varying size
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        palettizer.step()


def _fake(module: nn.Module) -> FakePalettize:
    return module.parametrizations.weight[0]


def test_quantize_activations_fake_quantizes_outputs_and_exports_as_qdq(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    palettizer, prepared = _prepared(model, quantize_activations=True, milestone=2)
    out = prepared[0](torch.randn(16, 32))  # before the milestone: the activations are quantized already
    assert len(torch.unique(out)) <= 256 and len(torch.unique(out)) > 16
    _train(palettizer, prepared, 4)  # batch sizes 8, 9, 10 (coremltools' per-index observer fails on them)
    final = palettizer.finalize().eval()
    quantizer = final[0].activation_post_process
    scale, zero_point = float(quantizer.scale), int(quantizer.zero_point)
    x = torch.randn(5, 32)
    with torch.no_grad():
        hidden = final[0](x)
        again = final[0](x * 100)  # the range no longer moves after finalize: large outputs clip
    assert float(quantizer.scale) == scale
    assert torch.allclose(hidden / scale, torch.round(hidden / scale), atol=1e-3)
    assert float(again.max()) == pytest.approx((127 - zero_point) * scale)
    assert float(again.min()) == pytest.approx((-128 - zero_point) * scale)
    program = lowbit.torch.export_onnx(final, (x,), tmp_path / "qdq.onnx", input_names=["x"])
    ops = [n.op_type for n in program.graph]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2
    assert len(program.report.rows) == 2  # the weights keep their LUTs
    with torch.no_grad():
        np.testing.assert_allclose(
            ort_session(tmp_path / "qdq.onnx").run(None, {"x": x.numpy()})[0], final(x).numpy(), rtol=1e-5, atol=1e-5
        )


def test_cluster_permute_groups_along_its_first_axis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    options = {"cluster_permute": (1, 0), "granularity": "per_grouped_channel", "group_size": 8}
    palettizer, prepared = _prepared(model, **options)
    _train(palettizer, prepared, 2)
    weight = palettizer.finalize()[0].weight.detach()
    assert all(len(torch.unique(weight[:, i : i + 8])) <= 4 for i in range(0, 32, 8))  # LUTs over input columns
    assert len(torch.unique(weight)) > 4
    with pytest.warns(UserWarning, match=r"cluster_permute \(1, 0, 2\) is not a permutation of the weight's 2 axes"):
        _prepared(nn.Sequential(nn.Linear(32, 16)), cluster_permute=(1, 0, 2))


def _saved_bytes(model: nn.Module) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for the backward pass of one forward, and the weight's gradient."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).pow(2).sum()
    loss.backward()
    return sum(saved), model[0].parametrizations.weight.original.grad.clone()


def test_palett_max_mem_holds_a_fraction_of_the_attention_and_gives_the_same_gradient():
    results = {}
    for fraction in (1.0, 0.125):
        torch.manual_seed(0)
        _, prepared = _prepared(nn.Sequential(nn.Linear(256, 256)), n_bits=4, palett_max_mem=fraction)
        results[fraction] = _saved_bytes(prepared.train())
    (full, grad_full), (chunked, grad_chunked) = results[1.0], results[0.125]
    assert chunked < full / 4  # the [n, 16] attentions are recomputed, not kept (measured: 29x fewer bytes)
    assert float((grad_chunked - grad_full).norm() / grad_full.norm()) < 1e-3  # summation order only


def test_palett_cluster_tol_repairs_duplicate_centroids():
    for tol, repaired in ((0.0, True), (1.0, False)):
        torch.manual_seed(0)
        _, prepared = _prepared(nn.Sequential(nn.Linear(32, 32)), palett_cluster_tol=tol)
        fake = _fake(prepared[0])
        prepared(torch.randn(2, 32))  # initializes the centroids
        with torch.no_grad():
            fake.centroids[0, 1] = fake.centroids[0, 0]  # two equal centroids
        low, high = sorted({float(fake.centroids[0, 0]), float(fake.centroids[0, 2]), float(fake.centroids[0, 3])})[:2]
        fake._repair()  # what each training forward does first
        assert (len(torch.unique(fake.centroids[0])) == 4) == repaired
        if repaired:  # the first of the two moved halfway to the next larger distinct centroid
            assert float(fake.centroids[0, 0]) == pytest.approx((low + high) / 2)


def test_percentage_palett_enable_trains_the_first_groups_and_freezes_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    options = {"granularity": "per_grouped_channel", "group_size": 8, "percentage_palett_enable": 0.5}
    palettizer, prepared = _prepared(model, **options)
    fake = _fake(prepared[0])
    prepared.train()(torch.randn(2, 32))
    first = fake.centroids.clone()
    _train(palettizer, prepared, 3)
    assert (
        fake.active == 2
        and torch.equal(fake.centroids[2:], first[2:])
        and not torch.equal(fake.centroids[:2], first[:2])
    )
    latent = prepared[0].parametrizations.weight.original
    prepared(torch.randn(4, 32)).pow(2).sum().backward()
    assert float(latent.grad[16:].abs().sum()) == 0 < float(latent.grad[:16].abs().sum())  # frozen: no gradient
    final = palettizer.finalize()[0].weight.detach()
    assert all(len(torch.unique(final[i : i + 8])) <= 4 for i in range(0, 32, 8))


def test_prune_threshold_and_zero_threshold_as_coremltools_uses_them():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64))
    zeros = {}
    for prune in (1e-7, 0.05):
        palettizer, prepared = _prepared(base, enforce_zero=True, prune_threshold=prune)
        _train(palettizer, prepared, 1)
        zeros[prune] = int((palettizer.finalize()[0].weight == 0).sum())
    assert zeros[0.05] > zeros[1e-7] > 0  # off the zero centroid's distance: more weights join it
    _, prepared = _prepared(base, zero_threshold=0.05)
    fake = _fake(prepared[0])
    distances = torch.rand(1, 4, 10) * 100
    assert float(fake._attention(distances).min()) == pytest.approx(0.05)  # the attention's floor


def test_prune_threshold_zero_keeps_exact_zeros_alone_on_the_zero_centroid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight[:, :32] = 0
    on_zero = {}
    for prune in (0.0, 1e-7):
        _, prepared = _prepared(model, enforce_zero=True, prune_threshold=prune)
        fake = _fake(prepared[0])
        prepared.train()(torch.randn(2, 64))
        groups = fake.groups_of(prepared[0].parametrizations.weight.original.detach())
        attention = fake._attention(fake._distances(groups, fake._snap(fake.centroids)))
        on_zero[prune] = float(attention[:, 0][groups[..., 0] != 0].max())
    assert on_zero[0.0] <= 1e-6 < 0.5 < on_zero[1e-7]  # only exact zeros on the zero centroid, else near ones too


@pytest.mark.parametrize("options", [{"palett_batch_mode": True}, {"palett_dist": True}, {"kmeans_batch_threshold": 1}])
def test_work_distribution_options_give_the_same_result(options):
    weights = {}
    for chosen in ({}, options):
        torch.manual_seed(0)
        palettizer, prepared = _prepared(nn.Sequential(nn.Linear(32, 32)), **chosen)
        _train(palettizer, prepared, 2)
        weights[bool(chosen)] = palettizer.finalize()[0].weight.detach()
    assert torch.equal(weights[True], weights[False])


def test_keep_sparsity_with_a_zero_zero_threshold():
    torch.manual_seed(0)
    palettizer, prepared = _prepared(
        nn.Sequential(nn.Linear(32, 32)), enforce_zero=True, prune_threshold=0.0, zero_threshold=0.0
    )
    _train(palettizer, prepared, 2)
    weight = palettizer.finalize()[0].weight
    assert torch.isfinite(weight).all() and len(torch.unique(weight)) <= 4
