"""The compression report as one self-contained HTML page (inline SVG and CSS: nothing is fetched when it is
viewed), and the same charts as PNG files (matplotlib, the optional extra ``lowbit[report]``).

The page shows the totals (size before / after, bits per weight, weights compressed and skipped, and why), a chart
along the model's order of each weight's bits per weight and relative error (log scale), coloured by compression
kind with the weight's name, op and shape on hover, the table of the same numbers, and on request histograms of
weights' values with their LUT's centroids marked. Imports neither onnx nor torch.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.report import CompressionReport

__all__ = ["Histogram", "PageRow", "kind_of", "rows_of_report", "write_html", "write_pngs"]

COLOURS = {"palettized": "#1f77b4", "quantized": "#ff7f0e", "sparse": "#2ca02c", "dense": "#7f7f7f"}
_WIDTH, _LEFT, _PANEL = 960, 64, 170


@dataclass(frozen=True)
class PageRow:
    """One weight on the page. ``kind``: palettized, quantized, sparse or dense; ``compression``: its encoding as
    ``inspect`` describes it; ``rel_mse``: None when unknown (no reference); ``skipped``: why it was left alone."""

    name: str
    op: str
    shape: tuple[int, ...]
    kind: str
    compression: str
    numel: int
    bytes_before: int
    bytes_after: int
    rel_mse: float | None = None
    skipped: str | None = None
    output_error: float | None = None  # relative squared error of the layer's output on calibration data

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_after / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class Histogram:
    """A weight's values (a sample when large) and its LUT's centroids (empty when it has none to show)."""

    name: str
    values: np.ndarray
    centroids: np.ndarray


def kind_of(compression: str | None) -> str:
    """The kind of an encoding description (``inspect``'s or a report's): palettized, quantized, sparse or dense."""
    if not compression:
        return "dense"
    text = compression.lower()
    if text.startswith("sparse"):
        return "sparse"
    return "palettized" if text.startswith(("palettized", "lut")) else "quantized"


def rows_of_report(report: CompressionReport) -> list[PageRow]:
    """The page's rows of a compression pass's (or a torch palettizer's) report."""
    rows = []
    for r in report.rows:
        numel = math.prod(r.shape)
        kind = "dense" if r.skipped is not None else kind_of(r.compression or "quantized")
        rows.append(
            PageRow(
                r.name,
                r.op,
                r.shape,
                kind,
                r.compression or kind,
                numel,
                r.bytes_before,
                r.bytes_after,
                r.rel_mse,
                r.skipped,
            )
        )
    return rows


def _fmt_bits(row: PageRow) -> str:
    return f"{row.bits_per_weight:.2f}"


def _fmt_error(row: PageRow) -> str:
    return "" if row.rel_mse is None else f"{row.rel_mse:.3e}"


def _fmt_output(row: PageRow) -> str:
    return "" if row.output_error is None else f"{row.output_error:.3e}"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _tip(row: PageRow) -> str:
    shape = "x".join(map(str, row.shape))
    status = row.skipped or row.compression
    error = f", rel-MSE {_fmt_error(row)}" if row.rel_mse is not None else ""
    output = f", output error {_fmt_output(row)}" if row.output_error is not None else ""
    return html.escape(f"{row.name} | {row.op} | {shape} | {status} | {_fmt_bits(row)} bits/weight{error}{output}")


def _bits_panel(rows: Sequence[PageRow], top: float) -> str:
    step = (_WIDTH - _LEFT - 8) / max(len(rows), 1)
    high = max(8.0, max((r.bits_per_weight for r in rows), default=8.0))
    parts = [_axis(top, "bits / weight", [(0.0, "0"), (high / 2, f"{high / 2:g}"), (high, f"{high:g}")], high, False)]
    for i, r in enumerate(rows):
        h = _PANEL * r.bits_per_weight / high
        x = _LEFT + i * step
        parts.append(
            f'<rect x="{x:.2f}" y="{top + _PANEL - h:.2f}" width="{max(step * 0.85, 0.6):.2f}" height="{h:.2f}" '
            f'fill="{COLOURS[r.kind]}"><title>{_tip(r)}</title></rect>'
        )
    return "".join(parts)


def _error_panel(rows: Sequence[PageRow], top: float) -> str:
    """Weight error (dots) and, where measured, the layer's output error on data (rings), on one log axis."""
    known = [e for r in rows for e in (r.rel_mse, r.output_error) if e is not None and e > 0]
    if not known:
        return (
            f'<text x="{_LEFT}" y="{top + _PANEL / 2}" class="note">relative error unknown: give --reference '
            "(the dense model) or compress with lowbit to see it</text>"
        )
    low, high = math.floor(math.log10(min(known))), math.ceil(math.log10(max(known)))
    high = max(high, low + 1)
    ticks = [(float(e), f"1e{e}") for e in range(low, high + 1)]
    parts = [_axis(top, "rel-MSE (log)", ticks, (low, high), True)]
    step = (_WIDTH - _LEFT - 8) / max(len(rows), 1)
    for i, r in enumerate(rows):
        for error, style in ((r.rel_mse, f'fill="{COLOURS[r.kind]}"'), (r.output_error, _RING.format(COLOURS[r.kind]))):
            if error is None or error <= 0:
                continue
            y = top + _PANEL * (high - math.log10(error)) / (high - low)
            parts.append(
                f'<circle cx="{_LEFT + (i + 0.45) * step:.2f}" cy="{y:.2f}" r="3" {style}><title>{_tip(r)}</title>'
                "</circle>"
            )
    return "".join(parts)


_RING = 'fill="none" stroke="{}" stroke-width="1.5"'  # the output error's marker


def _axis(top: float, label: str, ticks, scale, log: bool) -> str:
    parts = [f'<text x="4" y="{top - 6}" class="label">{html.escape(label)}</text>']
    for value, text in ticks:
        if log:
            low, high = scale
            y = top + _PANEL * (high - value) / (high - low)
        else:
            y = top + _PANEL * (1 - value / scale)
        parts.append(f'<line x1="{_LEFT}" x2="{_WIDTH - 8}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" class="tick">{text}</text>')
    return "".join(parts)


def _chart(rows: Sequence[PageRow]) -> str:
    height = 2 * _PANEL + 70
    return (
        f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" role="img" aria-label="bits per weight and relative error per weight">'
        f"{_bits_panel(rows, 20)}{_error_panel(rows, _PANEL + 56)}</svg>"
    )


def _histogram_svg(h: Histogram) -> str:
    values = h.values.astype(np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    width, height, left = _WIDTH, 200, _LEFT
    if not values.size:
        return ""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    counts, edges = np.histogram(values, bins=120, range=(low, high))
    peak = max(int(counts.max()), 1)
    bar = (width - left - 8) / len(counts)
    parts = [
        f'<h3>{html.escape(h.name)}</h3><svg class="histogram" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height + 30}" viewBox="0 0 {width} {height + 30}">'
    ]
    for i, c in enumerate(counts):
        y = height * (1 - c / peak)
        parts.append(
            f'<rect x="{left + i * bar:.2f}" y="{y:.2f}" width="{bar * 0.9:.2f}" height="{height - y:.2f}" '
            f'fill="#9ecae1"><title>[{edges[i]:.4g}, {edges[i + 1]:.4g}): {int(c)}</title></rect>'
        )
    for c in h.centroids[:256]:
        x = left + (float(c) - low) / (high - low) * (width - left - 8)
        parts.append(
            f'<line x1="{x:.2f}" x2="{x:.2f}" y1="0" y2="{height}" class="centroid">'
            f"<title>centroid {float(c):.5g}</title></line>"
        )
    parts.append(f'<text x="{left}" y="{height + 20}" class="tick-left">{low:.4g}</text>')
    parts.append(f'<text x="{width - 8}" y="{height + 20}" class="tick">{high:.4g}</text></svg>')
    note = f"{len(h.centroids)} centroids marked" if len(h.centroids) else "no LUT to mark (not palettized, or >256)"
    return "".join(parts) + f'<p class="note">{values.size} values; {note}</p>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1000px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}h3{font-size:14px;margin:18px 0 4px}
.totals{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}.totals div{background:#f4f6f8;border-radius:6px;
padding:8px 12px}.totals b{display:block;font-size:18px}
.legend span{display:inline-block;margin-right:14px;font-size:13px}.legend i{display:inline-block;width:12px;
height:12px;margin-right:4px;vertical-align:-1px}
svg text{font-size:11px;fill:#444}.tick{text-anchor:end}.tick-left{text-anchor:start}.label{font-weight:600}
.grid{stroke:#ddd;stroke-width:1}.centroid{stroke:#d62728;stroke-width:1.2}.note{fill:#777;color:#777;font-size:13px}
table{border-collapse:collapse;font-size:12px;width:100%}th,td{padding:3px 6px;border-bottom:1px solid #eee;
text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f6f8;position:sticky;top:0}
@media print{body{margin:0}th{position:static}}
"""


def render(rows: Sequence[PageRow], title: str, histograms: Sequence[Histogram] = ()) -> str:
    """The page's HTML."""
    before = sum(r.bytes_before for r in rows)
    after = sum(r.bytes_after for r in rows)
    numel = sum(r.numel for r in rows)
    compressed = [r for r in rows if r.kind != "dense"]
    reasons = Counter(r.skipped for r in rows if r.skipped)
    totals = [
        ("weights before", _human(before)),
        ("weights after", _human(after)),
        ("smaller by", f"{before / after:.2f}x" if after else "n/a"),
        ("bits / weight", f"{8.0 * after / numel:.2f}" if numel else "n/a"),
        ("compressed", f"{len(compressed)} of {len(rows)}"),
    ]
    cards = "".join(
        f'<div id="total-{i}">{html.escape(k)}<b>{html.escape(v)}</b></div>' for i, (k, v) in enumerate(totals)
    )
    skipped = "".join(f"<li>{n} x {html.escape(str(reason))}</li>" for reason, n in reasons.most_common())
    legend = "".join(f'<span><i style="background:{c}"></i>{k}</span>' for k, c in COLOURS.items())
    legend += "<span>dots: weight rel-MSE; rings: the layer's output error on calibration data</span>"
    body_rows = "".join(
        "<tr>"
        f"<td>{i}</td><td>{html.escape(r.name)}</td><td>{html.escape(r.op)}</td>"
        f"<td>{'x'.join(map(str, r.shape))}</td><td>{html.escape(r.skipped or r.compression)}</td>"
        f'<td class="n">{_fmt_bits(r)}</td><td class="n">{r.bytes_before}</td><td class="n">{r.bytes_after}</td>'
        f'<td class="n">{_fmt_error(r)}</td><td class="n">{_fmt_output(r)}</td></tr>'
        for i, r in enumerate(rows)
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<div class="totals">{cards}</div>'
        + (f"<h2>Left alone</h2><ul>{skipped}</ul>" if skipped else "")
        + f'<h2>Per weight, in the model\'s order</h2><div class="legend">{legend}</div>{_chart(rows)}'
        + ("<h2>Values and centroids</h2>" + "".join(_histogram_svg(h) for h in histograms) if histograms else "")
        + '<h2>Weights</h2><table id="weights"><thead><tr><th>#</th><th>weight</th><th>op</th><th>shape</th>'
        "<th>compression</th><th>bits/w</th><th>bytes before</th><th>bytes after</th><th>rel-MSE</th>"
        "<th>output error</th></tr></thead>"
        f"<tbody>{body_rows}</tbody></table></body></html>"
    )


def write_html(
    rows: Sequence[PageRow], path: str | os.PathLike, title: str, histograms: Sequence[Histogram] = ()
) -> Path:
    """Write the page to ``path`` atomically (a temporary file beside it, renamed); returns the path."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render(rows, title, histograms))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file (mkstemp makes it private)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def write_pngs(rows: Sequence[PageRow], folder: str | os.PathLike, histograms: Sequence[Histogram] = ()) -> list[Path]:
    """The page's charts as PNG files in ``folder`` (``weights.png``, ``histogram-<i>.png``). Needs matplotlib
    (``pip install "lowbit[report]"``): ``ImportError`` naming the extra without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError('PNG charts need matplotlib: pip install "lowbit[report]"') from err
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    colours = [COLOURS[r.kind] for r in rows]
    fig, (bits, errors) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    x = np.arange(len(rows))
    bits.bar(x, [r.bits_per_weight for r in rows], color=colours, width=0.85)
    bits.set_ylabel("bits / weight")
    known = [(i, r.rel_mse) for i, r in enumerate(rows) if r.rel_mse]
    outputs = [(i, r.output_error) for i, r in enumerate(rows) if r.output_error]
    if known:
        errors.scatter([i for i, _ in known], [e for _, e in known], c=[colours[i] for i, _ in known], s=12)
    if outputs:  # the layer's output error on calibration data: rings, as on the page
        errors.scatter(
            [i for i, _ in outputs],
            [e for _, e in outputs],
            facecolors="none",
            edgecolors=[colours[i] for i, _ in outputs],
            s=16,
        )
    if known or outputs:
        errors.set_yscale("log")
    errors.set_ylabel("rel-MSE (dots), output error (rings)")
    errors.set_xlabel("weight (model order)")
    fig.tight_layout()
    written = [out / "weights.png"]
    fig.savefig(written[0], dpi=120)
    plt.close(fig)
    for i, h in enumerate(histograms):
        fig, ax = plt.subplots(figsize=(10, 3))
        ax.hist(h.values.reshape(-1).astype(np.float64), bins=120, color="#9ecae1")
        for c in h.centroids[:256]:
            ax.axvline(float(c), color="#d62728", linewidth=0.8)
        ax.set_title(h.name, fontsize=9)
        fig.tight_layout()
        written.append(out / f"histogram-{i}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
