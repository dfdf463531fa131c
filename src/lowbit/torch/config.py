"""The config system of the torch palettizers: small validated module configs, and a model config that picks one
per module (name > type > global) — one implementation for every palettizer, DKM included."""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch

from lowbit.selection import Selection, check_keys, check_name_key, load_yaml

__all__ = ["ModelConfig", "ModuleConfig"]

C = TypeVar("C", bound="ModuleConfig")
M = TypeVar("M", bound="ModelConfig")


def _plain(value: Any) -> Any:
    """A config value as YAML / JSON can hold it (torch dtypes as their names)."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


@dataclass(frozen=True)
class ModuleConfig:
    """Base of the per-module configs: fields are validated in ``__post_init__`` (``ValueError`` / ``TypeError``
    naming the field and its allowed values)."""

    def as_dict(self) -> dict[str, Any]:
        """The fields and their values (torch dtypes as strings): ``from_dict(as_dict())`` gives an equal config."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], config: Mapping[str, Any]) -> C:
        """The config of these fields; ``ValueError`` for a key that is not a field, naming it and the fields."""
        if not isinstance(config, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a mapping, got {type(config).__name__}")
        check_keys(cls.__name__, config, [f.name for f in dataclasses.fields(cls)])
        return cls(**config)

    @classmethod
    def from_yaml(cls: type[C], path_or_stream: str | os.PathLike | io.IOBase) -> C:
        """:meth:`from_dict` of a YAML file (a path) or stream, read with ``yaml.safe_load``."""
        return cls.from_dict(load_yaml(path_or_stream) or {})


ModuleKey = type[torch.nn.Module] | str  # kept as the class name


@dataclass
class ModelConfig(Generic[C]):
    """Which module config each module gets: ``module_name_configs`` (exact fully qualified names, or regular
    expressions matching a whole name) over ``module_type_configs`` (module classes or their names, kept as names so
    that ``from_dict(as_dict())`` is equal; the exact class, not subclasses) over ``global_config``. A ``None``
    value means: do not compress that module. A config with none of the three set gets the default module config
    as its global config."""

    module_config: ClassVar[type[ModuleConfig]]
    global_config: C | None = None
    module_type_configs: dict[str, C | None] = field(default_factory=dict)
    module_name_configs: dict[str, C | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.global_config is None and not self.module_type_configs and not self.module_name_configs:
            self.global_config = self.module_config()  # type: ignore[assignment]
        self.global_config = self._coerce("global_config", self.global_config)
        self.module_type_configs = {
            _type_key(k): self._coerce(f"module_type_configs[{k!r}]", v) for k, v in self.module_type_configs.items()
        }
        self.module_name_configs = {
            _name_key(k): self._coerce(f"module_name_configs[{k!r}]", v) for k, v in self.module_name_configs.items()
        }

    def _coerce(self, where: str, value: Any) -> Any:
        if value is None or isinstance(value, self.module_config):
            return value
        if isinstance(value, Mapping):
            return self.module_config.from_dict(value)
        raise TypeError(f"{where} must be a {self.module_config.__name__}, a dict or None, got {type(value).__name__}")

    def set_global(self: M, global_config: C | None) -> M:
        """Set the config of every module no name or type config covers; returns ``self``."""
        self.global_config = self._coerce("global_config", global_config)
        return self

    def set_module_type(self: M, object_type: ModuleKey, opt_config: C | None) -> M:
        """Set the config of modules of class ``object_type`` (a class or its name; ``None``: skip them)."""
        self.module_type_configs[_type_key(object_type)] = self._coerce("module_type_configs", opt_config)
        return self

    def set_module_name(self: M, module_name: str, opt_config: C | None) -> M:
        """Set the config of the module named ``module_name`` (exact, or a regex matching whole names)."""
        self.module_name_configs[_name_key(module_name)] = self._coerce("module_name_configs", opt_config)
        return self

    def as_dict(self) -> dict[str, Any]:
        """Plain dicts and strings: ``from_dict(as_dict())`` gives an equal config."""

        def plain(c: ModuleConfig | list | None) -> dict[str, Any] | list | None:
            if isinstance(c, list):  # DKM: configs chosen by weight size
                return [plain(x) for x in c]
            return None if c is None else c.as_dict()

        extra = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("global_config", "module_type_configs", "module_name_configs")
        }
        return {
            **extra,
            "global_config": plain(self.global_config),
            "module_type_configs": {k: plain(v) for k, v in self.module_type_configs.items()},
            "module_name_configs": {k: plain(v) for k, v in self.module_name_configs.items()},
        }

    @classmethod
    def from_dict(cls: type[M], config: Mapping[str, Any]) -> M:
        """The config from ``{"global_config": ..., "module_type_configs": ..., "module_name_configs": ...}``;
        ``ValueError`` for any other key."""
        if not isinstance(config, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a mapping, got {type(config).__name__}")
        check_keys(cls.__name__, config, [f.name for f in dataclasses.fields(cls)])
        kwargs = dict(config)
        for key in ("module_type_configs", "module_name_configs"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
            elif not isinstance(kwargs[key], Mapping):
                raise TypeError(f"{key} must be a mapping, got {type(kwargs[key]).__name__}")
            else:
                kwargs[key] = dict(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls: type[M], path_or_stream: str | os.PathLike | io.IOBase) -> M:
        """:meth:`from_dict` of a YAML file (a path) or stream, read with ``yaml.safe_load``."""
        return cls.from_dict(load_yaml(path_or_stream) or {})

    def resolve(self, model: torch.nn.Module, supported: Callable[[torch.nn.Module], bool]) -> dict[str, C]:
        """The config of each ``supported`` module of ``model`` by name (modules set to ``None`` left out).

        A name or type config that matches no supported module draws a warning naming it (a typo would otherwise go
        unnoticed).
        """
        selection = Selection(self.global_config, self.module_type_configs, self.module_name_configs)
        chosen: dict[str, C] = {}
        for name, module in model.named_modules():
            if not supported(module):
                continue
            config = selection.lookup(name, (type(module).__name__,))
            if config is not None:
                chosen[name] = config
        selection.warn_unmatched("module_name_configs", "supported module", stacklevel=4)
        for key in self.module_type_configs.keys() - selection.types_seen:
            warnings.warn(
                f"module_type_configs: {key!r} matches no supported module of the model (keys are module classes "
                "or their class names, e.g. 'Linear')",
                UserWarning,
                stacklevel=3,
            )
        return chosen


def _type_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, type) and issubclass(key, torch.nn.Module):
        return key.__name__
    raise TypeError(f"module_type_configs keys must be torch.nn.Module classes or class names, got {key!r}")


def _name_key(key: Any) -> str:
    return check_name_key(key, "module_name_configs")
