"""The per-weight report every front end returns: what was compressed (bytes, relative MSE) and what was skipped
(why), with one plain-text table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CompressionReport", "WeightResult", "format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Plain-text table with aligned columns (``right[i]``: right-align column ``i``)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


@dataclass
class WeightResult:
    """One row of a :class:`CompressionReport`: ``op`` is the consumer (an ONNX op type, a Core AI op or a torch
    module class); ``compression`` the kind of a compressed weight (``palettized``, ``quantized``, ``sparse``)."""

    name: str
    op: str
    shape: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    rel_mse: float | None = None
    skipped: str | None = None
    compression: str | None = None
    note: str | None = None  # how a compressed weight was written, when the user should know (a fallback)


@dataclass
class CompressionReport:
    """What a pass or palettizer did to each weight: compressed (bytes, relative MSE) or skipped (why)."""

    rows: list[WeightResult] = field(default_factory=list)

    @property
    def compressed(self) -> list[WeightResult]:
        return [r for r in self.rows if r.skipped is None]

    @property
    def skipped(self) -> list[WeightResult]:
        return [r for r in self.rows if r.skipped is not None]

    def table(self) -> str:
        rows = [
            [
                r.name,
                r.op,
                "x".join(map(str, r.shape)),
                str(r.bytes_before),
                str(r.bytes_after),
                "" if r.rel_mse is None else f"{r.rel_mse:.3e}",
                r.skipped or ("compressed" if r.note is None else f"compressed; {r.note}"),
            ]
            for r in self.rows
        ]
        before = sum(r.bytes_before for r in self.rows)
        after = sum(r.bytes_after for r in self.rows)
        body = format_table(
            ["weight", "op", "shape", "bytes before", "bytes after", "rel-MSE", "status"],
            rows,
            [False, False, False, True, True, True, False],
        )
        ratio = f"{before / after:.2f}x smaller" if after else "n/a"
        return (
            f"{body}\n{len(self.compressed)} compressed, {len(self.skipped)} skipped; "
            f"weights {before} -> {after} bytes ({ratio})"
        )

    def to_html(self, path: str | os.PathLike, title: str = "lowbit compression report") -> Path:
        """Write this report as one self-contained HTML page (totals, a per-weight chart of bits per weight and
        relative error, the table); returns its path. See :mod:`lowbit.report_page`."""
        from lowbit.report_page import rows_of_report, write_html

        return write_html(rows_of_report(self), path, title)
