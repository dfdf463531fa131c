"""Which config each weight gets: by name (exact, or a regular expression matching the whole name), else by type,
else the global one; ``None`` anywhere means "leave it alone". One shape for both front ends: the torch configs
key types by module class, the graph path by op type (``op_type_configs`` / ``op_name_configs``, as coremltools'
``OptimizationConfig`` names them)."""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Selection", "check_keys", "check_name_key", "is_pattern", "load_yaml"]

T = TypeVar("T")

_REGEX_CHARS = set("*+?[](){}|^$\\")


def is_pattern(key: str) -> bool:
    """Names use only identifiers, digits, dots, ``:``, ``/`` and ``-``; anything else marks a regular expression."""
    return bool(_REGEX_CHARS & set(key))


def check_name_key(key: Any, what: str) -> str:
    """``key`` as a name config key: a str, and a valid regular expression when it is one."""
    if not isinstance(key, str):
        raise TypeError(f"{what} keys must be names (str), got {key!r}")
    if is_pattern(key):
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"{what} key {key!r} is not a valid regular expression: {err}") from None
    return key


def check_keys(kind: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """``ValueError`` naming the first key of ``given`` that is not ``allowed``, and the allowed ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {kind} key {unknown[0]!r}; allowed keys: {sorted(allowed)}")


def load_yaml(path_or_stream: str | os.PathLike | io.IOBase) -> Any:
    """A YAML file (a path) or stream, read with ``yaml.safe_load``; ``ValueError`` when it is not YAML."""
    import yaml

    try:
        if isinstance(path_or_stream, (str, os.PathLike)):
            with open(path_or_stream, encoding="utf-8") as stream:
                return yaml.safe_load(stream)
        return yaml.safe_load(path_or_stream)
    except yaml.YAMLError as err:
        raise ValueError(f"not a valid YAML config: {' '.join(str(err).split())}") from None


@dataclass
class Selection(Generic[T]):
    """Name configs over type configs over the global config; records which name keys matched."""

    global_config: T | None
    type_configs: Mapping[Any, T | None] = field(default_factory=dict)
    name_configs: Mapping[str, T | None] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    types_seen: set[Any] = field(default_factory=set)  # type keys some looked-up weight or module has

    def lookup(self, name: str, types: Iterable[Any]) -> T | None:
        """The config of the weight or module ``name`` whose type keys are ``types`` (first match wins)."""
        types = list(types)
        self.types_seen.update(key for key in types if key in self.type_configs)
        if name in self.name_configs:
            self.used.add(name)
            return self.name_configs[name]
        for key, config in self.name_configs.items():
            if is_pattern(key) and re.fullmatch(key, name):
                self.used.add(key)
                return config
        for key in types:
            if key in self.type_configs:
                return self.type_configs[key]
        return self.global_config

    def warn_unmatched(self, what: str, things: str, stacklevel: int = 3) -> None:
        """Warn for each name key that matched none of the ``things`` (a typo would otherwise go unnoticed)."""
        for key in self.name_configs:
            if key not in self.used:
                warnings.warn(f"{what}: {key!r} matches no {things}", UserWarning, stacklevel=stacklevel)
