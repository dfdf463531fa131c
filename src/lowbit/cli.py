"""The ``lowbit`` command line: ``lowbit palettize|quantize|sparsify|inspect|decompress ...``."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from lowbit.errors import LowbitError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """One line and exit 2 on a usage error; options are never abbreviated (``--target`` is not
    ``--target-sparsity``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _is_coreai(path: Path) -> bool:
    """A Core AI asset: a ``.aimodel`` path, or a folder holding ``main.mlirb``."""
    return path.suffix == ".aimodel" or (path.is_dir() and (path / "main.mlirb").is_file())


def _door(args: argparse.Namespace, path: Path):
    """The module whose ``load`` / ``*_weights`` handle ``path``: lowbit.coreai for a Core AI asset, else ONNX's.
    A Core AI output must not lie inside its input asset."""
    if not _is_coreai(path):
        import lowbit

        return lowbit
    output = getattr(args, "output", None)
    if output is not None and output.resolve().is_relative_to(path.resolve()) and output.resolve() != path.resolve():
        raise ValueError(f"the output {str(output)!r} lies inside the input asset {str(path)!r}")
    if getattr(args, "target", "portable") != "portable":
        raise ValueError("--target chooses ONNX Runtime's kernels: it applies to .onnx files only")
    try:
        import lowbit.coreai
    except ImportError as err:
        raise ValueError(f"{path}: Core AI assets need lowbit[coreai] (coreai-core, Python >= 3.11): {err}") from err
    return lowbit.coreai


def _inspect(args: argparse.Namespace) -> int:
    from lowbit.onnx.report import weights_table

    door = _door(args, args.model)
    program = door.load(args.model)
    weights = program.weights()
    if not weights:
        print(f"{args.model}: no weights found (no constant feeds a conv, matmul, embedding or recurrent op)")
        return 0
    weight_bytes = sum(w.nbytes for w in weights)
    coreai = _is_coreai(args.model)
    total = _disk_bytes(args.model / "main.mlirb") if coreai else program.tensor_nbytes()
    print(weights_table(weights, max(total - weight_bytes, 0)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from lowbit.report_page import write_html, write_pngs

    door = _door(args, args.model)
    program = door.load(args.model)
    rows, histograms = _page_rows(door, program, args)
    out = write_html(rows, args.output, f"{args.model.name}: lowbit compression report", histograms)
    print(f"wrote {out} ({len(rows)} weights)")
    for png in write_pngs(rows, args.png, histograms) if args.png is not None else []:
        print(f"wrote {png}")
    return 0


def _page_rows(door, program, args: argparse.Namespace):
    """The report page's rows of ``program`` (errors against ``--reference``) and the ``--weight`` histograms."""
    import numpy as np

    from lowbit.report_page import Histogram, PageRow, kind_of

    weights = program.weights()
    if not weights:
        raise ValueError(f"{args.model}: no weights found: nothing to report")
    decoded = program.weight_arrays() if args.reference is not None or args.weight or args.calibration else {}
    reference = _door(args, args.reference).load(args.reference).weight_arrays() if args.reference else {}
    rows = []
    for w in weights:
        ref, dec = reference.get(w.name), decoded.get(w.name)
        error = None
        if ref is not None and dec is not None and ref.shape == dec.shape:
            diff = dec.astype(np.float64) - ref.astype(np.float64)
            energy = float(np.vdot(ref.astype(np.float64), ref.astype(np.float64)))
            error = float(np.vdot(diff, diff)) / energy if energy else 0.0
        dense_bytes = int(np.ceil(w.numel * _itemsize(w.dtype)))
        rows.append(
            PageRow(
                w.name,
                w.op,
                tuple(w.shape),
                kind_of(w.compression),
                w.compression or "dense",
                w.numel,
                dense_bytes,
                w.nbytes,
                error,
            )
        )
    if args.calibration is not None:
        rows = _with_output_errors(rows, decoded, args)
    histograms = []
    for name in args.weight:
        if name not in decoded:
            raise ValueError(f"--weight {name!r}: no such weight (see lowbit inspect)")
        values = reference.get(name, decoded[name])
        kind = next(r.kind for r in rows if r.name == name)
        centroids = np.unique(decoded[name]) if kind == "palettized" else np.empty(0)
        histograms.append(Histogram(name, values, centroids if len(centroids) <= 256 else np.empty(0)))
    return rows, histograms


def _with_output_errors(rows: list, decoded: dict, args: argparse.Namespace) -> list:
    """``rows`` with each weight's layer output error on ``--calibration`` (an .npz of the reference model's
    inputs, one array per input name: one feed)."""
    import dataclasses

    from lowbit.onnx.layer_error import layer_output_errors

    if args.reference is None or _is_coreai(args.reference):
        raise ValueError("--calibration needs --reference DENSE.onnx (the layer output error is measured on ONNX)")
    errors = layer_output_errors(
        decoded, _door(args, args.reference).load(args.reference), [_npz_feed(args.calibration)]
    )
    return [dataclasses.replace(r, output_error=errors.get(r.name)) for r in rows]


def _itemsize(dtype) -> float:
    """Bytes per element of an ONNX element type or a numpy dtype (both have ``itemsize``; ONNX's 4-bit: 0.5);
    0 for an element type lowbit does not know (the row then shows no dense size)."""
    return 0.0 if dtype is None else float(dtype.itemsize)


def _disk_bytes(path: Path) -> int:
    """Bytes of a file, or of every file in a folder."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _decompress(args: argparse.Namespace) -> int:
    door = _door(args, args.input)
    program = door.load(args.input)
    dense = door.decompress_weights(program, in_place=True)
    out = dense.save(args.output)
    print(f"wrote {out} ({_disk_bytes(out)} bytes)")
    return 0


def _palettize(args: argparse.Namespace) -> int:
    if args.group_size is not None and args.granularity.replace("_", "-") != "per-grouped-channel":
        raise ValueError(f"--group-size applies to --granularity per-grouped-channel, not {args.granularity}")
    door = _door(args, args.input)
    program = door.load(args.input)
    before = _input_bytes(program, args.input)
    result = door.palettize_weights(
        program,
        lut_dtype=args.lut_dtype,
        n_bits=args.n_bits,
        granularity=args.granularity,
        group_size=32 if args.group_size is None else args.group_size,
        cluster_dim=args.cluster_dim,
        enable_per_channel_scale=args.per_channel_scale,
        weight_num_threshold=args.weight_num_threshold,
        num_kmeans_workers=args.workers,
        enable_fast_kmeans_mode=not args.exact,
        mode=args.mode,
        in_place=True,
        configs=_weight_configs(args),
        **_target(args),
        **_calibration(args),
        **_outliers(args),
        bits_per_weight=args.bits_per_weight,
    )
    return _save_and_report(result, args, before)


def _outliers(args: argparse.Namespace) -> dict:
    """``outlier_fraction=`` from ``--outlier-fraction``."""
    return {"outlier_fraction": args.outlier_fraction} if args.outlier_fraction else {}


def _calibration(args: argparse.Namespace) -> dict:
    """``calibration_data=`` from ``--calibration FILE.npz`` (one feed: an array per model input)."""
    return {} if args.calibration is None else {"calibration_data": [_npz_feed(args.calibration)]}


def _npz_feed(path: Path) -> dict:
    """The one feed of an .npz of named arrays (one per model input)."""
    import numpy as np

    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: --calibration wants an .npz of named arrays (one per model input), not an .npy")
    with data:
        return {k: data[k] for k in data.files}


def _target(args: argparse.Namespace) -> dict:
    """``target=`` for the ONNX door (Core AI has one target)."""
    return {} if _is_coreai(args.input) else {"target": args.target}


def _input_bytes(program, path: Path) -> int:
    """The input's bytes: an ONNX model's data files included, a Core AI asset's files."""
    return _disk_bytes(path) if _is_coreai(path) else program.stored_nbytes()


def _quantize(args: argparse.Namespace) -> int:
    door = _door(args, args.input)
    program = door.load(args.input)
    before = _input_bytes(program, args.input)
    result = door.quantize_weights(
        program,
        dtype=args.dtype,
        qscheme=args.qscheme,
        granularity=args.granularity,
        block_size=args.block_size,
        weight_num_threshold=args.weight_num_threshold,
        scale_dtype=args.scale_dtype,
        scale_search=args.scale_search,
        in_place=True,
        configs=_weight_configs(args),
        **_target(args),
        **_calibration(args),
    )
    return _save_and_report(result, args, before)


def _sparsify(args: argparse.Namespace) -> int:
    if (args.target_sparsity is None) == (args.n_m is None):
        raise ValueError("give one of --target-sparsity (unstructured or blocks) and --n-m (n of every m pruned)")
    n_m = None
    if args.n_m is not None:
        parts = args.n_m.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--n-m must look like 2:4, got {args.n_m!r}")
        n_m = (int(parts[0]), int(parts[1]))
    door = _door(args, args.input)
    program = door.load(args.input)
    before = _input_bytes(program, args.input)
    result = door.sparsify_weights(
        program,
        target_sparsity=0.0 if args.target_sparsity is None else args.target_sparsity,
        block_size=args.block_size,
        n_m_ratio=n_m,
        quantize_dtype=args.quantize_dtype,
        palettize_nbits=args.palettize_nbits,
        weight_num_threshold=args.weight_num_threshold,
        in_place=True,
        configs=_weight_configs(args),
        **_calibration(args),
    )
    return _save_and_report(result, args, before)


def _weight_configs(args: argparse.Namespace):
    """The per-weight configs of ``--config FILE.yaml`` and ``--skip REGEX`` (skips first: they win)."""
    from lowbit.weight_configs import WeightConfigs

    configs = WeightConfigs.from_yaml(args.config) if args.config is not None else WeightConfigs()
    skips: dict = dict.fromkeys(args.skip)
    return WeightConfigs(configs.global_config, configs.op_type_configs, {**skips, **configs.op_name_configs})


def _save_and_report(result, args: argparse.Namespace, before: int) -> int:
    """Save ``result``; print its report and the size change (``before``: the input's bytes, data files included)."""
    out = result.save(args.output)
    print(result.report.table())
    data_path = getattr(result, "data_path", None)
    after = _disk_bytes(out) + (data_path.stat().st_size if data_path else 0)
    print(f"wrote {out}: {before} -> {after} bytes, data files included ({before / after:.2f}x smaller)")
    return 0


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="REGEX",
        help="leave weights whose name matches (exactly, or a regex matching the whole name) alone; repeatable",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE.yaml",
        help="per-weight parameters: global_config / op_type_configs / op_name_configs (see README)",
    )


def _add_calibration(p: argparse.ArgumentParser, use: str) -> None:
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="FILE.npz",
        help=f"the model's inputs (one array per input name): {use}",
    )


def _add_target(p: argparse.ArgumentParser) -> None:
    from lowbit.onnx.fused import TARGETS

    p.add_argument(
        "--target",
        default=TARGETS[0],
        help=f"{', '.join(TARGETS)} (default {TARGETS[0]}): onnxruntime keeps the weights that fit one of ONNX "
        "Runtime's fused kernels compressed in its memory (the file then runs in ONNX Runtime only); "
        "onnxruntime-int8 also quantizes MatMulNBits' activations to int8 (faster, less exact)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description="Make neural-network weights small.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("palettize", help="k-means palettization: a LUT of 2^n values plus n-bit indices per weight")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--n-bits", type=int, default=4, help="bits per index: 1, 2, 3, 4, 6 or 8 (default 4)")
    p.add_argument(
        "--granularity",
        default="per-tensor",
        help="per-tensor (default), per-channel or per-grouped-channel",
    )
    p.add_argument("--group-size", type=int, default=None, help="channels per LUT for per-grouped-channel (default 32)")
    p.add_argument("--cluster-dim", type=int, default=1, help="vector palettization: values per LUT entry")
    p.add_argument("--lut-dtype", default=None, help="quantize LUT entries: int8, uint8, fp8_e4m3fn, fp8_e5m2")
    p.add_argument("--per-channel-scale", action="store_true", help="scale each output channel to max-abs 1 first")
    p.add_argument("--mode", default="kmeans", help="kmeans (default), uniform or unique")
    p.add_argument("--weight-num-threshold", type=int, default=1024, help="leave weights this small alone")
    p.add_argument("--workers", type=int, default=4, help="k-means worker threads (default 4)")
    p.add_argument("--exact", action="store_true", help="cluster fp32 weights' raw values, not fp16-rounded ones")
    p.add_argument(
        "--outlier-fraction",
        type=float,
        default=0.0,
        help="keep this fraction (up to 0.1) of each weight exact beside its LUTs, the worst-served ones",
    )
    p.add_argument(
        "--bits-per-weight",
        type=float,
        default=None,
        help="mixed bits: choose 2, 3, 4, 6 or 8 bits per weight (not --n-bits) to fit this budget, tables included",
    )
    _add_calibration(p, "activation-aware k-means with error feedback")
    _add_selection(p)
    _add_target(p)
    p.set_defaults(run=_palettize)
    p = sub.add_parser("quantize", help="linear quantization: int8/int4 (sym/asym), fp8, MXFP4")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--dtype", required=True, help="int8, uint8, int4, uint4, fp8_e4m3fn, fp8_e5m2, fp4_e2m1fn")
    p.add_argument("--qscheme", default="symmetric", help="symmetric (default) or asymmetric")
    p.add_argument("--granularity", default="per-channel", help="per-tensor, per-channel (default) or per-block")
    p.add_argument("--block-size", type=int, default=32, help="input channels per block for per-block")
    p.add_argument("--scale-dtype", default=None, help="fp8_e8m0fnu: power-of-two (E8M0) scales, fp8 dtypes only")
    p.add_argument(
        "--scale-search",
        action="store_true",
        help="integers: per block, the clipping range with the least squared error (data-free)",
    )
    _add_calibration(p, "integer codes with error feedback, GPTQ")
    p.add_argument("--weight-num-threshold", type=int, default=1024, help="leave weights this small alone")
    _add_selection(p)
    _add_target(p)
    p.set_defaults(run=_quantize)
    p = sub.add_parser("sparsify", help="magnitude pruning stored as a 1-bit mask plus the non-zeros")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--target-sparsity", type=float, default=None, help="fraction of zeros, in [0, 1)")
    p.add_argument("--block-size", type=int, default=1, help="prune blocks of this many output channels")
    p.add_argument("--n-m", default=None, help="n:m structured sparsity along input channels, e.g. 2:4")
    p.add_argument("--quantize-dtype", default=None, help="int8: also quantize the non-zeros (per channel)")
    p.add_argument("--palettize-nbits", type=int, default=None, help="also palettize the non-zeros (1..8 bits)")
    _add_calibration(p, "pruning for the layer output (ADMM, Wanda scores)")
    p.add_argument("--weight-num-threshold", type=int, default=1024, help="leave weights this small alone")
    _add_selection(p)
    p.set_defaults(run=_sparsify)
    p = sub.add_parser("inspect", help="print each weight: op, shape, dtype, compression, bits per weight, bytes")
    p.add_argument("model", type=Path)
    p.set_defaults(run=_inspect)
    p = sub.add_parser("report", help="write an HTML page (and PNGs) of where the bytes and the error went")
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="REPORT.html")
    p.add_argument("--reference", type=Path, default=None, help="the dense model: per-weight relative error")
    p.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="NAME",
        help="histogram of this weight's values with its LUT's centroids; repeatable",
    )
    p.add_argument(
        "--png", type=Path, default=None, metavar="DIR", help="also write the charts as PNG (lowbit[report])"
    )
    _add_calibration(p, "each layer's output error on them (with --reference)")
    p.set_defaults(run=_report)
    p = sub.add_parser("decompress", help="turn every compressed weight back into a dense initializer")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.set_defaults(run=_decompress)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for a user error, printed as one line on stderr)."""
    args = _parser().parse_args(argv)
    warnings.showwarning = _show_warning
    signal.signal(signal.SIGTERM, _terminate)  # unwind (temporary files removed) instead of dying on the spot
    try:
        return int(args.run(args))
    except (LowbitError, ValueError, TypeError, OSError, ImportError) as err:
        print(f"lowbit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
