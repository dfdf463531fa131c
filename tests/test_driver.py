"""The compression driver over a backend that is not ONNX: a dict of arrays. The same weight gives the same codes
through it as through the ONNX backend, the driver's checks and skips are backend-neutral, and a program with nothing
to compress is never prepared (its opset raised)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import make_model

import lowbit
from lowbit.config import PalettizeConfig, QuantizeConfig, SparsifyConfig
from lowbit.driver import ALGORITHMS, compress
from lowbit.weight_configs import WeightConfigs


@dataclass(frozen=True)
class ArrayWeight:
    name: str
    op: str
    shape: tuple[int, ...]
    output_axis: int
    input_axis: int
    nbytes: int
    compression: str | None = None


class DictBackend:
    """Weights in a dict, results kept beside them: the smallest backend."""

    def __init__(self, arrays: dict[str, np.ndarray], op: str = "MatMul") -> None:
        self.arrays, self.op = arrays, op
        self.results: dict[str, object] = {}
        self.prepared = 0
        self.released: list[str] = []

    def weights(self) -> list[ArrayWeight]:
        # a MatMul's B is [K, N]: output channels on the last axis, input channels on the first
        return [ArrayWeight(n, self.op, a.shape, a.ndim - 1, a.ndim - 2, a.nbytes) for n, a in self.arrays.items()]

    def element_dtype(self, weight: ArrayWeight) -> np.dtype:
        return self.arrays[weight.name].dtype

    def prepare(self, plan) -> bool:
        self.prepared += 1
        return False

    def read(self, weight: ArrayWeight) -> np.ndarray:
        return self.arrays[weight.name]

    def release(self, weight: ArrayWeight) -> None:
        self.released.append(weight.name)

    def stored_nbytes(self, weight: ArrayWeight, result, config) -> int:
        return result.nbytes

    def write(self, weight: ArrayWeight, result, config) -> int:
        self.results[weight.name] = result
        return result.nbytes

    def note(self, weight: ArrayWeight) -> None:
        return None

    def writing(self):
        return contextlib.nullcontext()


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a": (rng.standard_normal((64, 48)) * 0.02).astype(np.float16),
        "b": rng.standard_t(4, (96, 40)).astype(np.float32),
    }


CASES = [
    ("palettize", PalettizeConfig(n_bits=3, granularity="per_grouped_channel", group_size=16), "palettize_weights"),
    ("quantize", QuantizeConfig(dtype="int4", granularity="per_block", block_size=16), "quantize_weights"),
    ("sparsify", SparsifyConfig(target_sparsity=0.5, quantize_dtype="int8"), "sparsify_weights"),
]


@pytest.mark.parametrize(("algorithm", "config", "door"), CASES, ids=[c[0] for c in CASES])
def test_same_weight_same_decoded_values_through_any_backend(algorithm, config, door):
    arrays = _arrays()
    backend = DictBackend(arrays)
    report = compress(backend, ALGORITHMS[algorithm], config)
    assert sorted(backend.results) == ["a", "b"] and backend.prepared == 1
    assert sorted(backend.released) == ["a", "b"]
    params = {k: getattr(config, k) for k in _call_params(config)}
    program = lowbit.Program(make_model(arrays, [("MatMul", n, {}) for n in arrays]))
    onnx_out = getattr(lowbit, door)(program, **params)
    dense = lowbit.decompress_weights(onnx_out)
    for name, result in backend.results.items():
        decoded = result.decode()
        assert decoded.dtype == arrays[name].dtype
        assert decoded.tobytes() == dense.graph.initializers[name].const_value.numpy().tobytes()
    assert [r.rel_mse for r in report.rows] == [r.rel_mse for r in onnx_out.report.rows]


def _call_params(config) -> list[str]:
    names = {
        "palettize": ["n_bits", "granularity", "group_size"],
        "quantize": ["dtype", "granularity", "block_size"],
        "sparsify": ["target_sparsity", "quantize_dtype"],
    }
    return next(v for k, v in names.items() if type(config).__name__.lower().startswith(k))


def test_skips_are_reported_with_their_reason_and_nothing_is_prepared_when_nothing_is_compressed():
    arrays = {"small": np.ones((8, 8), np.float32), "ints": np.ones((64, 64), np.int32)}
    backend = DictBackend(arrays)
    with pytest.warns(UserWarning, match="weight 'ints' skipped: dtype int32"):
        report = compress(backend, ALGORITHMS["quantize"], QuantizeConfig(dtype="int8"))
    assert backend.prepared == 0 and backend.results == {}
    reasons = {r.name: r.skipped for r in report.rows}
    assert reasons == {
        "small": "64 elements <= weight_num_threshold 1024",
        "ints": "dtype int32 is not float32/float16/bfloat16",
    }


def test_per_weight_configs_by_name_and_type_apply_on_any_backend():
    backend = DictBackend(_arrays(), op="batch_matmul")
    configs = WeightConfigs(op_type_configs={"batch_matmul": {"n_bits": 2}}, op_name_configs={"b": None})
    report = compress(backend, ALGORITHMS["palettize"], PalettizeConfig(n_bits=4), configs)
    assert list(backend.results) == ["a"]
    assert backend.results["a"].palettized.n_bits == 2
    assert {r.name: r.skipped for r in report.rows}["b"] == "left out by the per-weight configs"
