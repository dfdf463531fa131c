"""Every encoding lowbit writes into a Core AI program, decoded by Core AI's runtime: the probe program's outputs
are its weights exactly, so the runtime's decode is compared bit for bit with lowbit's (the weight layer's
``decode()``, and the numpy evaluation of the decode chain that ``decompress_weights`` writes). Save -> load keeps
the decode; the verifier accepts every program."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("coreai.authoring", reason="needs lowbit[coreai] (coreai-core, Python >= 3.11)")
pytest.importorskip("coreai_torch", reason="needs coreai-torch (Python >= 3.11)")

from coreai_support import make_probe, probe_weights, run_asset

import lowbit.coreai as lc
from lowbit.config import PalettizeConfig, QuantizeConfig, SparsifyConfig
from lowbit.coreai.decode import evaluate
from lowbit.driver import ALGORITHMS

PALETTIZE = [
    *({"n_bits": n} for n in (1, 2, 3, 4, 6, 8)),
    {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16},
    {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 32},  # ragged last groups
    {"n_bits": 2, "granularity": "per_channel"},
    {"n_bits": 4, "cluster_dim": 2},
    {"n_bits": 4, "enable_per_channel_scale": True},
    {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 16, "lut_dtype": "int8"},
    {"n_bits": 4, "lut_dtype": "uint8"},
    {"n_bits": 6, "granularity": "per_grouped_channel", "group_size": 8, "lut_dtype": "fp8_e4m3fn"},
    {"n_bits": 4, "lut_dtype": "int8", "enable_per_channel_scale": True},
    {"n_bits": 4, "mode": "uniform"},
    {"n_bits": 4, "outlier_fraction": 0.01},
    {"n_bits": 4, "outlier_fraction": 0.0003},  # one outlier in the linear weight, none in the others
    {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 32, "outlier_fraction": 0.05},
    {"n_bits": 2, "enable_per_channel_scale": True, "lut_dtype": "int8", "outlier_fraction": 0.02},
]
QUANTIZE = [
    {"dtype": "int8"},
    {"dtype": "int8", "granularity": "per_tensor"},
    {"dtype": "uint8", "qscheme": "asymmetric"},
    {"dtype": "int4", "granularity": "per_block", "block_size": 32},
    {"dtype": "int4", "granularity": "per_block", "block_size": 24},  # ragged last block
    {"dtype": "uint4", "granularity": "per_block", "block_size": 16, "qscheme": "asymmetric"},
    {"dtype": "fp8_e4m3fn"},
    {"dtype": "fp8_e5m2"},
    {"dtype": "fp8_e4m3fn", "granularity": "per_block", "block_size": 32, "scale_dtype": "fp8_e8m0fnu"},
    {"dtype": "fp4_e2m1fn", "granularity": "per_block", "block_size": 32},  # MXFP4
]
SPARSIFY = [
    {"target_sparsity": 0.5},
    {"target_sparsity": 0.5, "block_size": 2},
    {"target_sparsity": None, "n_m_ratio": (2, 4)},
    {"target_sparsity": 0.5, "quantize_dtype": "int8"},
    {"target_sparsity": 0.75, "palettize_nbits": 4},
]
CASES = (
    [("palettize", c) for c in PALETTIZE] + [("quantize", c) for c in QUANTIZE] + [("sparsify", c) for c in SPARSIFY]
)
DTYPES = ["fp32", "fp16", "bf16"]


@pytest.fixture(scope="session")
def probe_program():
    """dtype name -> (the converted probe AIProgram, its feeds, the dense weights by module name), made once."""
    return functools.cache(make_probe)


CONFIGS = {"palettize": PalettizeConfig, "quantize": QuantizeConfig, "sparsify": SparsifyConfig}


def _ids(case) -> str:
    kind, params = case
    return kind + "-" + "-".join(f"{k}={v}" for k, v in params.items())


def _weight_layer_decode(kind: str, params: dict, weight, array: np.ndarray) -> np.ndarray:
    """What lowbit's weight layer decodes for ``array`` (the same call the driver makes)."""
    fields = dict(params)
    if kind == "sparsify" and fields.get("target_sparsity") is None:
        fields["target_sparsity"] = 0.0
    config = CONFIGS[kind](**fields)
    return ALGORITHMS[kind].job(array, weight, config, 1, None)().decode()


def _rounded_separately(value) -> np.ndarray:
    """A quantized weight as Core AI's Linux runtime decodes a matmul's or embedding's weight with a zero point:
    ``round(scale * q) - round(scale * zero_point)`` in the output type."""
    op = value.owner
    while op.name != "coreai.blockwise_shift_scale":  # through the ragged block's slice
        op = op.operands[0].owner
    data, scale, offset1, _ = (evaluate(v).astype(np.float32) for v in op.operands)
    out = evaluate(op.results[0]).dtype
    grid = [n // g for n, g in zip(data.shape, scale.shape, strict=True)]
    s, z = (np.kron(a, np.ones(grid, np.float32)) for a in (scale, offset1))
    dense = ((s * data).astype(out) - (s * z).astype(out)).astype(out)
    return dense[tuple(slice(0, n) for n in evaluate(value).shape)]


def _element_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8).reshape(a.size, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_the_runtime_decodes_what_lowbit_decodes(case, dtype, probe_program, tmp_path):
    kind, params = case
    program, feeds, dense = probe_program(dtype)
    compress = getattr(lc, f"{kind}_weights")
    out = compress(program, weight_num_threshold=512, **params)
    weights = out.weights()
    assert [w.compression is not None for w in weights] == [True] * 4, out.report.table()
    saved = out.save(tmp_path / "probe.aimodel")
    reloaded = lc.load(saved)
    runtime = probe_weights(run_asset(saved, feeds))
    offset = params.get("qscheme") == "asymmetric" or params.get("dtype") == "uint8"
    for (module, got), weight, again in zip(runtime.items(), weights, reloaded.weights(), strict=True):
        assert got.dtype == dense[module].dtype
        chain = evaluate(weight.value)
        assert evaluate(again.value).tobytes() == chain.tobytes()  # save -> load keeps the decode
        layer = _weight_layer_decode(kind, params, weight, dense[module])
        assert chain.tobytes() == layer.tobytes(), f"{module}: the weight layer's decode differs"
        if got.tobytes() == chain.tobytes():
            continue
        if offset:  # a matmul's / embedding's weight: scale * q and scale * zero point rounded separately
            assert got.tobytes() == _rounded_separately(weight.value).tobytes(), module
            scale_step = ml_dtypes.finfo(got.dtype).eps * float(np.abs(dense[module]).max().astype(np.float32))
            assert np.abs(got.astype(np.float32) - layer.astype(np.float32)).max() <= 2 * scale_step
        else:  # the same numbers, but where lowbit decodes 0 * (negative scale) as -0.0 the runtime gives +0.0
            assert np.array_equal(got, chain), f"{module}: the runtime and lowbit's decode differ"
            differ = _element_bytes(got) != _element_bytes(chain)
            assert (chain.reshape(-1)[differ.any(axis=1)] == 0).all()
