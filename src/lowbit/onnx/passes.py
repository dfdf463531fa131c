"""The skeleton every compression pass shares: select weights, run a kernel per weight (optionally in parallel
through a ``concurrent.futures.Executor``), write each result into the graph, and report what happened."""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from lowbit.config import check_bool
from lowbit.kernels import CannotCompress
from lowbit.onnx.discovery import WeightRef
from lowbit.onnx.program import Program
from lowbit.onnx.report import format_table
from lowbit.types import FLOAT_WEIGHT_TYPES

__all__ = ["CompressionReport", "SkipWeight", "WeightPass", "WeightResult", "target_program"]


class SkipWeight(Exception):
    """Raised while preparing or writing a weight: the weight is left as it is, for the given reason."""


@dataclass
class WeightResult:
    """One row of a :class:`CompressionReport`."""

    name: str
    op: str
    shape: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    rel_mse: float | None = None
    skipped: str | None = None


@dataclass
class CompressionReport:
    """What a pass did to each weight: compressed (bytes, relative MSE) or skipped (why)."""

    rows: list[WeightResult] = field(default_factory=list)

    @property
    def compressed(self) -> list[WeightResult]:
        return [r for r in self.rows if r.skipped is None]

    @property
    def skipped(self) -> list[WeightResult]:
        return [r for r in self.rows if r.skipped is not None]

    def table(self) -> str:
        rows = [
            [
                r.name,
                r.op,
                "x".join(map(str, r.shape)),
                str(r.bytes_before),
                str(r.bytes_after),
                "" if r.rel_mse is None else f"{r.rel_mse:.3e}",
                r.skipped or "compressed",
            ]
            for r in self.rows
        ]
        before = sum(r.bytes_before for r in self.rows)
        after = sum(r.bytes_after for r in self.rows)
        body = format_table(
            ["weight", "op", "shape", "bytes before", "bytes after", "rel-MSE", "status"],
            rows,
            [False, False, False, True, True, True, False],
        )
        ratio = f"{before / after:.2f}x smaller" if after else "n/a"
        return (
            f"{body}\n{len(self.compressed)} compressed, {len(self.skipped)} skipped; "
            f"weights {before} -> {after} bytes ({ratio})"
        )


def target_program(program: Program, in_place: bool) -> Program:
    """The Program a pass rewrites: ``program`` itself when ``in_place``, else a copy sharing its tensor bytes.

    Raises ``TypeError`` when ``program`` is not a :class:`Program` or ``in_place`` not a bool.
    """
    check_bool("in_place", in_place)
    if not isinstance(program, Program):
        raise TypeError(f"program must be a lowbit.Program (from lowbit.load), got {type(program).__name__}")
    return program if in_place else program.copy()


def default_executor(workers: int) -> Executor | None:
    """A process pool of ``workers`` (None for one worker: run in this process)."""
    if workers <= 1:
        return None
    methods = multiprocessing.get_all_start_methods()
    # forkserver/spawn children re-import the main script: impossible when it came from stdin
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    importable = main_file is None or os.path.exists(main_file)
    method = next(m for m in (("forkserver", "spawn", "fork") if importable else ("fork", "spawn")) if m in methods)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


class WeightPass:
    """Base of the compression passes. Subclasses define ``prepare`` (checks and the kernel job of one weight) and
    ``write`` (put the kernel's result into the graph)."""

    name = "compress"  # the progress bar's label

    def __init__(self, weight_num_threshold: int, workers: int = 1, executor: Executor | None = None) -> None:
        self.weight_num_threshold = weight_num_threshold
        self.workers = workers
        self.executor = executor
        self.kernel_threads = 1  # threads a kernel may use: set per run (workers when the kernels run here)

    def prepare(self, ref: WeightRef, array: np.ndarray) -> tuple[Callable[..., Any], tuple]:
        """Return ``(function, args)`` computing this weight's result (picklable), or raise :class:`SkipWeight`."""
        raise NotImplementedError

    def write(self, program: Program, ref: WeightRef, result: Any) -> tuple[int, float]:
        """Write ``result`` into the graph in place of ``ref``; return (bytes after, relative MSE)."""
        raise NotImplementedError

    def _eligible(self, ref: WeightRef) -> str | None:
        """Why ``ref`` is left alone before reading its data (None: go on)."""
        if ref.compression is not None:
            return f"already compressed ({ref.compression})"
        if ref.dtype not in FLOAT_WEIGHT_TYPES:
            return f"dtype {ref.dtype.name.lower()} is not float32/float16/bfloat16"
        if ref.numel <= self.weight_num_threshold:
            return f"{ref.numel} elements <= weight_num_threshold {self.weight_num_threshold}"
        return None

    def _jobs(self, refs: list[WeightRef], report: CompressionReport) -> Iterator[tuple[WeightRef, Callable, tuple]]:
        for ref in refs:
            reason = self._eligible(ref)
            warn = reason is not None and not reason.startswith(f"{ref.numel} elements")
            if reason is None:
                assert ref.value is not None and ref.value.const_value is not None
                array = ref.value.const_value.numpy()
                try:
                    job, args = self.prepare(ref, array)
                except SkipWeight as skip:
                    reason, warn = str(skip), True
                else:
                    yield ref, job, args
                    continue
            self._skip(report, ref, reason, warn)

    def _skip(self, report: CompressionReport, ref: WeightRef, reason: str, warn: bool) -> None:
        if warn:
            warnings.warn(f"weight {ref.name!r} skipped: {reason}", UserWarning, stacklevel=4)
        report.rows.append(WeightResult(ref.name, ref.op, ref.shape, ref.nbytes, ref.nbytes, skipped=reason))

    def __call__(self, program: Program) -> CompressionReport:
        """Compress the weights of ``program`` in place; return the report."""
        report = CompressionReport()
        refs = program.weights()
        owned = self.executor is None
        # a pool only pays for itself with several weights to share out; with one, its kernel may use threads
        executor = default_executor(min(self.workers, len(refs))) if owned else self.executor
        self.kernel_threads = self.workers if executor is None else 1
        try:
            with tqdm(total=len(refs), desc=self.name, unit="weight", disable=None, leave=False) as bar:
                for ref, result in self._results(refs, report, executor):
                    self._record(program, report, ref, result)
                    bar.update()
                bar.update(len(refs) - bar.n)
        finally:
            if owned and executor is not None:
                executor.shutdown()
        order = {ref.name: i for i, ref in enumerate(refs)}
        report.rows.sort(key=lambda r: order.get(r.name, math.inf))
        return report

    def _results(self, refs, report, executor: Executor | None) -> Iterator[tuple[WeightRef, Any]]:
        """Kernel results in weight order; at most ``2 x workers`` jobs in flight, to bound memory."""
        if executor is None:
            for ref, job, args in self._jobs(refs, report):
                yield ref, _call(job, args)
            return
        window = max(2, 2 * self.workers)
        pending: list[tuple[WeightRef, Future]] = []
        for ref, job, args in self._jobs(refs, report):
            pending.append((ref, executor.submit(_call, job, args)))
            if len(pending) >= window:
                ref0, future = pending.pop(0)
                yield ref0, future.result()
        for ref0, future in pending:
            yield ref0, future.result()

    def _record(self, program: Program, report: CompressionReport, ref: WeightRef, result: Any) -> None:
        if isinstance(result, SkipWeight):
            self._skip(report, ref, str(result), True)
            return
        try:
            after, rel_mse = self.write(program, ref, result)
        except SkipWeight as skip:
            self._skip(report, ref, str(skip), True)
            return
        report.rows.append(WeightResult(ref.name, ref.op, ref.shape, ref.nbytes, after, rel_mse))


def _call(job: Callable, args: tuple) -> Any:
    """Run a kernel job; a kernel's refusal comes back as a :class:`SkipWeight` value, not an exception."""
    try:
        return job(*args)
    except CannotCompress as err:
        return SkipWeight(str(err))
