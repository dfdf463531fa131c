"""Models larger than memory: their weights stream through the page cache, and their compressed tensors wait for
the save on disk.

A pass over a model saved with external data (:data:`~lowbit.onnx.program.PROTO_LIMIT_BYTES` and up) starts reading
each weight into the page cache when it queues it (:func:`prefetch_pages`), drops its pages once it is compressed
(:func:`release_pages`), and moves the compressed tensors to a scratch file (:class:`Spill`). ``madvise`` and
``posix_fadvise`` are Linux's; elsewhere the advice is skipped.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import onnx_ir as ir

from lowbit.onnx.program import TEMPORARY_PREFIX, Program, initializer_values

__all__ = ["SPILL_FROM_BYTES", "Spill", "prefetch_pages", "release_pages"]

SPILL_FROM_BYTES = 1 << 16  # smaller compressed tensors (LUTs, scales) stay in memory


def prefetch_pages(tensor: object) -> None:
    """Start reading a memory-mapped external tensor into the page cache, in the background: the kernels then read
    it from memory. Read on demand instead, a transposing copy faults its pages in one at a time, out of order."""
    _advise(tensor, getattr(mmap, "MADV_WILLNEED", None), None)


def release_pages(tensor: object) -> None:
    """Drop the pages of a memory-mapped external tensor from this process and from the page cache. A weight's
    input is read once; without this, compressing a model larger than memory fills both with it. A later read maps
    the pages back from the file."""
    _advise(tensor, getattr(mmap, "MADV_DONTNEED", None), getattr(os, "POSIX_FADV_DONTNEED", None))


def _advise(tensor: object, memory_advice: int | None, file_advice: int | None) -> None:
    """madvise / posix_fadvise over the tensor's bytes where the platform has them (Linux); elsewhere nothing."""
    if not isinstance(tensor, ir.ExternalTensor) or tensor.raw is None or not tensor.nbytes or memory_advice is None:
        return
    start = (tensor.offset or 0) // mmap.PAGESIZE * mmap.PAGESIZE
    length = (tensor.offset or 0) + tensor.nbytes - start
    with contextlib.suppress(OSError, ValueError):
        tensor.raw.madvise(memory_advice, start, min(length, len(tensor.raw) - start))
        if file_advice is not None:
            with open(tensor.path, "rb") as f:
                os.posix_fadvise(f.fileno(), start, length, file_advice)


class _SpilledTensor(ir.ExternalTensor):
    """An external tensor in a program's scratch file; it holds the file's owner, so the file lasts as long as any
    tensor in it (copies of the program, a model taken out of it) and goes with the last."""

    __slots__ = ("_owner",)

    def __init__(self, owner: _Scratch, offset: int, length: int, tensor: ir.TensorProtocol, name: str) -> None:
        shape = ir.Shape(list(tensor.shape.numpy()))
        super().__init__(
            owner.path.name, offset, length, tensor.dtype, shape=shape, name=name, base_dir=owner.path.parent
        )
        self._owner = owner


class _Scratch:
    """The scratch data file of a program's spilled tensors, in a temporary folder removed with this object."""

    def __init__(self, parent: Path | None) -> None:
        folder = Path(tempfile.mkdtemp(dir=parent, prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-spill-"))
        self.path = folder / "spilled.data"
        weakref.finalize(self, shutil.rmtree, folder, True)


class Spill:
    """Moves the tensors a write adds to ``program`` (from :data:`SPILL_FROM_BYTES` up) to a scratch data file, read
    back from there when needed: the compressed weights of a model larger than memory wait for the save on disk (as
    page cache the kernel can drop), not in the process's own memory. The scratch file lies in a temporary folder
    beside the model (else the system's), removed once no tensor in it is left, or by the next save there after
    this process is gone."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self._scratch: _Scratch | None = None

    def before(self) -> set[ir.Value]:
        """The initializers now (held, so a later comparison cannot meet a reused identity)."""
        return set(initializer_values(self.program.model))

    def after(self, known: set[ir.Value]) -> None:
        """Spill the large tensors of the initializers added since ``known``."""
        added = [v for v in initializer_values(self.program.model) if v not in known and v.const_value is not None]
        large = [v for v in added if v.const_value is not None and v.const_value.nbytes >= SPILL_FROM_BYTES]
        if not large:
            return
        if self._scratch is None:
            path = self.program.path
            self._scratch = _Scratch(path.parent if path is not None and os.access(path.parent, os.W_OK) else None)
        with open(self._scratch.path, "ab") as f:
            for value in large:
                tensor = value.const_value
                assert tensor is not None
                data = tensor.tobytes()
                offset = f.tell()
                f.write(data)
                value.const_value = _SpilledTensor(self._scratch, offset, len(data), tensor, tensor.name or "")
