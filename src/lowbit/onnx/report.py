"""Tables about a program's weights, for ``lowbit inspect`` and the passes' summaries."""

from __future__ import annotations

from collections.abc import Sequence

from lowbit.onnx.discovery import WeightRef
from lowbit.report import format_table

__all__ = ["weights_table"]


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def weights_table(weights: Sequence[WeightRef], other_bytes: int) -> str:
    """The per-weight table of ``lowbit inspect`` with totals; ``other_bytes`` is the rest of the tensor data."""
    rows = [
        [
            w.name,
            w.op,
            "x".join(str(d) for d in w.shape) or "scalar",
            w.dtype.name.lower(),
            w.compression or "dense",
            f"{w.bits_per_weight:.2f}",
            str(w.nbytes),
        ]
        for w in weights
    ]
    table = format_table(
        ["weight", "op", "shape", "dtype", "compression", "bits/w", "bytes"],
        rows,
        [False, False, False, False, False, True, True],
    )
    numel = sum(w.numel for w in weights)
    stored = sum(w.nbytes for w in weights)
    compressed = sum(1 for w in weights if w.compression)
    bits = 8.0 * stored / numel if numel else 0.0
    totals = (
        f"{len(weights)} weights ({compressed} compressed), {numel} parameters, {_human_bytes(stored)} "
        f"({bits:.2f} bits/weight); other tensors {_human_bytes(other_bytes)}"
    )
    return f"{table}\n{totals}"
