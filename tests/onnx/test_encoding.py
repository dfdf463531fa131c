"""Round trips of the encoding: numpy decode == ONNX Runtime decode == decompress_weights, bit for bit."""

import math

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from conftest import check_model, make_model, ort_session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.kernels.decode import value_table
from lowbit.kernels.packing import pack_bits
from lowbit.onnx import decoders, encoding
from lowbit.onnx.functions import DOMAIN
from lowbit.weights import moved_axis_perms


def _single_weight(shape, dtype) -> tuple[ir.Model, ir.Value]:
    model = make_model({"w": np.zeros(shape, dtype)})
    return model, model.graph.initializers["w"]


def _reference(value: ir.Value) -> np.ndarray:
    node = value.producer()
    decoder = decoders.decoder_for(node)
    return decoder.decode(
        node, [None if v is None or v.const_value is None else v.const_value.numpy() for v in node.inputs]
    )


def _assert_three_way(model: ir.Model, value: ir.Value, shape, dtype) -> None:
    reference = _reference(value)
    assert reference.shape == tuple(shape) and reference.dtype == dtype
    check_model(model)
    for level in ("disable", "basic"):
        got = ort_session(model, level).run(None, {})[0]
        assert got.dtype == reference.dtype
        assert got.tobytes() == reference.tobytes(), level
    dense = lowbit.decompress_weights(lowbit.Program(model)).graph.outputs[0]
    producer = dense.producer()
    constant = producer.inputs[0] if producer is not None else dense
    assert constant.const_value.numpy().tobytes() == reference.tobytes()


shapes = st.lists(st.integers(1, 6), min_size=2, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_bits=st.integers(1, 8),
    shape=shapes,
    axis_seed=st.integers(0, 3),
    cluster_dim=st.sampled_from([1, 2]),
    groups_seed=st.integers(0, 5),
    scaled=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float16]),
    seed=st.integers(0, 1000),
)
def test_lut_to_dense_round_trip(n_bits, shape, axis_seed, cluster_dim, groups_seed, scaled, dtype, seed):
    rng = np.random.default_rng(seed)
    axis = axis_seed % len(shape)
    shape[axis] *= cluster_dim
    forward, back = moved_axis_perms(len(shape), axis)
    canonical = [shape[a] for a in forward]
    channels, rest = canonical[0], math.prod(canonical[1:])
    divisors = [g for g in range(1, channels // cluster_dim + 1) if (channels // cluster_dim) % g == 0]
    groups = divisors[groups_seed % len(divisors)]
    k = 1 << n_bits
    lut = rng.standard_normal((groups, k, cluster_dim)).astype(dtype)
    codes = rng.integers(0, k, (channels // cluster_dim, rest))
    scale = rng.uniform(0.5, 2, channels).astype(dtype) if scaled else None
    model, weight = _single_weight(shape, dtype)
    out = encoding.write_lut(
        model,
        weight,
        packed=pack_bits(codes, n_bits),
        lut=lut,
        scale=scale,
        n_bits=n_bits,
        canonical_shape=canonical,
        perm=back,
    )
    _assert_three_way(model, out, shape, dtype)


def _expected_decodes(op: str, n_bits: int, numel: int) -> set[str]:
    if n_bits in (3, 6):  # 3-byte words, one LUT only
        return {"LutGatherTriplets" if op == "LutGather" and numel * n_bits % 24 == 0 else "LutToDense"}
    if op == "LutGatherGrouped":  # the own-layout decode where the groups and bytes allow it
        return {op, "LutGatherOwnLayout"}
    if op == "LutGather" and n_bits == 8:
        return {"LutGatherBytes"}
    return {op if op != "LutGather" or numel * n_bits % 8 == 0 else "LutToDense"}


@pytest.mark.parametrize("n_bits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize(
    ("shape", "axis", "groups", "op"),
    [
        ((7, 5), 0, 1, "LutGather"),  # odd element counts: codes that do not fill the bytes go to LutToDense
        ((16, 16), 0, 1, "LutGather"),
        ((24, 10), 0, 1, "LutGather"),
        ((3, 1, 5), 0, 1, "LutGather"),
        ((16, 6), 1, 2, "LutGatherGrouped"),
        ((8, 4, 3), 0, 4, "LutGatherGrouped"),
        ((8, 16), 1, 16, "LutGatherGrouped"),
        ((6, 32), 1, 4, "LutGatherOwnLayout"),  # groups of 8 along the last axis
        ((32, 8), 0, 4, "LutGatherOwnLayout"),  # groups along the first axis, rows of whole bytes
        ((16, 3, 8), 0, 2, "LutGatherOwnLayout"),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_byte_table_decodes_round_trip(n_bits, shape, axis, groups, op, dtype):
    """Scalar LUTs whose groups fill whole bytes decode through byte tables: LutGather for one LUT in the weight's
    own layout when its codes fill the bytes exactly (LutGatherTriplets: 3-byte words of 3- or 6-bit codes),
    LutGatherGrouped (one table per group, then the layout's perm) otherwise."""
    rng = np.random.default_rng(n_bits + groups)
    k = 1 << n_bits
    forward, back = moved_axis_perms(len(shape), axis)
    canonical = [shape[a] for a in forward]
    codes = rng.integers(0, k, (canonical[0], math.prod(canonical[1:])))
    model, weight = _single_weight(shape, dtype)
    out = encoding.write_lut(
        model,
        weight,
        packed=pack_bits(codes, n_bits),
        lut=rng.standard_normal((groups, k, 1)).astype(dtype),
        scale=None,
        n_bits=n_bits,
        canonical_shape=canonical,
        perm=back,
    )
    assert out.producer().op_type in _expected_decodes(op, n_bits, math.prod(shape))
    _assert_three_way(model, out, shape, dtype)


@settings(max_examples=30, deadline=None)
@given(
    shape=shapes,
    density=st.floats(0, 1),
    dtype=st.sampled_from([np.float32, np.float16]),
    seed=st.integers(0, 99),
)
def test_sparse_to_dense_round_trip(shape, density, dtype, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    values = rng.standard_normal(int(mask.sum())).astype(dtype)
    model, weight = _single_weight(shape, dtype)
    out = encoding.write_sparse(model, weight, packed_mask=pack_bits(mask, 1), values=values, shape=shape)
    assert out.producer().op_type == ("SparseGather" if math.prod(shape) % 8 == 0 else "SparseToDense")
    _assert_three_way(model, out, shape, dtype)


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape", [(8, 6), (2, 4, 16)])
def test_sparse_gather_round_trip(shape, density):
    """Masks whose bits fill their bytes decode through byte tables (SparseGather): empty, full, mixed."""
    rng = np.random.default_rng(5)
    mask = rng.random(shape) < density
    values = rng.standard_normal(int(mask.sum())).astype(np.float32)
    model, weight = _single_weight(shape, np.float32)
    out = encoding.write_sparse(model, weight, packed_mask=pack_bits(mask, 1), values=values, shape=shape)
    assert out.producer().op_type == "SparseGather"
    _assert_three_way(model, out, shape, np.float32)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 4),
    blocks=st.integers(1, 3),
    rank3=st.booleans(),
    element=st.sampled_from([ml_dtypes.float4_e2m1fn, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]),
    dtype=st.sampled_from([np.float32, np.float16]),
    seed=st.integers(0, 99),
)
def test_mx_dequantize_round_trip(rows, blocks, rank3, element, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = [rows, 32 * blocks, 2] if rank3 else [rows, 32 * blocks]
    split = [rows, 1, blocks, 32, 1, 2] if rank3 else [rows, 1, blocks, 32]  # blocks of 32 along axis 1
    grid = [rows, 1, blocks, 1, 1, 1] if rank3 else [rows, 1, blocks, 1]
    n_bits = 4 if element == ml_dtypes.float4_e2m1fn else 8
    table = value_table(np.dtype(element))
    finite_codes = np.flatnonzero(np.isfinite(table))
    codes = rng.choice(finite_codes, math.prod(shape))
    low, high = (112, 125) if dtype == np.float16 else (1, 200)
    exponents = rng.integers(low, high, math.prod(grid)).astype(np.uint8)
    model, weight = _single_weight(shape, dtype)
    out = encoding.write_mx(
        model,
        weight,
        packed_codes=pack_bits(codes, n_bits),
        n_bits=n_bits,
        exponents=exponents,
        element=np.dtype(element),
        split_shape=split,
        scale_shape=grid,
        dtype=ir.DataType.FLOAT16 if dtype == np.float16 else ir.DataType.FLOAT,
    )
    _assert_three_way(model, out, shape, dtype)


def test_fp4_table_is_e2m1():
    from lowbit.kernels.decode import FP4_E2M1_VALUES

    assert FP4_E2M1_VALUES[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert np.array_equal(FP4_E2M1_VALUES[8:], -FP4_E2M1_VALUES[:8])


def test_sparse_chain_of_lut_values():
    """Joint compression is a chain: SparseToDense(mask, LutToDense(...))."""
    rng = np.random.default_rng(1)
    mask = rng.random((6, 8)) < 0.5
    nnz = int(mask.sum())
    model, weight = _single_weight((6, 8), np.float32)
    lut = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4, 1)
    values_holder = ir.Value(name="w.values", shape=ir.Shape([nnz]), type=ir.TensorType(ir.DataType.FLOAT))
    values = encoding.write_lut(
        model,
        values_holder,
        packed=pack_bits(rng.integers(0, 4, nnz), 2),
        lut=lut,
        scale=None,
        n_bits=2,
        canonical_shape=[nnz],
        perm=[0],
        replace=False,
    )
    out = encoding.write_sparse(model, weight, packed_mask=pack_bits(mask, 1), values=values, shape=(6, 8))
    got = ort_session(model).run(None, {})[0]
    dense = lowbit.decompress_weights(lowbit.Program(model))
    decoded = dense.graph.outputs[0].producer().inputs[0].const_value.numpy()
    assert got.tobytes() == decoded.tobytes()
    assert np.count_nonzero(got) <= nnz and not np.any(got[~mask])
    assert out.name == "w"


def test_functions_emitted_once_and_only_when_used():
    model = make_model({"a": np.zeros((5, 4), np.float32), "b": np.zeros((5, 4), np.float32)})
    assert not model.functions
    for name in ("a", "b"):
        encoding.write_lut(
            model,
            model.graph.initializers[name],
            packed=pack_bits(np.zeros(20, int), 3),
            lut=np.zeros((1, 8, 1), np.float32),
            scale=None,
            n_bits=3,  # codes straddle bytes and 20 of them do not fill 3-byte words: the general decode
            canonical_shape=[5, 4],
            perm=[0, 1],
        )
    names = sorted(name for domain, name, _ in model.functions if domain == DOMAIN)
    assert names == ["LutToDense", "UnpackBits"]
    assert model.graph.opset_imports[DOMAIN] == 1
    check_model(model)
    dense = lowbit.decompress_weights(lowbit.Program(model))
    assert not dense.model.functions and DOMAIN not in dense.graph.opset_imports


def test_old_opset_is_refused_clearly():
    model = make_model({"w": np.zeros((4, 4), np.float32)}, opset=11)
    with pytest.raises(ValueError, match="opset 11"):
        encoding.write_lut(
            model,
            model.graph.initializers["w"],
            packed=pack_bits(np.zeros(16, int), 1),
            lut=np.zeros((1, 2, 1), np.float32),
            scale=None,
            n_bits=1,
            canonical_shape=[4, 4],
            perm=[0, 1],
        )


def test_dequantize_linear_int4_blocked_matches_ort():
    """decompress_weights evaluates a standard blocked int4 DequantizeLinear exactly as ONNX Runtime does."""
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (8, 64)).astype(ml_dtypes.int4)
    scale = rng.uniform(0.01, 0.1, (8, 2)).astype(np.float16)
    qv = ir.Value(name="q", const_value=ir.tensor(q))
    sv = ir.Value(name="s", const_value=ir.tensor(scale))
    node = ir.node("DequantizeLinear", [qv, sv], {"axis": 1, "block_size": 32}, name="dq")
    node.outputs[0].name = "w"
    node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.FLOAT16, ir.Shape([8, 64])
    graph = ir.Graph([], [node.outputs[0]], nodes=[node], initializers=[qv, sv], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    got = ort_session(model).run(None, {})[0]
    dense = lowbit.decompress_weights(lowbit.Program(model))
    assert dense.graph.outputs[0].const_value.numpy().tobytes() == got.tobytes()


def test_triplet_codes_shared_per_bit_width_and_gone_after_decompress():
    weights = {name: np.random.default_rng(3).standard_normal((64, 48)).astype(np.float32) for name in "abc"}
    program = lowbit.Program(make_model(weights, [("MatMul", name, {}) for name in weights]))
    six = lowbit.palettize_weights(program, n_bits=6, configs={"op_name_configs": {"c": {"n_bits": 3}}})
    tables = [n for n in six.graph if n.op_type == "TripletCodes"]
    assert sorted(n.attributes["n_bits"].as_int() for n in tables) == [3, 6]
    assert sum(n.op_type == "LutGatherTriplets" for n in six.graph) == 3
    check_model(six.model)
    dense = lowbit.decompress_weights(six)
    assert sorted(dense.graph.initializers) == ["a", "b", "c"] and not dense.model.functions
    codes_and_luts = 2 * (64 * 48 * 6 // 8 + 64 * 4) + 64 * 48 * 3 // 8 + 8 * 4
    assert (
        sum(v.const_value.nbytes for v in six.graph.initializers.values()) == codes_and_luts
    )  # each weight's codes stored once, the shared tables not at all


def test_a_pass_scans_the_model_for_names_once_not_per_name(monkeypatch):
    """Generated names come from one scan of the model per pass (a scan per name is quadratic in graph size), and
    they still never collide with the model's own."""
    from lowbit.onnx import graph_edit

    scans = []
    real = graph_edit._value_names
    monkeypatch.setattr(graph_edit, "_value_names", lambda model: scans.append(1) or real(model))
    rng = np.random.default_rng(0)
    weights = {f"w{i}": (rng.standard_normal((64, 64)) * 0.02).astype(np.float16) for i in range(12)}
    weights["w3.lut"] = weights.pop("w3")  # a name the generated ones of another weight would take
    program = lowbit.Program(make_model(weights, [("MatMul", name, {}) for name in weights]))
    out = lowbit.sparsify_weights(program, target_sparsity=0.5, palettize_nbits=4)
    assert len(out.report.compressed) == 12
    assert len(scans) == 1
    names = [v.name for g in out.model.graphs() for v in (*g.initializers.values(), *(o for n in g for o in n.outputs))]
    assert len(names) == len(set(names))
    check_model(out.model)
