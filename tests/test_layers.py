"""The tree's layering: the kernels and the weight layer import neither onnx nor torch, the graph path never
imports torch, and the torch front end imports the graph path only when exporting."""

import subprocess
import sys

import pytest

FORBIDDEN_BELOW = ("onnx", "onnx_ir", "torch", "lowbit.onnx", "lowbit.torch")


def _loaded_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def _hits(modules: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in roots))


def test_kernels_and_weight_layer_import_neither_onnx_nor_torch():
    loaded = _loaded_after(
        "import lowbit, lowbit.kernels.palettize, lowbit.kernels.quantize, lowbit.kernels.prune, lowbit.weights, "
        "lowbit.report, lowbit.config"
    )
    assert "lowbit.weights" in loaded
    assert _hits(loaded, FORBIDDEN_BELOW) == []


def test_graph_path_never_imports_torch():
    loaded = _loaded_after(
        "import lowbit, lowbit.cli\nlowbit.palettize_weights, lowbit.quantize_weights, lowbit.sparsify_weights, "
        "lowbit.decompress_weights"
    )
    assert "lowbit.onnx.palettize" in loaded
    assert _hits(loaded, ("torch",)) == []


def test_torch_front_end_imports_the_graph_path_only_to_export():
    pytest.importorskip("torch")
    loaded = _loaded_after("import lowbit.torch, lowbit.torch.palettization")
    assert "lowbit.torch.palettization.sensitive" in loaded
    assert _hits(loaded, ("lowbit.onnx", "onnx_ir")) == []
