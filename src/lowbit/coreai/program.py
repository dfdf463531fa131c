"""A Core AI program as lowbit handles it: an ``AIProgram`` (usable wherever one is expected) that lowbit can
walk, copy, optimize and save atomically, and the Core AI backend of :mod:`lowbit.driver`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from coreai.authoring import AIModelAsset, AIProgram

from lowbit.coreai import _mlir, encoding
from lowbit.coreai.discovery import CoreAIWeight, find_weights
from lowbit.errors import ModelLoadError, SkipWeight, one_line
from lowbit.report import CompressionReport

__all__ = ["CoreAIBackend", "Program", "load"]

SUFFIX = ".aimodel"
_TEMPORARY_PREFIX = ".lowbit-tmp-"


class Program(AIProgram):
    """An ``AIProgram`` with lowbit's additions: :meth:`weights`, :meth:`copy`, :meth:`optimize`, an atomic
    :meth:`save` / :meth:`save_asset`, and ``report`` (the last compression's :class:`CompressionReport`)."""

    report: CompressionReport | None = None

    @classmethod
    def of(cls, program: AIProgram) -> Program:
        """``program`` as a :class:`Program` (the same module, not a copy)."""
        if isinstance(program, Program):
            return program
        if not isinstance(program, AIProgram):
            raise TypeError(f"coreai_program must be a coreai AIProgram, got {type(program).__name__}")
        return cls(program._module)

    def weights(self) -> list[CoreAIWeight]:
        """Every weight (dense or compressed) with its consumer op, channel axes, size and encoding."""
        return find_weights(self)

    def weight_arrays(self) -> dict[str, np.ndarray]:
        """Every weight's dense values by name, compressed ones decoded (as ``decompress_weights`` decodes them)."""
        from lowbit.coreai.decode import evaluate

        return {w.name: np.asarray(evaluate(w.value)) for w in self.weights()}

    def copy(self) -> Program:
        """An independent copy (its own module)."""
        return Program(_mlir.clone(self)._module)

    def optimize(self) -> Program:
        """Drop dead constants (the weights a compression replaced); returns this program."""
        _mlir.remove_dead_constants(self)
        return self

    def stored_nbytes(self) -> int:
        """Bytes of the weights as stored (compressed ones as encoded)."""
        return sum(w.nbytes for w in self.weights())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ``.aimodel`` folder atomically: a complete new folder is written beside ``path`` and swapped
        in, so an interrupted save leaves the old asset intact. Raises ``ValueError`` when the program does not
        verify or ``path`` does not end in ``.aimodel``; ``ModelLoadError`` when ``path`` is inside an asset being
        read."""
        dest = Path(path)
        if dest.suffix != SUFFIX:
            raise ValueError(f"path must end in {SUFFIX}, got {str(path)!r}")
        _mlir.verify(self)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_TEMPORARY_PREFIX))
        try:
            AIProgram.save_asset(self, staging / dest.name)
            _swap_in(staging / dest.name, dest, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    def save_asset(self, path: Path, *args: Any, **kwargs: Any) -> AIModelAsset:  # type: ignore[override]
        """:meth:`save`, returning the saved ``AIModelAsset`` as coreai's ``save_asset`` does."""
        if args or kwargs:  # metadata / minimum_os: coreai's own (non-atomic) save
            return AIProgram.save_asset(self, Path(path), *args, **kwargs)
        return AIModelAsset.load(self.save(path))


def _swap_in(new: Path, dest: Path, staging: Path) -> None:
    """Move the folder ``new`` to ``dest``; an existing ``dest`` is moved aside first and removed after."""
    if not dest.exists():
        new.rename(dest)
        return
    old = staging / "replaced"
    dest.rename(old)
    try:
        new.rename(dest)
    except OSError:
        old.rename(dest)
        raise


_BYTECODE_MAGIC = b"ML\xefR"


def load(path: str | os.PathLike) -> Program:
    """Load a ``.aimodel`` folder. ``ModelLoadError`` (a one-line reason) when it is missing, not a Core AI asset, or
    its bytecode is not MLIR bytecode or does not match its hash (checked first: coreai-core aborts the process on
    malformed bytecode)."""
    source = Path(path)
    if not source.exists():
        raise ModelLoadError(f"{source}: no such file or folder")
    bytecode = source / "main.mlirb"
    if not source.is_dir() or not bytecode.is_file():
        raise ModelLoadError(f"{source}: not a Core AI asset (a .aimodel folder holding main.mlirb)")
    with open(bytecode, "rb") as f:
        if f.read(len(_BYTECODE_MAGIC)) != _BYTECODE_MAGIC:
            raise ModelLoadError(f"{source}: cannot load the Core AI asset: main.mlirb is not MLIR bytecode")
        f.seek(0)
        sha = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
    digest = sha.digest()
    recorded = source / "main.hash"
    if recorded.is_file() and recorded.read_bytes() != digest:
        raise ModelLoadError(f"{source}: cannot load the Core AI asset: main.mlirb does not match main.hash")
    try:
        return Program.of(AIModelAsset.load(source).program)
    except Exception as err:
        raise ModelLoadError(f"{source}: cannot load the Core AI asset: {one_line(err)}") from err


class CoreAIBackend:
    """:class:`lowbit.driver.Backend` over a Core AI :class:`Program`."""

    def __init__(self, program: Program) -> None:
        self.program = program

    def weights(self) -> list[CoreAIWeight]:
        return self.program.weights()

    def element_dtype(self, weight: CoreAIWeight) -> np.dtype | None:
        return weight.dtype

    def prepare(self, plan: Sequence[tuple[CoreAIWeight, Any]]) -> bool:
        """A Core AI program needs nothing raised: every encoding is in the dialect."""
        return False

    def read(self, weight: CoreAIWeight) -> np.ndarray:
        return _mlir.read_constant(weight.constant)

    def release(self, weight: CoreAIWeight) -> None:
        """The constant's bytes belong to the module until it is optimized or saved: nothing to drop here."""

    def stored_nbytes(self, weight: CoreAIWeight, result: Any, config: Any) -> int:
        return encoding.stored_nbytes(result)

    def write(self, weight: CoreAIWeight, result: Any, config: Any) -> int:
        try:
            return encoding.write(weight, result)
        except (TypeError, ValueError) as err:
            raise SkipWeight(f"Core AI cannot hold this encoding: {one_line(err)}") from err

    def note(self, weight: CoreAIWeight) -> None:
        return None

    def writing(self) -> contextlib.AbstractContextManager[Any]:
        return _verified(self.program)


@contextlib.contextmanager
def _verified(program: Program) -> Iterator[None]:
    """Runs the writes, then drops the replaced constants and checks the program verifies."""
    yield
    program.optimize()
    _mlir.verify(program)
