"""The ``lowbit`` command line: ``lowbit inspect MODEL``, ``lowbit decompress IN OUT``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from lowbit.errors import LowbitError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _inspect(args: argparse.Namespace) -> int:
    from lowbit.onnx.program import load
    from lowbit.onnx.report import weights_table

    program = load(args.model)
    weights = program.weights()
    if not weights:
        print(f"{args.model}: no weights found (no constant feeds Conv/ConvTranspose/Gemm/MatMul/Gather/LSTM/GRU/RNN)")
        return 0
    weight_bytes = sum(w.nbytes for w in weights)
    print(weights_table(weights, max(program.tensor_nbytes() - weight_bytes, 0)))
    return 0


def _decompress(args: argparse.Namespace) -> int:
    from lowbit.onnx.decompress import decompress_weights
    from lowbit.onnx.program import load

    program = load(args.input)
    dense = decompress_weights(program, in_place=True)
    out = dense.save(args.output)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description="Make neural-network weights small.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("inspect", help="print each weight: op, shape, dtype, compression, bits per weight, bytes")
    p.add_argument("model", type=Path)
    p.set_defaults(run=_inspect)
    p = sub.add_parser("decompress", help="turn every compressed weight back into a dense initializer")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.set_defaults(run=_decompress)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for a user error, printed as one line on stderr)."""
    args = _parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return int(args.run(args))
    except (LowbitError, ValueError, TypeError, OSError) as err:
        print(f"lowbit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
