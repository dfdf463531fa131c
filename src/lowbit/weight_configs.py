"""Per-weight parameters on the graph path (any backend): ``WeightConfigs`` says which weights a pass compresses
and with what."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lowbit.selection import Selection, check_keys, check_name_key, load_yaml

__all__ = ["WeightConfigs", "as_weight_configs"]

C = TypeVar("C")

Overrides = Mapping[str, Any]


@dataclass
class WeightConfigs:
    """Which weights a graph pass compresses, and with which parameters.

    Each value is a mapping of the pass's parameters (e.g. ``{"n_bits": 8}``) that overrides the ones the pass
    was called with, or ``None``: leave those weights alone. A weight gets the first of: ``op_name_configs`` (its
    name, exact or a regular expression matching the whole name), ``op_type_configs`` (the type of the op that
    consumes it: ``"Gather"``, ``"MatMul"``, ``"Conv"``...), ``global_config`` (default ``{}``: the call's
    parameters as they are; ``None``: only weights a name or type config names are compressed).

    The same shape as the torch path's ``ModelConfig`` (``global_config`` / ``module_type_configs`` /
    ``module_name_configs``) and coremltools' ``OptimizationConfig``. Example: 4 bits, but embeddings at 8 and the
    LM head left dense::

        WeightConfigs(op_type_configs={"Gather": {"n_bits": 8}}, op_name_configs={"lm_head.*": None})
    """

    global_config: Overrides | None = field(default_factory=dict)
    op_type_configs: dict[str, Overrides | None] = field(default_factory=dict)
    op_name_configs: dict[str, Overrides | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_overrides("global_config", self.global_config)
        for key, value in self.op_type_configs.items():
            if not isinstance(key, str):
                raise TypeError(f"op_type_configs keys must be op type names (str), got {key!r}")
            _check_overrides(f"op_type_configs[{key!r}]", value)
        for key, value in self.op_name_configs.items():
            check_name_key(key, "op_name_configs")
            _check_overrides(f"op_name_configs[{key!r}]", value)

    def as_dict(self) -> dict[str, Any]:
        """Plain dicts: ``from_dict(as_dict())`` gives an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> WeightConfigs:
        """The config from ``{"global_config": ..., "op_type_configs": ..., "op_name_configs": ...}`` (each
        optional); ``ValueError`` for any other key."""
        if not isinstance(config, Mapping):
            raise TypeError(f"WeightConfigs.from_dict needs a mapping, got {type(config).__name__}")
        check_keys("WeightConfigs", config, [f.name for f in dataclasses.fields(cls)])
        kwargs = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
        for key in ("op_type_configs", "op_name_configs"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
            elif not isinstance(kwargs[key], dict):
                raise TypeError(f"{key} must be a mapping, got {type(kwargs[key]).__name__}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path_or_stream: str | os.PathLike | io.IOBase) -> WeightConfigs:
        """:meth:`from_dict` of a YAML file (a path) or stream."""
        return cls.from_dict(load_yaml(path_or_stream) or {})

    def selection(self, base: C) -> Selection[C]:
        """The per-weight configs: ``base`` (a pass config) with each entry's overrides applied and validated."""

        def applied(where: str, overrides: Overrides | None) -> C | None:
            if overrides is None:
                return None
            check_keys(where, overrides, [f.name for f in dataclasses.fields(base)])  # type: ignore[arg-type]
            return dataclasses.replace(base, **overrides)  # type: ignore[type-var]

        return Selection(
            applied("global_config", self.global_config),
            {k: applied(f"op_type_configs[{k!r}]", v) for k, v in self.op_type_configs.items()},
            {k: applied(f"op_name_configs[{k!r}]", v) for k, v in self.op_name_configs.items()},
        )


def _check_overrides(where: str, value: Any) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{where} must be a mapping of parameters or None, got {type(value).__name__}")


def as_weight_configs(configs: WeightConfigs | Mapping[str, Any] | None) -> WeightConfigs | None:
    """``configs`` as :class:`WeightConfigs` (a mapping goes through :meth:`WeightConfigs.from_dict`)."""
    if configs is None or isinstance(configs, WeightConfigs):
        return configs
    if isinstance(configs, Mapping):
        return WeightConfigs.from_dict(configs)
    raise TypeError(f"configs must be a WeightConfigs, a dict or None, got {type(configs).__name__}")
