"""Sparsification benchmark: sizes of sparse / sparse+int8 / sparse+4-bit-LUT weights against dense, speed against
coreai-opt 0.3.0's ``sparsify_weights`` with the same options, and lowbit against coremltools 9.0 ``prune_weights``
(magnitude, 50%) on the same weights: zeros and file size.

    .venv-bench/bin/python benchmarks/sparsify.py [--quick]

Sizes are bytes of the weight's stored constants (the ONNX file adds a few KB of graph and function bodies: the
file-size comparison with coremltools uses whole files, ONNX model vs the mlpackage's weight file).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

from _common import MIB, best_time, gaussian_fp16, minilm_linear_weights, one_core, table

one_core()

import numpy as np  # noqa: E402
from palettize import onnx_program  # noqa: E402

import lowbit  # noqa: E402

warnings.filterwarnings("ignore")

CONFIGS = {
    "50% sparse": dict(target_sparsity=0.5),
    "75% sparse": dict(target_sparsity=0.75),
    "50% + int8": dict(target_sparsity=0.5, quantize_dtype="int8"),
    "75% + int8": dict(target_sparsity=0.75, quantize_dtype="int8"),
    "50% + 4-bit LUT": dict(target_sparsity=0.5, palettize_nbits=4),
    "75% + 4-bit LUT": dict(target_sparsity=0.75, palettize_nbits=4),
    "2:4 sparse": dict(target_sparsity=0.0, n_m_ratio=(2, 4)),
}


def run_lowbit(weights, cfg):
    program = onnx_program(weights)
    result: list = []
    seconds = best_time(lambda: result.append(lowbit.sparsify_weights(program, **cfg)))
    rows = result[-1].report.rows
    energy = {n: float((w.astype(np.float64) ** 2).sum()) for n, w in weights.items()}
    err = sum(r.rel_mse * energy[r.name] for r in rows) / sum(energy.values())
    return seconds, err, sum(r.bytes_after for r in rows), result[-1]


def run_coreai(weights, cfg) -> float:
    """Seconds of coreai-opt's ``sparsify_weights`` with the same options (its IR cannot be executed on Linux)."""
    import coreai_torch
    import torch
    from coreai_opt.coreai_utils import DType, sparsify_weights
    from palettize import _linears_program

    program = _linears_program(weights, torch, coreai_torch)
    options = dict(cfg)
    if "n_m_ratio" in options:  # coreai-opt refuses a target_sparsity (its default: 0.5) beside n_m_ratio
        options["target_sparsity"] = None
    if "quantize_dtype" in options:
        options["quantize_dtype"] = DType(options["quantize_dtype"])
    return best_time(lambda: sparsify_weights(program, **options))


def coremltools_prune(w: np.ndarray, tmp: Path) -> tuple[float, np.ndarray, int]:
    import coremltools as ct
    import coremltools.optimize as cto
    from coremltools.converters.mil import Builder as mb
    from palettize import _mil_linear

    precision = ct.precision.FLOAT16 if w.dtype == np.float16 else ct.precision.FLOAT32
    model = ct.convert(
        _mil_linear(mb, ct, w),
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=precision,
    )
    config = cto.coreml.OptimizationConfig(
        global_config=cto.coreml.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=0)
    )
    result: list = []
    seconds = best_time(lambda: result.append(cto.coreml.prune_weights(model, config)))
    (op,) = [
        o
        for f in result[-1]._mil_program.functions.values()
        for o in f.operations
        if o.op_type == "constexpr_sparse_to_dense"
    ]
    mask = op.mask.val.astype(bool)
    path = tmp / "pruned.mlpackage"
    result[-1].save(str(path))
    weight_file = next(path.rglob("weight.bin"))
    return seconds, mask, weight_file.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024x1024 synthetic weights instead of 4096x4096")
    parser.add_argument("--skip-peers", action="store_true")
    args = parser.parse_args()
    n = 1024 if args.quick else 4096
    sets = {f"gauss fp16 {n}^2": {"w": gaussian_fp16(n)}, "MiniLM linear fp32 (36)": minilm_linear_weights()}
    rows = []
    for set_name, weights in sets.items():
        numel = sum(w.size for w in weights.values())
        dense = sum(w.nbytes for w in weights.values())
        for cfg_name, cfg in CONFIGS.items():
            secs, err, nbytes, _ = run_lowbit(weights, cfg)
            rows.append(
                [
                    set_name,
                    cfg_name,
                    f"{numel / secs / 1e6:.1f}",
                    f"{err:.4e}",
                    f"{nbytes / dense:.4f}",
                    f"{nbytes / (numel * 4):.4f}",
                ]
            )
            if not args.skip_peers:
                ca_secs = run_coreai(weights, cfg)
                rows[-1] += [f"{numel / ca_secs / 1e6:.1f}", f"{ca_secs / secs:.1f}x"]
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    headers = ["weights", "config", "lowbit Mw/s", "rel-MSE", "bytes/dense", "bytes/fp32"]
    print(table(headers + ([] if args.skip_peers else ["coreai Mw/s", "speedup"]), rows))
    if args.skip_peers:
        return

    print("\nagainst coremltools prune_weights (magnitude, 50%), one weight:")
    w = gaussian_fp16(n)
    with tempfile.TemporaryDirectory() as tmp:
        ct_secs, ct_mask, ct_file = coremltools_prune(w, Path(tmp))
        secs, _, stored, result = run_lowbit({"w": w}, dict(target_sparsity=0.5))
        ours = result.save(Path(tmp) / "sparse.onnx").stat().st_size
    dense_w = lowbit.decompress_weights(result).graph.initializers["w"].const_value.numpy()
    our_mask = dense_w != 0
    same = int((our_mask == ct_mask).sum())
    print(
        table(
            ["tool", "Mw/s", "zeros", "weight bytes", "file bytes"],
            [
                ["lowbit", f"{w.size / secs / 1e6:.1f}", str(int((~our_mask).sum())), str(stored), str(ours)],
                ["coremltools", f"{w.size / ct_secs / 1e6:.1f}", str(int((~ct_mask).sum())), str(ct_file), "-"],
            ],
        )
    )
    print(
        f"target zeros {round(0.5 * w.size)}; masks agree on {same} of {w.size} elements ({same / w.size:.6f}); "
        f"weight bytes lowbit / coremltools weight.bin = {stored / ct_file:.4f} (whole ONNX file: "
        f"{ours / ct_file:.4f}); dense fp16 weight {w.nbytes / MIB:.1f} MiB"
    )


if __name__ == "__main__":
    main()
