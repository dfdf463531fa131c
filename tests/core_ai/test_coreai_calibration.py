"""Calibration on the Core AI door (issue 26): statistics taken by running a copy of the program in Core AI's
runtime, equal to the activations' own, the same as ONNX Runtime's on the same weights and inputs (so both doors
write the same codes), feeds checked in one line, the input program untouched, and a caller inside an event loop
(a notebook) served."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("coreai.authoring", reason="needs lowbit[coreai] (coreai-core, Python >= 3.11)")
pytest.importorskip("coreai_torch", reason="needs coreai-torch (Python >= 3.11)")

import torch
from conftest import make_model
from coreai_support import convert, make_probe, onnx_probe, run_asset
from tied_lm import TiedLM

import lowbit
import lowbit.coreai as lc
from lowbit.cli import main
from lowbit.coreai.calibration import collect_input_moments
from lowbit.coreai.decode import evaluate
from lowbit.onnx.calibration import collect_input_moments as onnx_moments


class Tower(torch.nn.Module):
    """An embedding, two Linear layers (the second fed by the first's ReLU: activations computed inside the
    program) and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(50, 32)
        self.fc1 = torch.nn.Linear(32, 48)
        self.fc2 = torch.nn.Linear(48, 40)
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, ids, image):
        return self.fc2(torch.relu(self.fc1(self.embedding(ids)))), self.conv(image)


def _tower_feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"ids": rng.integers(0, 30, (2, 5)), "image": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    model = Tower().eval()
    feeds = _tower_feeds(1)
    program = convert(model, (torch.from_numpy(feeds[0]["ids"]).to(torch.int32), torch.from_numpy(feeds[0]["image"])))
    return model, lc.Program.of(program)


def test_statistics_are_the_activations_own(tower):
    """Each weight's sums of squares (and X^T X) are those of the activations torch computes for the same inputs
    (int64 token ids cast to the program's int32), the embedding's its rows' lookup counts."""
    model, program = tower
    feeds = _tower_feeds(3)
    moments = collect_input_moments(program, feeds)
    names = {w.shape: w.name for w in program.weights()}
    seen: dict[str, list[np.ndarray]] = {"fc1": [], "fc2": [], "conv": []}
    hooks = [getattr(model, n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].numpy())) for n in seen]
    with torch.no_grad():
        for f in feeds:
            model(torch.from_numpy(f["ids"]), torch.from_numpy(f["image"]))
    for h in hooks:
        h.remove()
    for module, shape, axis in (("fc1", (48, 32), -1), ("fc2", (40, 48), -1), ("conv", (8, 3, 3, 3), 1)):
        if module == "conv":  # the rows a convolution multiplies its weight by: its input's 3 x 3 windows (torch's)
            rows = [torch.nn.functional.unfold(torch.from_numpy(a), 3).transpose(1, 2).numpy() for a in seen[module]]
            x = np.concatenate([r.reshape(-1, 27) for r in rows]).astype(np.float64)
        else:
            x = np.concatenate([np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis]) for a in seen[module]])
            x = x.astype(np.float64)
        stats = moments[names[shape]]
        assert stats.rows == len(x)
        np.testing.assert_allclose(stats.squares, (x**2).sum(0), rtol=1e-5)
        np.testing.assert_allclose(stats.gram, x.T @ x, rtol=1e-4, atol=1e-4)  # the whole X^T X: error feedback
    lookups = moments[names[(50, 32)]]
    expected = np.bincount(np.concatenate([f["ids"].ravel() for f in feeds]), minlength=50)
    np.testing.assert_array_equal(lookups.squares, expected)
    assert lookups.rows == 30


class Convs(torch.nn.Module):
    """Convolutions whose padding the converter writes as a ``coreai.pad`` before each (zeros, reflection), one
    strided and dilated, one of two groups and a depthwise one."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Conv2d(3, 8, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2))
        self.second = torch.nn.Conv2d(8, 4, 3, padding="same", padding_mode="reflect")
        self.third = torch.nn.Conv2d(4, 6, 3, groups=2, padding=1)
        self.fourth = torch.nn.Conv2d(6, 6, 3, groups=6)

    def forward(self, image):
        return self.fourth(self.third(self.second(torch.relu(self.first(image)))))


# each conv's ONNX Conv attributes (the second's reflection padding is fed padded: ONNX's Conv pads with zeros)
CONV_ATTRIBUTES = {
    "first": {"strides": [2, 1], "dilations": [1, 2], "pads": [1, 2, 1, 2]},
    "second": {},
    "third": {"group": 2, "pads": [1, 1, 1, 1]},
    "fourth": {"group": 6},
}


def _calibrated_on_core_ai(kind: type[torch.nn.Module], seed: int, size: tuple[int, int]) -> tuple:
    """(a ``kind`` model seeded with ``seed``, two batches of 3-channel images of ``size``, its Core AI program,
    the program's statistics on those images)."""
    torch.manual_seed(seed)
    model = kind().eval()
    rng = np.random.default_rng(seed + 1)
    images = [rng.standard_normal((2, 3, *size)).astype(np.float32) for _ in range(2)]
    program = lc.Program.of(convert(model, (torch.from_numpy(images[0]),)))
    return model, images, program, collect_input_moments(program, [{"image": x} for x in images])


def test_a_convolutions_windows_are_those_onnx_runtime_sees():
    """Padded, strided, dilated and grouped convolutions' statistics on the Core AI door (the input padded by the
    program, strides, dilations and groups read from the op) are the graph door's for the same weights and inputs
    (ONNX's Conv attributes): the same rows, sums and X^T X (a grouped conv's blocks); the reflection padding's
    too (a Pad before the ONNX Conv)."""
    model, images, program, core = _calibrated_on_core_ai(Convs, 3, (11, 10))
    inputs: dict[str, list[np.ndarray]] = {name: [] for name in CONV_ATTRIBUTES}
    hooks = [
        getattr(model, n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].numpy()))
        for n in CONV_ATTRIBUTES
    ]
    with torch.no_grad():
        for x in images:
            model(torch.from_numpy(x))
    for hook in hooks:
        hook.remove()
    inputs["second"] = [np.pad(r, [(0, 0), (0, 0), (1, 1), (1, 1)], mode="reflect") for r in inputs["second"]]
    weights = {name: getattr(model, name).weight.detach().numpy() for name in CONV_ATTRIBUTES}
    graph = lowbit.Program(make_model(weights, [("Conv", name, attrs) for name, attrs in CONV_ATTRIBUTES.items()]))
    feeds = [{f"x{k}": inputs[name][i] for k, name in enumerate(CONV_ATTRIBUTES)} for i in range(len(images))]
    onnx = onnx_moments(graph, feeds)
    by_shape = {w.shape: w.name for w in program.weights()}
    for name, weight in weights.items():
        ours, theirs = onnx[name], core[by_shape[weight.shape]]
        assert ours.kernel == theirs.kernel == weight.shape[2:] and ours.rows == theirs.rows
        assert ours.groups == theirs.groups == getattr(model, name).groups
        np.testing.assert_allclose(theirs.squares, ours.squares, rtol=1e-5)
        np.testing.assert_allclose(theirs.gram, ours.gram, rtol=1e-4, atol=1e-3)


class Deconvs(torch.nn.Module):
    """Transposed convolutions: an upsampling one with padding and output padding, a dilated one of unequal
    strides, one of two groups."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.ConvTranspose2d(3, 8, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.second = torch.nn.ConvTranspose2d(8, 4, (2, 3), stride=(1, 2), dilation=(2, 1), padding=(1, 0))
        self.third = torch.nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2, bias=False)

    def forward(self, image):
        return self.third(self.second(torch.relu(self.first(image))))


def test_a_transposed_convolutions_windows_are_those_onnx_runtime_sees():
    """Transposed convolutions' statistics on the Core AI door (strides, padding, dilations, output padding and
    groups read from the op) are the graph door's for the same weights and inputs (ONNX's ConvTranspose
    attributes)."""
    model, images, program, core = _calibrated_on_core_ai(Deconvs, 5, (7, 6))
    with torch.no_grad():
        hidden = [torch.relu(model.first(torch.from_numpy(x))) for x in images]
        feeds = [{"x0": x, "x1": h.numpy(), "x2": model.second(h).numpy()} for x, h in zip(images, hidden, strict=True)]
    attributes = {
        "first": {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
        "second": {"strides": [1, 2], "dilations": [2, 1], "pads": [1, 0, 1, 0]},
        "third": {"strides": [2, 2], "group": 2},
    }
    weights = {name: getattr(model, name).weight.detach().numpy() for name in attributes}
    graph = lowbit.Program(make_model(weights, [("ConvTranspose", n, a) for n, a in attributes.items()]))
    onnx = onnx_moments(graph, feeds)
    by_shape = {w.shape: w.name for w in program.weights()}
    for name, weight in weights.items():
        ours, theirs = onnx[name], core[by_shape[weight.shape]]
        assert ours.kernel == theirs.kernel == weight.shape[2:] and ours.rows == theirs.rows
        np.testing.assert_allclose(theirs.squares, ours.squares, rtol=1e-5)
        np.testing.assert_allclose(theirs.gram, ours.gram, rtol=1e-4, atol=1e-3)


def test_calibration_leaves_the_program_alone_and_the_result_has_no_extra_output(tower, tmp_path):
    _, program = tower
    before = {w.name: np.asarray(evaluate(w.value)) for w in program.weights()}
    small = lc.palettize_weights(program, n_bits=4, weight_num_threshold=128, calibration_data=_tower_feeds(2))
    assert all(np.array_equal(before[w.name], evaluate(w.value)) for w in program.weights())
    assert all(r.skipped is None for r in small.report.rows)
    outputs = run_asset(
        small.save(tmp_path / "small.aimodel"),
        {k: v.astype(np.int32) if k == "ids" else v for k, v in _tower_feeds(1)[0].items()},
    )
    assert sorted(o.shape for o in outputs) == [(1, 8, 4, 4), (2, 5, 40)]


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({"ids": np.zeros((2, 5), np.int64)}, "lacks the model input 'image'"),
        ({"ids": np.zeros((2, 5)), "image": np.zeros((1, 3, 6, 6), np.float32)}, "is float64, the program takes int32"),
        ({"ids": np.zeros((2, 6), np.int32), "image": np.zeros((1, 3, 6, 6), np.float32)}, "has shape (2, 6)"),
        ({"ids": np.full((2, 5), 2**40), "image": np.zeros((1, 3, 6, 6), np.float32)}, "is int64"),
    ],
)
def test_feeds_that_do_not_fit_the_program_are_refused_in_one_line(tower, feed, message):
    _, program = tower
    with pytest.raises(ValueError, match="calibration feed") as err:
        lc.quantize_weights(program, "int8", calibration_data=[feed])
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="yielded no feed"):
        lc.sparsify_weights(program, calibration_data=[])
    with pytest.raises(TypeError, match="must be an iterable of"):
        lc.sparsify_weights(program, calibration_data=feed)


def test_float64_feeds_are_taken_in_the_program_float_type(tower):
    _, program = tower
    feeds = _tower_feeds(2)
    wide = [{"ids": f["ids"], "image": f["image"].astype(np.float64)} for f in feeds]
    ours, theirs = collect_input_moments(program, feeds), collect_input_moments(program, wide)
    assert all(np.array_equal(ours[n].squares, theirs[n].squares) for n in ours)


def test_a_tied_weight_gets_no_statistics_and_is_still_compressed():
    """The embedding table is also the head's weight: two readers, so no one reader's statistics; the Linear
    between them gets its own."""
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 7))
    program = lc.Program.of(convert(TiedLM().eval(), (ids.to(torch.int32),)))
    feeds = [{"ids": np.random.default_rng(i).integers(0, 300, (2, 7))} for i in range(2)]
    moments = collect_input_moments(program, feeds)
    by_shape = {w.shape: w.name for w in program.weights()}
    assert set(moments) == {by_shape[(64, 64)]}
    small = lc.palettize_weights(program, n_bits=4, calibration_data=feeds)
    assert all(r.skipped is None for r in small.report.rows) and len(small.report.rows) == 2
    notes = {r.shape: r.note for r in small.report.rows}  # the report says which weight the data did not reach
    assert notes == {(300, 64): "data-free: no calibration statistics", (64, 64): None}
    assert all(r.note is None for r in lc.palettize_weights(program, n_bits=4).report.rows)


def test_a_caller_inside_a_running_event_loop_calibrates(tower):
    """A notebook runs cells inside an event loop: the runtime's own loop runs on a worker thread."""
    _, program = tower

    async def cell():
        return lc.palettize_weights(program, n_bits=4, weight_num_threshold=128, calibration_data=_tower_feeds(2))

    small = asyncio.run(cell())
    assert all(r.skipped is None for r in small.report.rows)


CASES = [
    ("palettize_weights", {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16}),
    ("palettize_weights", {"bits_per_weight": 3.5, "granularity": "per_grouped_channel", "group_size": 16}),
    (
        "palettize_weights",
        {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 16, "outlier_fraction": 0.02},
    ),
    ("quantize_weights", {"dtype": "int4", "granularity": "per_block", "block_size": 16}),
    ("sparsify_weights", {"target_sparsity": 0.5, "quantize_dtype": "int8"}),
]


@pytest.mark.parametrize(("function", "params"), CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_both_doors_calibrate_the_same_weights_to_the_same_codes(function, params):
    """The probe's weights (a Linear, an embedding, a convolution, a transposed one) in an ONNX graph and in the Core
    AI program, fed the same inputs: the same statistics, and the same decoded weights from every calibrated
    algorithm."""
    program, _, dense = make_probe("fp32")
    rng = np.random.default_rng(5)
    eye = rng.standard_normal((6, 64, 64)).astype(np.float32) * np.logspace(-1, 1, 64, dtype=np.float32)
    ids = rng.integers(0, 40, (6, 40))
    conv_in = rng.standard_normal((6, 72, 8, 3, 3)).astype(np.float32)
    deconv_in = (
        rng.standard_normal((6, 16, 16, 1, 1)).astype(np.float32)
        * np.logspace(-1, 1, 16, dtype=np.float32)[:, None, None]
    )
    inputs = list(zip(eye, ids, conv_in, deconv_in, strict=True))
    core_feeds = [{"eye": e, "ids": i, "conv_in": c, "deconv_in": d} for e, i, c, d in inputs]
    onnx_feeds = [{"x0": e, "x1": i, "x2": c, "x3": d} for e, i, c, d in inputs]
    onnx = onnx_probe(dense)
    core_stats = collect_input_moments(lc.Program.of(program), core_feeds)
    onnx_stats = onnx_moments(onnx, onnx_feeds)
    by_module = {w.shape: w.name for w in lc.Program.of(program).weights()}
    shapes = (("linear", (48, 64)), ("embedding", (40, 32)), ("conv", (16, 8, 3, 3)), ("deconv", (16, 24, 2, 2)))
    for module, shape in shapes:
        ours, theirs = onnx_stats[module], core_stats[by_module[shape]]
        np.testing.assert_array_equal(ours.squares, theirs.squares)
        assert ours.rows == theirs.rows and (ours.gram is None) == (theirs.gram is None)
    core = getattr(lc, function)(program, weight_num_threshold=512, calibration_data=core_feeds, **params)
    onnx_out = getattr(lowbit, function)(onnx, weight_num_threshold=512, calibration_data=onnx_feeds, **params)
    onnx_dense = lowbit.decompress_weights(onnx_out).graph.initializers
    core_weights = {w.shape: w for w in core.weights()}
    for module, shape, transposed in (
        ("linear", (48, 64), True),
        ("embedding", (40, 32), False),
        ("conv", (16, 8, 3, 3), False),
        ("deconv", (16, 24, 2, 2), False),  # a transposed convolution: [in, out, *kernel]
    ):
        ours = onnx_dense[module].const_value.numpy()
        np.testing.assert_array_equal(ours.T if transposed else ours, evaluate(core_weights[shape].value))
    data_free = getattr(lc, function)(program, weight_num_threshold=512, **params)
    linear = next(w for w in data_free.weights() if w.shape == (48, 64))
    assert not np.array_equal(evaluate(linear.value), evaluate(core_weights[(48, 64)].value))


def test_cli_calibrates_an_aimodel_as_the_api_does(tower, tmp_path, capsys):
    _, program = tower
    source = program.save(tmp_path / "tower.aimodel")
    feed = _tower_feeds(1, seed=3)[0]
    np.savez(tmp_path / "feed.npz", **feed)
    out = tmp_path / "small.aimodel"
    code = main(
        [
            str(a)
            for a in (
                "palettize",
                source,
                out,
                "--n-bits",
                "3",
                "--weight-num-threshold",
                "128",
                "--calibration",
                tmp_path / "feed.npz",
            )
        ]
    )
    assert code == 0, capsys.readouterr()
    api = lc.palettize_weights(program, n_bits=3, weight_num_threshold=128, calibration_data=[feed])
    written = lc.load(out)  # kept alive: its weights' values belong to its module
    cli = {w.name: np.asarray(evaluate(w.value)) for w in written.weights()}
    assert all(np.array_equal(cli[w.name], evaluate(w.value)) for w in api.weights())


def test_a_program_with_a_dynamic_sequence_length_calibrates_on_feeds_of_any_length():
    """torch.export with a dynamic dim: the activations' channels are static, their rows are not; feeds of three
    lengths are summed, and a feed that breaks a static dim is refused naming the program's shape."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 32)).eval()
    ids = torch.randint(0, 100, (2, 7))
    dynamic = {"input": {1: torch.export.Dim("tokens", min=2, max=64)}}
    program = lc.Program.of(convert(model, (ids,), dynamic_shapes=dynamic))
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.integers(0, 100, (2, n))} for n in (5, 9, 13)]
    moments = collect_input_moments(program, feeds)
    by_shape = {w.shape: w.name for w in program.weights()}
    linear, table = moments[by_shape[(32, 64)]], moments[by_shape[(100, 64)]]
    assert linear.rows == table.rows == 2 * (5 + 9 + 13)
    hidden = np.concatenate([model[0].weight.detach().numpy()[f["input"].ravel()] for f in feeds]).astype(np.float64)
    np.testing.assert_allclose(linear.squares, (hidden**2).sum(0), rtol=1e-6)
    with pytest.raises(ValueError, match=r"has shape \(3, 5\), the program's 2x\?"):
        collect_input_moments(program, [{"input": rng.integers(0, 100, (3, 5))}])


def test_the_runtime_process_is_replaced_as_its_outputs_pile_up(tower, monkeypatch):
    """Core AI's runtime keeps every output it returns: a child process runs it and is replaced once its outputs
    pass the budget. Feeds summed over several children give the statistics of one."""
    from lowbit.coreai import calibration

    _, program = tower
    feeds = _tower_feeds(5)
    whole = collect_input_moments(program, feeds)
    started = []
    child = calibration._Child
    monkeypatch.setattr(calibration, "CHILD_OUTPUT_BYTES", 1)  # one feed per child
    monkeypatch.setattr(calibration, "_Child", lambda *a: started.append(1) or child(*a))
    pieces = collect_input_moments(program, feeds)
    assert len(started) == 5
    for name, moments in whole.items():
        assert pieces[name].rows == moments.rows
        np.testing.assert_allclose(pieces[name].squares, moments.squares, rtol=1e-12)
        if moments.gram is not None:
            np.testing.assert_allclose(pieces[name].gram, moments.gram, rtol=1e-5, atol=1e-5)


def test_a_runtime_that_dies_is_reported_in_one_line_and_a_coreai_py_in_the_working_folder_is_ignored(
    tower, monkeypatch, tmp_path
):
    """The child runs the runtime: its death (here a kill before the second feed) is the caller's ValueError naming
    the feed and the signal, not the caller's death; the child's imports ignore the working folder."""
    from lowbit.coreai import calibration

    _, program = tower
    (tmp_path / "coreai.py").write_text("raise ImportError('not the package')\n")
    monkeypatch.chdir(tmp_path)
    assert collect_input_moments(program, _tower_feeds(1))
    run = calibration._Child.run

    def killed_before_feed_1(child, index, arrays):
        if index == 1:
            child.process.kill()
            child.process.wait()
        return run(child, index, arrays)

    monkeypatch.setattr(calibration._Child, "run", killed_before_feed_1)
    with pytest.raises(ValueError, match=r"runtime stopped \(signal SIGKILL\) on calibration feed 1$"):
        collect_input_moments(program, _tower_feeds(3))
