"""Quantization benchmark: lowbit against a float64 reference quantizer, coremltools 9.0 and coreai-opt 0.3.0,
on the same weights; then ONNX Runtime on an int4 block-32 MatMul against the fp32 original.

    .venv-bench/bin/python benchmarks/quantize.py [--quick]

One core, public APIs, best of two runs after a warm-up. lowbit's time includes raising the model's opset (the
test models are opset 17) and writing the ONNX graph. Error is rel-MSE of the decoded weights:
- lowbit: its report (tests check it equals the decoded weights' error); "ref" is a float64 reference quantizer
  with the same scale rule (scales rounded to the weight dtype) computed here;
- coremltools: decoded from the compressed program's ``constexpr_blockwise_shift_scale`` constants. Its fp16 input
  path does not quantize, so its model holds the same values as fp32 (its scales are then fp32, ours fp16);
- coreai-opt: time only (its IR cannot be executed on Linux).
MXFP4 and fp8 have no coremltools 9.0 counterpart; their "ref" is ml_dtypes' cast with the same scale rule.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

from _common import (
    MIB,
    best_time,
    gaussian_fp16,
    minilm_linear_weights,
    one_core,
    rel_mse,
    speedup,
    student_t_fp16,
    table,
)

one_core()

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
from palettize import onnx_program  # noqa: E402

import lowbit  # noqa: E402

warnings.filterwarnings("ignore")

CONFIGS = {
    "int8 per-channel": dict(dtype="int8", granularity="per_channel"),
    "int4 per-channel": dict(dtype="int4", granularity="per_channel"),
    "int4 per-block(32)": dict(dtype="int4", granularity="per_block", block_size=32),
    "MXFP4 per-block(32)": dict(dtype="fp4_e2m1fn", granularity="per_block", block_size=32),
    "fp8 e4m3 per-channel": dict(dtype="fp8_e4m3fn", granularity="per_channel"),
}
FLOAT_ELEMENTS = {"fp4_e2m1fn": ml_dtypes.float4_e2m1fn, "fp8_e4m3fn": ml_dtypes.float8_e4m3fn}


def reference_rel_mse(weights: dict[str, np.ndarray], cfg: dict) -> float:
    """float64 symmetric quantizer, scales rounded down to the weight dtype, blocks along the input axis (axis 1),
    int4 on all 16 codes (the extreme on the -8 side);
    for float elements ml_dtypes' round-to-nearest-even cast, with the OCP MX shared exponent for MXFP4."""
    if cfg["dtype"] in FLOAT_ELEMENTS:
        return float_reference_rel_mse(weights, cfg)
    sse = energy = 0.0
    bits = 8 if cfg["dtype"] == "int8" else 4
    qmax = 2 ** (bits - 1) - 1
    for w in weights.values():
        x = w.astype(np.float64)
        bs = cfg.get("block_size", x.shape[1]) if cfg["granularity"] == "per_block" else x.shape[1]
        blocks = x.reshape(x.shape[0], -1, bs)
        lo, hi = blocks.min(axis=2, keepdims=True), blocks.max(axis=2, keepdims=True)
        extreme = np.where(np.abs(lo) > np.abs(hi), lo, hi)
        # int4 uses all 16 codes: the block's extreme maps to -8 (as ONNX Runtime's RTN); int8 maps it to +-127
        steps = 8 if bits == 4 else qmax
        raw = np.abs(extreme) / steps
        scale = raw.astype(w.dtype)
        scale = np.where(scale > raw, np.nextafter(scale, np.zeros((), w.dtype)), scale).astype(np.float64)
        scale[scale == 0] = 1.0
        if bits == 4:
            scale = scale * -np.sign(np.where(extreme, extreme, 1))
        codes = np.clip(np.rint(blocks / scale), -qmax - (bits == 4), qmax)
        decoded = (codes * scale).astype(np.float32).astype(w.dtype)
        sse += float(((decoded.astype(np.float64).reshape(x.shape) - x) ** 2).sum())
        energy += float((x**2).sum())
    return sse / energy


def float_reference_rel_mse(weights: dict[str, np.ndarray], cfg: dict) -> float:
    element = FLOAT_ELEMENTS[cfg["dtype"]]
    top = float(ml_dtypes.finfo(element).max)
    sse = energy = 0.0
    for w in weights.values():
        x = w.astype(np.float64)
        bs = cfg.get("block_size", x.shape[1]) if cfg["granularity"] == "per_block" else x.shape[1]
        blocks = x.reshape(x.shape[0], -1, bs)
        amax = np.abs(blocks).max(axis=2, keepdims=True)
        if cfg["granularity"] == "per_block":  # MX: 2^(floor(log2 amax) - emax of the element)
            scale = np.exp2(np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - np.floor(np.log2(top)))
        else:
            raw = amax / top
            scale = raw.astype(w.dtype)
            scale = np.where(scale > raw, np.nextafter(scale, np.zeros((), w.dtype)), scale).astype(np.float64)
            scale[scale == 0] = 1.0
        q = np.clip(blocks / scale, -top, top).astype(np.float32).astype(element).astype(np.float64)
        decoded = (q * scale).astype(np.float32).astype(w.dtype).astype(np.float64)
        sse += float(((decoded.reshape(x.shape) - x) ** 2).sum())
        energy += float((x**2).sum())
    return sse / energy


def run_lowbit(weights, cfg) -> tuple[float, float, int]:
    program = onnx_program(weights)
    result: list = []
    seconds = best_time(lambda: result.append(lowbit.quantize_weights(program, **cfg)))
    rows = {r.name: r for r in result[-1].report.rows}
    energy = {n: float((w.astype(np.float64) ** 2).sum()) for n, w in weights.items()}
    err = sum(rows[n].rel_mse * energy[n] for n in weights) / sum(energy.values())
    return seconds, err, sum(rows[n].bytes_after for n in weights)


def _expand(a, reps: list[int]):
    """Per-block parameters repeated to the data's shape."""
    return np.kron(a, np.ones(reps)) if np.ndim(a) else a


def run_coremltools(weights, cfg) -> tuple[float, float]:
    import coremltools as ct
    import coremltools.optimize as cto
    from coremltools.converters.mil import Builder as mb
    from palettize import _mil_linear

    if cfg["dtype"] in FLOAT_ELEMENTS:  # coremltools 9.0 has no fp4 / fp8 weight quantization
        return float("nan"), float("nan")
    op_cfg = cto.coreml.OpLinearQuantizerConfig(
        mode="linear_symmetric",
        dtype=cfg["dtype"],
        granularity=cfg["granularity"],
        block_size=cfg.get("block_size", 32),
        weight_threshold=0,
    )
    seconds, sse, energy = 0.0, 0.0, 0.0
    for w in weights.values():
        model = ct.convert(
            _mil_linear(mb, ct, w),
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT32,
        )
        result: list = []
        seconds += best_time(
            lambda model=model, result=result: result.append(
                cto.coreml.linear_quantize_weights(model, cto.coreml.OptimizationConfig(global_config=op_cfg))
            )
        )
        (op,) = [
            o
            for f in result[-1]._mil_program.functions.values()
            for o in f.operations
            if o.op_type == "constexpr_blockwise_shift_scale"
        ]
        data, scale = op.data.val.astype(np.float64), op.scale.val.astype(np.float64)
        offset = 0.0 if op.offset is None else op.offset.val.astype(np.float64)
        reps = [d // s for d, s in zip(data.shape, scale.shape, strict=True)]
        decoded = (data - _expand(offset, reps)) * _expand(scale, reps)
        e = float((w.astype(np.float64) ** 2).sum())
        sse += rel_mse(w, decoded) * e
        energy += e
    return seconds, sse / energy


def run_coreai(weights, cfg) -> float:
    import coreai_torch
    import torch
    from coreai_opt.coreai_utils import CompressionGranularity, DType, quantize_weights
    from palettize import _linears_program

    program = _linears_program(weights, torch, coreai_torch)
    dtype = DType(cfg["dtype"])
    return best_time(
        lambda: quantize_weights(
            program, dtype, granularity=CompressionGranularity(cfg["granularity"]), block_size=cfg.get("block_size", 32)
        )
    )


_ORT_PROBE = """
import json, sys, time, numpy as np, onnxruntime as ort
def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
base = rss()
options = ort.SessionOptions()
options.intra_op_num_threads = 1
start = time.perf_counter()
session = ort.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])
load = time.perf_counter() - start
x = np.random.default_rng(0).standard_normal((1, session.get_inputs()[0].shape[1])).astype(np.float32)
for _ in range(20): y = session.run(None, {'x0': x})[0]
times = []
for _ in range(300):
    t = time.perf_counter(); session.run(None, {'x0': x}); times.append(time.perf_counter() - t)
np.save(sys.argv[2], y)
print(json.dumps({'rss': rss() - base, 'load': load, 'latency': float(np.median(times))}))
"""


def ort_gemv(tmp: Path, quick: bool) -> list[str]:
    n = 1024 if quick else 4096
    w = (np.random.default_rng(7).standard_normal((n, n)) * 0.02).astype(np.float32)
    dense = onnx_program({"w": w})  # Gemm(transB=1) of an [out, in] weight
    graph = dense.graph  # a MatMul of [K, N] is what ORT fuses into MatMulNBits: use w.T as the MatMul weight
    node = graph.node(0)
    wt = ir.Value(name="wt", const_value=ir.tensor(np.ascontiguousarray(w.T)))
    matmul = ir.node("MatMul", [node.inputs[0], wt], name="mm")
    matmul.outputs[0].name, matmul.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph.register_initializer(wt)
    graph.insert_after(node, matmul)
    graph.outputs[0] = matmul.outputs[0]
    graph.remove(node, safe=True)
    graph.initializers.pop("w")
    dense.graph.inputs[0].shape = ir.Shape([1, n])
    paths = {"fp32": dense.save(tmp / "fp32.onnx")}
    quant = lowbit.quantize_weights(dense, dtype="int4", granularity="per_block", block_size=32)
    paths["int4 block32"] = quant.save(tmp / "int4.onnx")
    rows, outputs = [], {}
    for name, path in paths.items():
        out = subprocess.run(
            [sys.executable, "-c", _ORT_PROBE, str(path), str(tmp / f"{name[:4]}.npy")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        stats = json.loads(out.strip().splitlines()[-1])
        outputs[name] = np.load(tmp / f"{name[:4]}.npy")
        rows.append(
            [
                name,
                f"{path.stat().st_size / MIB:.1f}",
                f"{stats['rss'] / MIB:.1f}",
                f"{stats['load']:.3f}",
                f"{stats['latency'] * 1e3:.3f}",
            ]
        )
    x = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32).astype(np.float64)
    decoded = lowbit.decompress_weights(quant).graph.initializers["wt"].const_value.numpy().astype(np.float64)

    def rel(y: np.ndarray, ref: np.ndarray) -> str:
        return f"{np.linalg.norm(y - ref) / np.linalg.norm(ref):.2e}"

    rows[0] += [rel(outputs["fp32"], x @ w.T.astype(np.float64)), "-"]
    rows[1] += [rel(outputs["int4 block32"], x @ w.T.astype(np.float64)), rel(outputs["int4 block32"], x @ decoded)]
    headers = ["model", "file MiB", "session RSS MiB", "load s", f"1x{n} GEMV ms", "err vs fp32", "err vs decoded"]
    return [table(headers, rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024x1024 synthetic weights instead of 4096x4096")
    parser.add_argument("--skip-peers", action="store_true")
    args = parser.parse_args()
    n = 1024 if args.quick else 4096
    sets = {
        f"gauss fp16 {n}^2": {"w": gaussian_fp16(n)},
        f"student-t fp16 {n}^2": {"w": student_t_fp16(n)},
        "MiniLM linear fp32 (36)": minilm_linear_weights(),
    }
    rows = []
    for set_name, weights in sets.items():
        numel = sum(w.size for w in weights.values())
        for cfg_name, cfg in CONFIGS.items():
            secs, err, nbytes = run_lowbit(weights, cfg)
            ref = reference_rel_mse(weights, cfg)
            row = [
                set_name,
                cfg_name,
                f"{numel / secs / 1e6:.1f}",
                f"{err:.4e}",
                f"{err / ref:.6f}",
                f"{nbytes / (numel * 4):.4f}",
            ]
            if not args.skip_peers:
                ct_secs, ct_err = run_coremltools(weights, cfg)
                ca_secs = run_coreai(weights, cfg)
                row += [
                    f"{numel / ct_secs / 1e6:.1f}",
                    speedup(ct_secs, secs) if ct_secs == ct_secs else "-",
                    f"{ct_err / err:.4f}",
                    f"{numel / ca_secs / 1e6:.1f}",
                    speedup(ca_secs, secs),
                ]
            rows.append(row)
            print(" | ".join(row), file=sys.stderr, flush=True)
    headers = ["weights", "config", "lowbit Mw/s", "lowbit rel-MSE", "/ref", "bytes/fp32"]
    if not args.skip_peers:
        headers += ["coreml Mw/s", "speedup", "coreml err/lowbit", "coreai Mw/s", "speedup"]
    print(table(headers, rows))
    print()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(ort_gemv(Path(tmp), args.quick)))
    print(
        f"\n(ONNX Runtime {__import__('onnxruntime').__version__}, one thread, default optimization level: the int4 "
        "model runs as MatMulNBits)"
    )


if __name__ == "__main__":
    main()
