"""The HTML report (issue 27): one self-contained page whose numbers are the report's and inspect's, rendered by
headless Chromium with no request and no console error, small and fast for a 7B-shaped model; PNG charts."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import lowbit
from lowbit.cli import main
from lowbit.report import CompressionReport, WeightResult
from lowbit.report_page import PageRow, kind_of, rows_of_report, write_html

CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (.ci/run installs it)")


class _Table(HTMLParser):
    """The cells of the page's weights table, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_body = self._in_cell = False

    def handle_starttag(self, tag, attrs):
        if tag == "tbody":
            self._in_body = True
        elif self._in_body and tag == "tr":
            self.rows.append([])
        elif self._in_body and tag == "td":
            self._in_cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.rows[-1][-1] += data


def _table(path: Path) -> list[list[str]]:
    parser = _Table()
    parser.feed(path.read_text())
    return parser.rows


def _render(page: Path, shot: Path) -> tuple[float, str]:
    """(seconds, Chromium's log) for a headless screenshot of ``page``."""
    start = time.perf_counter()
    done = subprocess.run(
        [
            CHROMIUM,
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            "--window-size=1040,1600",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - start, done.stdout + done.stderr


def _self_contained(text: str) -> None:
    """No resource to fetch: no src / href / url(...) / @import, no script."""
    assert not re.search(r"\b(src|href)\s*=|url\(|@import|<script|<link", text, re.IGNORECASE)


@pytest.fixture(scope="module")
def minilm_4bit(minilm_onnx, tmp_path_factory) -> tuple[Path, lowbit.Program]:
    out = tmp_path_factory.mktemp("report") / "minilm_4bit.onnx"
    small = lowbit.palettize_weights(
        lowbit.load(minilm_onnx), n_bits=4, granularity="per_grouped_channel", group_size=16
    )
    small.save(out)
    return out, small


def test_the_page_holds_the_reports_numbers(minilm_4bit, tmp_path):
    _, small = minilm_4bit
    page = small.report.to_html(tmp_path / "report.html")
    rows = _table(page)
    assert len(rows) == len(small.report.rows)
    for cells, r in zip(rows, small.report.rows, strict=True):
        assert cells[1] == r.name and cells[2] == r.op and cells[3] == "x".join(map(str, r.shape))
        assert (int(cells[6]), int(cells[7])) == (r.bytes_before, r.bytes_after)
        assert cells[8] == ("" if r.rel_mse is None else f"{r.rel_mse:.3e}")
    _self_contained(page.read_text())


def test_lowbit_report_matches_inspect_and_the_reference_error(minilm_4bit, minilm_onnx, tmp_path, capsys):
    path, small = minilm_4bit
    page = tmp_path / "minilm.html"
    name = small.report.rows[0].name
    assert (
        main(
            [
                "report",
                str(path),
                "-o",
                str(page),
                "--reference",
                str(minilm_onnx),
                "--weight",
                name,
                "--png",
                str(tmp_path / "png"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    main(["inspect", str(path)])
    inspected = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:-1]}
    errors = {r.name: r.rel_mse for r in small.report.rows}
    for cells in _table(page):
        inspect_cells = inspected[cells[1]]
        assert cells[5] == inspect_cells[-2] and cells[7] == inspect_cells[-1]  # bits/w and bytes, as inspect prints
        if cells[1] in errors and errors[cells[1]] is not None:  # the error against the reference is the pass's own
            assert float(cells[8]) == pytest.approx(errors[cells[1]], rel=2e-3)
    text = page.read_text()
    assert "centroid" in text and "16 centroids marked" not in text  # grouped LUTs: more than 16 distinct values
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["histogram-0.png", "weights.png"]
    _self_contained(text)


def test_bad_report_arguments_are_one_line(minilm_4bit, tmp_path, capsys):
    path, _ = minilm_4bit
    assert main(["report", str(path), "-o", str(tmp_path / "r.html"), "--weight", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--weight 'nope': no such weight" in err and err.count("\n") == 1
    assert not (tmp_path / "r.html").exists()


@needs_chromium
def test_chromium_renders_the_minilm_page_without_errors(minilm_4bit, tmp_path):
    _, small = minilm_4bit
    page = small.report.to_html(tmp_path / "minilm.html", title="all-MiniLM-L6-v2, 4-bit grouped(16)")
    _, log = _render(page, tmp_path / "shot.png")
    assert "CONSOLE" not in log and "Uncaught" not in log and "net::ERR" not in log, log[-2000:]
    from PIL import Image

    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("L"))
    assert shot.std() > 10 and (shot < 128).mean() > 0.01  # not blank: text and bars drawn


def _seven_b_rows() -> list[PageRow]:
    """A LLaMA-7B-shaped model's weights: 32 layers of 7 projections, the embedding and the head."""
    rows = [
        PageRow(
            "model.embed_tokens.weight",
            "Gather",
            (32000, 4096),
            "palettized",
            "palettized 4-bit",
            32000 * 4096,
            32000 * 4096 * 2,
            32000 * 4096 // 2 + 32000 * 16,
            3.1e-3,
        )
    ]
    shapes = {
        "q": (4096, 4096),
        "k": (4096, 4096),
        "v": (4096, 4096),
        "o": (4096, 4096),
        "gate": (11008, 4096),
        "up": (11008, 4096),
        "down": (4096, 11008),
    }
    rng = np.random.default_rng(0)
    for layer in range(32):
        for proj, shape in shapes.items():
            numel = shape[0] * shape[1]
            kind = ("palettized", "quantized", "sparse")[(layer + len(proj)) % 3]
            rows.append(
                PageRow(
                    f"model.layers.{layer}.{proj}_proj.weight",
                    "MatMul",
                    shape,
                    kind,
                    kind,
                    numel,
                    numel * 2,
                    numel // 2,
                    float(10 ** rng.uniform(-4, -2)),
                )
            )
    rows.append(
        PageRow(
            "lm_head.weight",
            "MatMul",
            (4096, 32000),
            "dense",
            "dense",
            32000 * 4096,
            32000 * 4096 * 2,
            32000 * 4096 * 2,
            None,
            "left out by the per-weight configs",
        )
    )
    return rows


@needs_chromium
def test_a_7b_shaped_page_is_small_and_renders_fast(tmp_path):
    rows = _seven_b_rows()
    page = write_html(rows, tmp_path / "7b.html", "LLaMA-7B-shaped")
    assert page.stat().st_size < 2 * 2**20
    _render(page, tmp_path / "warm.png")  # Chromium's own start-up caches
    seconds, _ = _render(page, tmp_path / "7b.png")
    assert seconds < 3.0, seconds
    assert len(_table(page)) == len(rows) == 226


def test_kinds_and_report_rows():
    assert [
        kind_of(t)
        for t in (
            None,
            "palettized 4-bit, 1 LUT(s)",
            "lut ui4",
            "int4 per-block(32)",
            "sparse 50% + int8",
            "blockwise si8",
            "mxfp4",
        )
    ] == ["dense", "palettized", "palettized", "quantized", "sparse", "quantized", "quantized"]
    report = CompressionReport(
        [
            WeightResult("a", "MatMul", (64, 64), 8192, 2100, 1e-3, None, "palettized"),
            WeightResult("b", "Conv", (8, 8), 256, 256, skipped="64 elements <= 1024"),
        ]
    )
    rows = rows_of_report(report)
    assert [(r.kind, r.skipped) for r in rows] == [("palettized", None), ("dense", "64 elements <= 1024")]
    assert rows[0].bits_per_weight == pytest.approx(8 * 2100 / 4096)


def test_layer_output_error_on_calibration_data_is_each_layers_own(tmp_path, capsys):
    """``--calibration``: each layer's output error on the reference activations, against numpy (issue 27)."""
    from conftest import make_model

    rng = np.random.default_rng(0)
    weights = {
        "a": rng.standard_normal((64, 48)).astype(np.float32),
        "b": rng.standard_normal((48, 32)).astype(np.float32),
    }
    model = make_model(weights, [("MatMul", "a", {})])
    graph = model.graph  # chain b after a: y = (x @ a) @ b, so b's input is a's (reference) output
    first = graph.node(0)
    import onnx_ir as ir

    b = graph.initializers["b"]
    second = ir.node("MatMul", [first.outputs[0], b], name="n1")
    graph.append(second)
    second.outputs[0].name = "y"
    second.outputs[0].dtype = ir.DataType.FLOAT
    graph.outputs[:] = [second.outputs[0]]
    dense_path, small_path = tmp_path / "dense.onnx", tmp_path / "small.onnx"
    lowbit.Program(model).save(dense_path)
    small = lowbit.quantize_weights(lowbit.load(dense_path), dtype="int4", granularity="per_block", block_size=16)
    small.save(small_path)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x0=x)
    page = tmp_path / "r.html"
    assert (
        main(
            [
                "report",
                str(small_path),
                "-o",
                str(page),
                "--reference",
                str(dense_path),
                "--calibration",
                str(tmp_path / "calib.npz"),
            ]
        )
        == 0
    )
    decoded = lowbit.load(small_path).weight_arrays()
    h = x @ weights["a"]
    expected = {
        "a": np.sum((x @ decoded["a"] - h) ** 2) / np.sum(h**2),
        "b": np.sum((h @ decoded["b"] - h @ weights["b"]) ** 2) / np.sum((h @ weights["b"]) ** 2),
    }
    got = {cells[1]: float(cells[9]) for cells in _table(page)}
    assert got == pytest.approx(expected, rel=1e-4)
    assert main(["report", str(small_path), "-o", str(page), "--calibration", str(tmp_path / "calib.npz")]) == 2
    assert "--calibration needs --reference" in capsys.readouterr().err
