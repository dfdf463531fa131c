"""The palettizers' config system: validation, dict / YAML round trips, and which module gets which config."""

import io

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lowbit.torch.modules import is_supported  # noqa: E402
from lowbit.torch.palettization import (  # noqa: E402
    ModulePostTrainingPalettizerConfig,
    ModuleSKMPalettizerConfig,
    PostTrainingPalettizerConfig,
    SKMPalettizerConfig,
)

INVALID = [
    ({"n_bits": 5}, "n_bits must be one of"),
    ({"n_bits": "four"}, "n_bits must be an int"),
    ({"n_bits": 4.5}, "n_bits must be an int"),
    ({"n_bits": True}, "n_bits must be an int"),
    ({"granularity": "per_block"}, "granularity must be one of"),
    ({"granularity": "per_grouped_channel"}, "group_size must be set"),
    ({"granularity": "per_grouped_channel", "group_size": 0}, "group_size must be >= 1"),
    ({"channel_axis": 2}, "channel_axis must be one of"),
    ({"cluster_dim": 0}, "cluster_dim must be >= 1"),
    ({"cluster_dim": 2, "enable_per_channel_scale": True}, "cluster_dim > 1 cannot be combined"),
    ({"lut_dtype": torch.float16}, "lut_dtype must be one of"),
    ({"enable_per_channel_scale": 1}, "enable_per_channel_scale must be a bool"),
    ({"granularity": "per_tensor", "group_size": 8}, "group_size must be None when granularity is 'per_tensor'"),
    ({"nbits": 4}, "unknown ModulePostTrainingPalettizerConfig key 'nbits'"),
]


@pytest.mark.parametrize(("options", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_module_options_name_the_option(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ModulePostTrainingPalettizerConfig.from_dict(options)


def test_skm_module_config_has_no_fast_mode_options():
    with pytest.raises(ValueError, match="unknown ModuleSKMPalettizerConfig key 'enable_fast_kmeans_mode'"):
        ModuleSKMPalettizerConfig.from_dict({"enable_fast_kmeans_mode": False})
    with pytest.raises(ValueError, match="n_bits must be one of"):
        ModuleSKMPalettizerConfig(n_bits=7)
    with pytest.raises(ValueError, match="calibration_nsamples must be >= 1"):
        SKMPalettizerConfig(calibration_nsamples=0)


def test_unknown_model_config_key_is_named():
    with pytest.raises(ValueError, match="unknown PostTrainingPalettizerConfig key 'module_configs'"):
        PostTrainingPalettizerConfig.from_dict({"module_configs": {}})
    with pytest.raises(TypeError, match="module_type_configs keys must be"):
        PostTrainingPalettizerConfig(module_type_configs={3: None})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        SKMPalettizerConfig(module_name_configs={"layers.(": None})


def test_dtypes_accept_torch_dtypes_and_names():
    assert ModulePostTrainingPalettizerConfig(lut_dtype=torch.int8).weight_config().lut_dtype.name == "INT8"
    assert ModulePostTrainingPalettizerConfig(lut_dtype="uint8").weight_config().lut_dtype.name == "UINT8"
    assert ModulePostTrainingPalettizerConfig(lut_dtype=torch.int8).as_dict()["lut_dtype"] == "int8"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.head = nn.Linear(8, 2)
        self.norm = nn.LayerNorm(8)


def _chosen(config) -> dict[str, int]:
    return {name: c.n_bits for name, c in config.resolve(Net(), is_supported).items()}


def test_precedence_is_name_then_type_then_global_and_none_excludes():
    config = PostTrainingPalettizerConfig.from_dict(
        {
            "global_config": {"n_bits": 4},
            "module_type_configs": {"Linear": {"n_bits": 3}, nn.Conv2d: None},
            "module_name_configs": {"blocks.1": {"n_bits": 2}, "head": None},
        }
    )
    assert _chosen(config) == {"blocks.0": 3, "blocks.1": 2, "blocks.2": 3}


def test_regex_names_match_whole_names_and_unmatched_names_warn():
    config = SKMPalettizerConfig(
        global_config=ModuleSKMPalettizerConfig(n_bits=4),
        module_name_configs={r"blocks\.[02]": ModuleSKMPalettizerConfig(n_bits=6), "block.1": None},
    )
    with pytest.warns(UserWarning, match="module_name_configs: 'block.1' matches no supported module"):
        assert _chosen(config) == {"conv": 4, "blocks.0": 6, "blocks.1": 4, "blocks.2": 6, "head": 4}


def test_setters_chain_and_round_trip_through_dict_and_yaml(tmp_path):
    config = (
        PostTrainingPalettizerConfig()
        .set_global(ModulePostTrainingPalettizerConfig(n_bits=6))
        .set_module_type(nn.Linear, ModulePostTrainingPalettizerConfig(n_bits=3, lut_dtype=torch.uint8))
        .set_module_name("head", None)
    )
    assert _chosen(config) == {"conv": 6, "blocks.0": 3, "blocks.1": 3, "blocks.2": 3}
    again = PostTrainingPalettizerConfig.from_dict(config.as_dict())
    assert again.as_dict() == config.as_dict() and _chosen(again) == _chosen(config)

    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.as_dict()))
    assert PostTrainingPalettizerConfig.from_yaml(path).as_dict() == config.as_dict()
    stream = io.StringIO("global_config:\n  n_bits: 2\nmodule_name_configs:\n  head: null\n")
    assert _chosen(PostTrainingPalettizerConfig.from_yaml(stream)) == {
        "conv": 2,
        "blocks.0": 2,
        "blocks.1": 2,
        "blocks.2": 2,
    }
    skm = SKMPalettizerConfig.from_dict({"calibration_nsamples": 16, "global_config": {"n_bits": 3}})
    assert SKMPalettizerConfig.from_dict(skm.as_dict()).calibration_nsamples == 16


@pytest.mark.parametrize("n_bits", ["4", 4.0, 4])
def test_n_bits_and_lut_dtype_spelled_as_coremltools_takes_them(n_bits):
    from lowbit.torch.palettization import ModuleDKMPalettizerConfig

    for cls in (ModulePostTrainingPalettizerConfig, ModuleSKMPalettizerConfig, ModuleDKMPalettizerConfig):
        assert cls(n_bits=n_bits).n_bits == 4
    for spelling in ("INT8", "int8", torch.int8):
        assert ModulePostTrainingPalettizerConfig(lut_dtype=spelling).weight_config().lut_dtype.name == "INT8"
    for spelling in ("int8", torch.int8, "I8"):
        assert ModuleDKMPalettizerConfig(lut_dtype=spelling).lut_dtype == "i8"
    assert ModuleDKMPalettizerConfig(lut_dtype=torch.float16).lut_dtype == "f16"
    with pytest.raises(ValueError, match="lut_dtype must be one of"):
        ModuleDKMPalettizerConfig(lut_dtype="int4")


@pytest.mark.parametrize("key", ["Linaer", "torch.nn.Linear", nn.LayerNorm])
def test_a_type_key_that_matches_no_supported_module_warns(key):
    from lowbit.torch.palettization import PostTrainingPalettizer

    config = PostTrainingPalettizerConfig.from_dict({"module_type_configs": {key: {"n_bits": 2}}})
    with pytest.warns(UserWarning, match=r"module_type_configs: '.*' matches no supported module"):
        PostTrainingPalettizer(nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)), config).compress()


def test_class_keyed_type_configs_round_trip_equal():
    config = PostTrainingPalettizerConfig(module_type_configs={nn.Linear: ModulePostTrainingPalettizerConfig(n_bits=2)})
    assert PostTrainingPalettizerConfig.from_dict(config.as_dict()) == config
    assert list(config.module_type_configs) == ["Linear"]
