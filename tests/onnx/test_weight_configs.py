"""Per-weight parameters on the graph path: op types, names and regexes, None to leave out; the CLI's --skip and
--config."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model, ort_session

import lowbit
from lowbit.cli import main
from lowbit.weight_configs import WeightConfigs

RNG = np.random.default_rng(0)


def _program() -> lowbit.Program:
    weights = {
        "embed": RNG.standard_normal((300, 64)).astype(np.float32),
        "q_proj": RNG.standard_normal((64, 64)).astype(np.float32),
        "k_proj": RNG.standard_normal((64, 64)).astype(np.float32),
        "lm_head": RNG.standard_normal((64, 300)).astype(np.float32),
    }
    ops = [("Gather", "embed", {}), ("MatMul", "q_proj", {}), ("MatMul", "k_proj", {}), ("MatMul", "lm_head", {})]
    return lowbit.Program(make_model(weights, ops))


def _lut_entries(program: lowbit.Program) -> dict[str, int]:
    return {w.name: int(w.compression.split()[1].split("-")[0]) for w in program.weights() if w.compression}


def test_type_and_name_configs_override_the_call_and_none_leaves_out():
    configs = {
        "op_type_configs": {"Gather": {"n_bits": 8}},
        "op_name_configs": {"lm_head": None, "k_.*": {"n_bits": 2, "granularity": "per_grouped_channel"}},
    }
    out = lowbit.palettize_weights(_program(), n_bits=4, num_kmeans_workers=1, configs=configs)
    assert _lut_entries(out) == {"embed": 8, "q_proj": 4, "k_proj": 2}
    assert {r.name: r.skipped for r in out.report.rows if r.skipped} == {
        "lm_head": "left out by the per-weight configs"
    }
    k_proj = next(w for w in out.weights() if w.name == "k_proj")
    assert "2 LUT(s)" in k_proj.compression  # 64 channels in groups of 32 (the call's group_size)


def test_global_none_compresses_only_what_is_named_and_opset_follows_the_configs():
    configs = WeightConfigs(
        global_config=None, op_type_configs={"Gather": {"dtype": "int4", "granularity": "per_block"}}
    )
    out = lowbit.quantize_weights(_program(), dtype="int8", configs=configs)
    assert [r.name for r in out.report.compressed] == ["embed"]
    assert out.graph.opset_imports[""] == 21  # int4 needs 21, though the call asked for int8
    session = ort_session(out.model, "basic")
    assert session.run(
        None, {"x0": np.array([1, 2], np.int64), **{f"x{i}": np.ones((1, 64), np.float32) for i in (1, 2, 3)}}
    )


@pytest.mark.parametrize(
    ("configs", "error", "match"),
    [
        ({"op_type_configs": {"MatMul": {"nbits": 8}}}, ValueError, r"unknown op_type_configs\['MatMul'\] key 'nbits'"),
        ({"op_name_configs": {"(": None}}, ValueError, "not a valid regular expression"),
        ({"op_type_configs": {"MatMul": {"n_bits": 5}}}, ValueError, "n_bits must be one of"),
        ({"op_types": {}}, ValueError, "unknown WeightConfigs key 'op_types'"),
        ({"global_config": 4}, TypeError, "global_config must be a mapping"),
    ],
)
def test_bad_configs_are_refused_up_front(configs, error, match):
    with pytest.raises(error, match=match):
        lowbit.palettize_weights(_program(), configs=configs)


def test_a_name_that_matches_nothing_is_warned():
    with pytest.warns(UserWarning, match=r"op_name_configs: 'lm_hed' matches no weight"):
        lowbit.sparsify_weights(_program(), target_sparsity=0.5, configs={"op_name_configs": {"lm_hed": None}})


def test_yaml_round_trip(tmp_path):
    configs = WeightConfigs(op_type_configs={"Gather": {"n_bits": 8}}, op_name_configs={".*head": None})
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(configs.as_dict()))
    assert WeightConfigs.from_yaml(path) == configs


def test_cli_skip_and_config(capsys, tmp_path):
    src = tmp_path / "m.onnx"
    _program().save(src)
    config = tmp_path / "c.yaml"
    config.write_text("op_type_configs:\n  Gather:\n    n_bits: 8\n")
    code = main(
        [
            "palettize",
            str(src),
            str(tmp_path / "o.onnx"),
            "--skip",
            "lm_.*",
            "--skip",
            "q_proj",
            "--config",
            str(config),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert _lut_entries(lowbit.load(tmp_path / "o.onnx")) == {"embed": 8, "k_proj": 4}
    config.write_text("op_type_configs: [1, 2\n")
    code = main(["quantize", str(src), str(tmp_path / "o.onnx"), "--dtype", "int8", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and "not a valid YAML config" in err and len(err.splitlines()) == 1
    code = main(["sparsify", str(src), str(tmp_path / "o.onnx"), "--target-sparsity", "0.5", "--skip", "("])
    err = capsys.readouterr().err
    assert code == 2 and "regular expression" in err
