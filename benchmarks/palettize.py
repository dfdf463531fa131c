"""Palettization benchmark: lowbit against the exact optimum, coremltools 9.0 and coreai-opt 0.3.0, same weights.

    make bench            # or: .venv-bench/bin/python benchmarks/palettize.py [--quick]

One core (the process is pinned), one worker everywhere. Throughput is the public API on a model holding the
weights (lowbit: ``palettize_weights`` on an ONNX Program; coremltools: ``optimize.coreml.palettize_weights`` on an
ML program; coreai-opt: ``coreai_utils.palettize_weights`` on a Core AI program), best of two runs after a warm-up.
Error is rel-MSE = sum((w - decoded)^2) / sum(w^2) of the decoded weights:
- lowbit: its report (tests check it equals the decoded weights' error);
- coremltools: decoded from the compressed program's ``constexpr_lut_to_dense`` constants;
- coreai-opt: its k-means routine fed exactly as its pass feeds it (fp16 cast, 4-decimal rounding in fast mode),
  since its IR cannot be executed on Linux;
- optimum: ``kmeans1d`` (exact, float64 centroids) per tensor / per group; "DP/opt" is lowbit's own partition with
  float64 centroids, "stored/opt" what lowbit stores (centroids rounded to the weight's dtype).
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import warnings
from pathlib import Path

from _common import (
    MIB,
    best_time,
    gaussian_fp16,
    lut_params_decode,
    minilm_linear_weights,
    one_core,
    rel_mse,
    speedup,
    student_t_fp16,
    table,
)

one_core()

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402

import lowbit  # noqa: E402
from lowbit.kernels.histogram import distinct_values, distinct_values_any, squared_error  # noqa: E402
from lowbit.kernels.kmeans1d import optimal_centroids  # noqa: E402

warnings.filterwarnings("ignore")

CONFIGS = {
    "4-bit per-tensor": dict(n_bits=4, granularity="per_tensor"),
    "4-bit grouped(16)": dict(n_bits=4, granularity="per_grouped_channel", group_size=16),
    "6-bit grouped(16)": dict(n_bits=6, granularity="per_grouped_channel", group_size=16),
    "8-bit grouped(16)": dict(n_bits=8, granularity="per_grouped_channel", group_size=16),
    "2-bit per-tensor": dict(n_bits=2, granularity="per_tensor"),
    "4-bit per-channel": dict(n_bits=4, granularity="per_channel"),
}
SYNTHETIC = ["4-bit per-tensor", "4-bit grouped(16)", "6-bit grouped(16)", "8-bit grouped(16)", "2-bit per-tensor"]
REAL = ["4-bit per-tensor", "4-bit grouped(16)", "2-bit per-tensor"]
# the 6- and 8-bit rows are lowbit against itself (their bar: within 3x of 4-bit's throughput); the peers take
# minutes per run on them


def onnx_program(weights: dict[str, np.ndarray]) -> lowbit.Program:
    """Each weight [out, in] feeds a Gemm(transB=1), as exported Linear layers do."""
    inits, nodes, inputs, outputs = [], [], [], []
    for i, (name, w) in enumerate(weights.items()):
        value = ir.Value(name=name, const_value=ir.tensor(w))
        x = ir.Value(name=f"x{i}", type=ir.TensorType(value.const_value.dtype), shape=ir.Shape([1, w.shape[1]]))
        node = ir.node("Gemm", [x, value], {"transB": 1}, name=f"gemm{i}")
        node.outputs[0].name, node.outputs[0].dtype = f"y{i}", value.const_value.dtype
        inits.append(value), nodes.append(node), inputs.append(x), outputs.append(node.outputs[0])
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=inits, opset_imports={"": 17})
    return lowbit.Program(ir.Model(graph, ir_version=8))


def groups_of(cfg: dict, w: np.ndarray) -> int:
    return {"per_tensor": 1, "per_channel": w.shape[0]}.get(cfg["granularity"], w.shape[0] // cfg.get("group_size", 1))


def run_lowbit(weights, cfg) -> tuple[float, float, float, float]:
    program = onnx_program(weights)
    result: list[lowbit.Program] = []
    seconds = best_time(lambda: result.append(lowbit.palettize_weights(program, num_kmeans_workers=1, **cfg)))
    report = {r.name: r for r in result[-1].report.rows}
    energy = {n: float((w.astype(np.float64) ** 2).sum()) for n, w in weights.items()}
    total = sum(energy.values())
    stored = sum(report[n].rel_mse * energy[n] for n in weights) / total
    dp = 0.0
    for w in weights.values():  # lowbit's partition with float64 centroids: the DP's own optimality
        rows = w.reshape(groups_of(cfg, w), -1)
        if rows.dtype == np.float16:
            values, counts, offsets, _ = distinct_values(rows.view(np.uint16), rows.dtype)
        else:
            values, counts, offsets, _ = distinct_values_any(rows)
        centroids = optimal_centroids(values, counts, offsets, 1 << cfg["n_bits"])
        mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
        dp += float(squared_error(values, counts, offsets, centroids, mids).sum())
    nbytes = sum(report[n].bytes_after for n in weights)
    return seconds, stored, dp / total, nbytes


def run_optimum(weights, cfg) -> float:
    import kmeans1d

    sse, total = 0.0, 0.0
    k = 1 << cfg["n_bits"]
    for w in weights.values():
        data = w.astype(np.float64)
        total += float((data**2).sum())
        for rows in data.reshape(groups_of(cfg, w), -1):
            labels, centroids = kmeans1d.cluster(rows, k)
            sse += float(((rows - np.asarray(centroids)[np.asarray(labels)]) ** 2).sum())
    return sse / total


def _mil_linear(mb, ct, w: np.ndarray):
    weight = w.astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, w.shape[1]))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=weight, name="out")

    return prog


def run_coremltools(weights, cfg) -> tuple[float, float]:
    import coremltools as ct
    import coremltools.optimize as cto
    from coremltools.converters.mil import Builder as mb

    seconds, sse, total = 0.0, 0.0, 0.0
    per_channel = cfg["granularity"] == "per_channel"  # coremltools' name for it: groups of one channel
    op_cfg = cto.coreml.OpPalettizerConfig(
        mode="kmeans",
        nbits=cfg["n_bits"],
        granularity="per_grouped_channel" if per_channel else cfg["granularity"],
        group_size=1 if per_channel else cfg.get("group_size", 32),
        num_kmeans_workers=1,
    )
    for w in weights.values():
        precision = ct.precision.FLOAT16 if w.dtype == np.float16 else ct.precision.FLOAT32
        prog = _mil_linear(mb, ct, w)
        model = ct.convert(
            prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, compute_precision=precision
        )
        result: list = []
        seconds += best_time(
            lambda model=model, result=result: result.append(
                cto.coreml.palettize_weights(model, cto.coreml.OptimizationConfig(global_config=op_cfg))
            )
        )
        (op,) = [
            o
            for f in result[-1]._mil_program.functions.values()
            for o in f.operations
            if o.op_type == "constexpr_lut_to_dense"
        ]
        decoded = lut_params_decode(op.indices.val, op.lut.val)
        sse += rel_mse(w, decoded) * float((w.astype(np.float64) ** 2).sum())
        total += float((w.astype(np.float64) ** 2).sum())
    return seconds, sse / total


def _linears_program(weights, torch, coreai_torch):
    """A Core AI program of one Linear per weight (built through torch.export, as coreai-opt users do)."""

    class Linears(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights.values()])

        def forward(self, *xs):
            return tuple(torch.nn.functional.linear(x, w) for x, w in zip(xs, self.w, strict=True))

    args = tuple(torch.zeros(1, w.shape[1], dtype=torch.from_numpy(w[:1]).dtype) for w in weights.values())
    ep = torch.export.export(Linears().eval(), args).run_decompositions(coreai_torch.get_decomp_table())
    return coreai_torch.TorchConverter().add_exported_program(ep).to_coreai()


def run_coreai(weights, cfg) -> tuple[float, float]:
    import coreai_torch
    import torch
    from coreai_opt.coreai_utils import CompressionGranularity, palettize_weights
    from coreai_opt.coreai_utils._utils.palettize_utils import _blockwise_compress

    granularity = CompressionGranularity(cfg["granularity"])
    program = _linears_program(weights, torch, coreai_torch)
    seconds = best_time(
        lambda: palettize_weights(
            program,
            None,
            n_bits=cfg["n_bits"],
            granularity=granularity,
            group_size=cfg.get("group_size", 32),
            num_kmeans_workers=1,
        )
    )
    sse, total = 0.0, 0.0
    for w in weights.values():
        fed = np.round(w.astype(np.float16), decimals=4)
        block = {"per_tensor": [0, 0], "per_channel": [1, 0]}.get(cfg["granularity"], [cfg.get("group_size"), 0])
        params = _blockwise_compress(fed, "KMEANS", cfg["n_bits"], block, channel_axis=0, num_kmeans_workers=1)
        decoded = lut_params_decode(params.indices, params.lut).astype(w.dtype)
        energy = float((w.astype(np.float64) ** 2).sum())
        sse += rel_mse(w, decoded) * energy
        total += energy
    return seconds, sse / total


_RSS_PROBE = """
import sys
sys.path.insert(0, {here!r})
from palettize import onnx_program, {maker} as make
import lowbit
def status(key): return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024
weights = make() if {kind!r} == 'minilm' else {{'w': make()}}
program = onnx_program(weights)
largest = max(w.nbytes for w in weights.values())
del weights
config = dict(n_bits=4, granularity='per_grouped_channel', group_size=16, num_kmeans_workers=1)
if {warm}:  # load the compiled kernels first, on a tiny model
    from palettize import gaussian_fp16
    lowbit.palettize_weights(onnx_program({{'w': gaussian_fp16(64)}}), weight_num_threshold=0, **config)
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
base = status('VmRSS')
lowbit.palettize_weights(program, in_place=True, **config)
print(largest, base, status('VmHWM'))
"""


def peak_rss_check(kind: str, warm: bool) -> str:
    """Palettize one weight set in a fresh process; its peak RSS above the loaded program against the bar."""
    maker = "gaussian_fp16" if kind == "gauss" else "minilm_linear_weights"
    code = _RSS_PROBE.format(here=str(Path(__file__).parent), maker=maker, kind=kind, warm=warm)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    largest, base, peak = map(int, out[-3:])
    limit = largest * 6 + 200 * MIB
    verdict = "met" if peak - base <= limit else "NOT met"
    return (
        f"{kind} ({'kernels loaded' if warm else 'cold: includes loading/compiling the numba kernels'}): "
        f"largest weight {largest / MIB:.1f} MiB, peak RSS above the loaded program {(peak - base) / MIB:.1f} MiB, "
        f"bar {limit / MIB:.1f} MiB -> {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024x1024 synthetic weights instead of 4096x4096")
    parser.add_argument("--skip-peers", action="store_true", help="lowbit and the optimum only")
    parser.add_argument("--sets", default="", help="only the weight sets whose name matches this regex")
    args = parser.parse_args()
    n = 1024 if args.quick else 4096
    minilm = minilm_linear_weights()
    sets = {  # weights, the configs run on them
        f"gauss fp16 {n}^2": ({"w": gaussian_fp16(n)}, SYNTHETIC),
        f"student-t fp16 {n}^2": ({"w": student_t_fp16(n)}, SYNTHETIC),
        f"gauss fp16 {n // 4}^2": ({"w": gaussian_fp16(n // 4)}, ["4-bit per-channel"]),
        "MiniLM linear fp32 (36)": (minilm, REAL),
        "MiniLM linear fp16 (36)": ({k: v.astype(np.float16) for k, v in minilm.items()}, REAL),
    }
    rows = []
    for set_name, (weights, config_names) in sets.items():
        if not re.search(args.sets, set_name):
            continue
        numel = sum(w.size for w in weights.values())
        dense32 = numel * 4
        for cfg_name in config_names:
            cfg = CONFIGS[cfg_name]
            secs, stored, dp, nbytes = run_lowbit(weights, cfg)
            # kmeans1d is O(k n) per group: about 3 s per group of 65,536 at k = 256, so the optimum is left to the
            # tests (lowbit's solver against the layered program and brute force) above 4 bits
            optimum = run_optimum(weights, cfg) if cfg["n_bits"] <= 4 else float("nan")
            row = [
                set_name,
                cfg_name,
                f"{numel / secs / 1e6:.1f}",
                f"{stored:.4e}",
                f"{dp / optimum:.7f}" if optimum == optimum else "-",
                f"{stored / optimum:.6f}" if optimum == optimum else "-",
                f"{nbytes / dense32:.4f}",
            ]
            if not args.skip_peers and cfg["n_bits"] > 4:
                row += ["-"] * 6
            elif not args.skip_peers:
                ct_secs, ct_err = run_coremltools(weights, cfg)
                ca_secs, ca_err = run_coreai(weights, cfg)
                row += [
                    f"{numel / ct_secs / 1e6:.2f}",
                    speedup(ct_secs, secs),
                    f"{ct_err / stored:.4f}",
                    f"{numel / ca_secs / 1e6:.2f}",
                    speedup(ca_secs, secs),
                    f"{ca_err / stored:.4f}",
                ]
            rows.append(row)
            print(" | ".join(row), file=sys.stderr, flush=True)
    headers = ["weights", "config", "lowbit Mw/s", "lowbit rel-MSE", "DP/opt", "stored/opt", "bytes/fp32"]
    if not args.skip_peers:
        headers += ["coreml Mw/s", "speedup", "coreml err/lowbit", "coreai Mw/s", "speedup", "coreai err/lowbit"]
    print(table(headers, rows))
    print()
    for kind in ("gauss", "minilm"):
        for warm in (True, False):
            print(peak_rss_check(kind, warm))
    print(f"(one core; max RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB)")


if __name__ == "__main__":
    main()
