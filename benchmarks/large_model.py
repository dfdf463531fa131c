"""A 7B-shaped model through the CLI: memory and speed of ``lowbit palettize`` on weights far larger than RAM wants.

    .venv/bin/python benchmarks/large_model.py [--layers 32] [--dir /tmp/lowbit-7b] [--workers 4]

Builds (once, in ``--dir``) an ONNX model of ``--layers`` LLaMA-7B decoder layers: per layer the q/k/v/o
projections (4096 x 4096) and the gate/up/down MLP (4096 x 11008), fp16, in one external data file (32 layers:
6.5 G weights, 12.1 GiB), then runs ``lowbit palettize --n-bits 4 --granularity per-grouped-channel --group-size
16`` on it in a child process, sampling the child's memory every 0.1 s (threads share one process: the tree is that
process). Reports wall time, weights per second, peak anonymous memory (``RssAnon``: what the machine must find),
peak file-backed RSS (``RssFile``: pages of the memory-mapped input), and how much the page cache grew.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

GIB = 1 << 30
HIDDEN, MLP = 4096, 11008
SHAPES = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, HIDDEN), "v": (HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN),
          "gate": (HIDDEN, MLP), "up": (HIDDEN, MLP), "down": (MLP, HIDDEN)}  # fmt: skip


def build(folder: Path, layers: int) -> Path:
    """The model file (MatMul weights [in, out], as exported Linear layers are) and its data file."""
    model_path = folder / f"llama7b-shaped-{layers}.onnx"
    if model_path.exists():
        return model_path
    folder.mkdir(parents=True, exist_ok=True)
    data_name = model_path.name + ".data"
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    offset = 0
    with open(folder / data_name, "wb") as data:
        h = "x"
        for layer in range(layers):
            for name, shape in SHAPES.items():
                w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
                tensor = TensorProto(name=f"l{layer}.{name}", data_type=TensorProto.FLOAT16, dims=shape)
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                    tensor.external_data.add(key=key, value=value)
                data.write(w.tobytes())
                offset += w.nbytes
                inits.append(tensor)
            p = f"l{layer}."
            nodes += [helper.make_node("MatMul", [h, p + n], [p + n + "_y"]) for n in ("q", "k", "v")]
            nodes += [
                helper.make_node("Sum", [p + "q_y", p + "k_y", p + "v_y"], [p + "qkv"]),
                helper.make_node("MatMul", [p + "qkv", p + "o"], [p + "attn"]),
                helper.make_node("MatMul", [p + "attn", p + "gate"], [p + "gate_y"]),
                helper.make_node("MatMul", [p + "attn", p + "up"], [p + "up_y"]),
                helper.make_node("Mul", [p + "gate_y", p + "up_y"], [p + "mlp"]),
                helper.make_node("MatMul", [p + "mlp", p + "down"], [p + "out"]),
            ]
            h = p + "out"
    graph = helper.make_graph(
        nodes,
        "llama7b_shaped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, HIDDEN])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT16, [1, HIDDEN])],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_path)
    return model_path


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            fields[key] = int(rest.split()[0]) * 1024
    return fields


def _cached() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    return 0


def run(model: Path, output: Path, workers: int) -> dict[str, float]:
    cmd = [str(Path(sys.executable).parent / "lowbit"), "palettize", str(model), str(output), "--n-bits", "4",
           "--granularity", "per-grouped-channel", "--group-size", "16", "--workers", str(workers)]  # fmt: skip
    cached_before = _cached()
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0, "cache": 0}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                status = _status(child.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            for key in ("RssAnon", "RssFile", "VmRSS"):
                peaks[key] = max(peaks[key], status.get(key, 0))
            peaks["cache"] = max(peaks["cache"], _cached() - cached_before)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = child.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"lowbit exited {child.returncode}:\n{out[-3000:]}")
    return {"seconds": seconds, **peaks, "cache_after": _cached() - cached_before}


def ort_differences(model: Path, output: Path) -> tuple[float, float]:
    """Relative L2 differences of the palettized model's ONNX Runtime output from the original's and from that of
    its own decoded weights (``lowbit.decompress_weights``: the graph's decode must reproduce them)."""
    import onnxruntime as ort

    import lowbit

    decoded = lowbit.decompress_weights(lowbit.load(output)).save(output.with_name("decoded.onnx"))
    # small inputs: the random stack squares its activations in every MLP and would overflow fp16 otherwise
    x = {"x": (np.random.default_rng(1).standard_normal((1, HIDDEN)) * 0.01).astype(np.float16)}
    ys = []
    for path in (model, output, decoded):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        ys.append(ort.InferenceSession(str(path), options).run(None, x)[0].astype(np.float64))
    for path in decoded.parent.glob(decoded.name + "*"):
        path.unlink()
    original, palettized, reference = ys
    return tuple(float(np.linalg.norm(palettized - y) / np.linalg.norm(y)) for y in (original, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lowbit-7b"))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--check", action="store_true", help="run both models in ONNX Runtime (a few layers only)")
    args = parser.parse_args()
    model = build(args.dir, args.layers)
    weights = args.layers * sum(a * b for a, b in SHAPES.values())
    data = Path(str(model) + ".data")
    output = args.dir / f"palettized-{args.layers}.onnx"
    stats = run(model, output, args.workers)
    written = output.stat().st_size + sum(p.stat().st_size for p in args.dir.glob(output.name + "*.data"))
    print(
        f"model: {args.layers} LLaMA-7B layers, {weights / 1e9:.2f} G fp16 weights, {data.stat().st_size / GIB:.2f} GiB"
    )
    print(f"lowbit palettize 4-bit grouped(16), --workers {args.workers}: {stats['seconds']:.1f} s, "
          f"{weights / stats['seconds'] / 1e6:.1f} M weights/s")  # fmt: skip
    print(f"peak anonymous {stats['RssAnon'] / GIB:.2f} GiB, peak file-backed RSS {stats['RssFile'] / GIB:.2f} GiB, "
          f"peak RSS {stats['VmRSS'] / GIB:.2f} GiB")  # fmt: skip
    if args.check:
        to_original, to_decoded = ort_differences(model, output)
        print(f"ONNX Runtime, same input: output relative difference {to_original:.3e} from the original model's, "
              f"{to_decoded:.3e} from its decoded weights'")  # fmt: skip
    print(f"page cache growth: peak {stats['cache'] / GIB:.2f} GiB, after {stats['cache_after'] / GIB:.2f} GiB "
          f"(output written: {written / GIB:.2f} GiB)")  # fmt: skip


if __name__ == "__main__":
    main()
