"""The per-weight report every front end returns: what was compressed (bytes, relative MSE) and what was skipped
(why), with one plain-text table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
    """One row of a :class:`CompressionReport`: ``op`` is the consumer (an ONNX op type or a torch module class)."""

    name: str
    op: str
    shape: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    rel_mse: float | None = None
    skipped: str | None = None


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
                r.skipped or "compressed",
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
