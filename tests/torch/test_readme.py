"""The README's PyTorch examples run as written."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("torch")


def _section_code(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_pytorch_section_examples_run_as_written(tmp_path):
    blocks = _section_code("PyTorch")
    assert blocks
    for code in blocks:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "compressed" in done.stdout
    assert (tmp_path / "model_4bit.onnx").stat().st_size > 0
