"""The skeleton every compression pass shares: discover the weights, read each, hand it to the weight layer
(optionally in parallel through a ``concurrent.futures.Executor``), write each result into the graph, and report."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from lowbit.config import check_bool, check_choice
from lowbit.errors import SkipWeight
from lowbit.onnx import encoding
from lowbit.onnx.discovery import WeightRef
from lowbit.onnx.functions import FUNCTION_OPSET, MIN_IR_VERSION
from lowbit.onnx.fused import TARGETS
from lowbit.onnx.paging import Spill, prefetch_pages, release_pages
from lowbit.onnx.program import PROTO_LIMIT_BYTES, Program
from lowbit.onnx.weight_configs import WeightConfigs
from lowbit.report import CompressionReport, WeightResult
from lowbit.weights import check_eligible

__all__ = ["WeightPass", "target_program"]


def target_program(program: Program, in_place: bool) -> Program:
    """The Program a pass rewrites: ``program`` itself when ``in_place``, else a copy sharing its tensor bytes.

    Raises ``TypeError`` when ``program`` is not a :class:`Program` or ``in_place`` not a bool.
    """
    check_bool("in_place", in_place)
    if not isinstance(program, Program):
        raise TypeError(f"program must be a lowbit.Program (from lowbit.load), got {type(program).__name__}")
    return program if in_place else program.copy()


def default_executor(workers: int) -> Executor | None:
    """A pool of ``workers`` threads (None for one worker: run in this thread). The kernels release the GIL, so
    threads run them in parallel without pickling, without re-importing the user's script (which a process pool
    does: a script with no ``if __name__ == "__main__":`` guard would run again in every worker) and without
    worker processes that could outlive a killed parent."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowbit") if workers > 1 else None


def numpy_dtype(dtype: ir.DataType) -> np.dtype | None:
    """The numpy dtype of an ONNX element type (None when it has none)."""
    try:
        return np.dtype(dtype.numpy())
    except (TypeError, ValueError):
        return None


class WeightPass:
    """Base of the compression passes. Subclasses define ``job`` (the weight-layer call for one weight),
    ``write`` (put its result into the graph) and ``requirements_of`` (what their encoding needs of the model).

    ``config`` is the pass's config (a frozen dataclass with ``weight_num_threshold``); ``configs`` (a
    :class:`~lowbit.onnx.weight_configs.WeightConfigs`) varies it per weight or leaves weights out. ``target``:
    ``"portable"`` (standard ops and lowbit functions) or ``"onnxruntime"`` (ONNX Runtime's fused kernels where a
    weight fits one, see :mod:`lowbit.onnx.fused`).
    """

    name = "compress"  # the progress bar's label

    def __init__(
        self,
        config: Any,
        workers: int = 1,
        executor: Executor | None = None,
        configs: WeightConfigs | None = None,
        target: str = TARGETS[0],
    ) -> None:
        self.config = config
        self.target = check_choice("target", target, TARGETS)
        self.selection = (configs or WeightConfigs()).selection(config)
        self.workers = workers
        self.executor = executor
        self.kernel_threads = 1  # threads a kernel may use: set per run (workers when the kernels run here)
        self.spill: Spill | None = None  # set per run: see __call__

    def job(self, ref: WeightRef, array: np.ndarray, config: Any) -> Callable[[], Any]:
        """A picklable call of the weight layer that compresses ``array`` (the weight ``ref``) per ``config``."""
        raise NotImplementedError

    def write(self, program: Program, ref: WeightRef, result: Any, config: Any) -> int:
        """Write ``result`` into the graph in place of ``ref``; return the bytes it occupies now."""
        raise NotImplementedError

    def stored_nbytes(self, ref: WeightRef, result: Any, config: Any) -> int:
        """Bytes ``result`` will take in the graph (checked before writing: a weight is never made larger)."""
        return result.nbytes

    def requirements_of(self, config: Any, program: Program) -> tuple[int, int]:
        """(default-domain opset, IR version) a weight compressed per ``config`` needs; lowbit's functions need
        opset 13 and IR 8."""
        return FUNCTION_OPSET, MIN_IR_VERSION

    def config_for(self, ref: WeightRef) -> Any:
        """The config of weight ``ref`` (None: left out by the per-weight configs)."""
        return self.selection.lookup(ref.name, ref.op.split("+"))

    def _checked_config(self, ref: WeightRef) -> Any:
        """The config ``ref`` is compressed with; :class:`SkipWeight` when it is not to be compressed."""
        if ref.compression is not None:
            raise SkipWeight(f"already compressed ({ref.compression})")
        config = self.config_for(ref)
        if config is None:
            raise SkipWeight("left out by the per-weight configs", warn=False)
        check_eligible(ref.shape, numpy_dtype(ref.dtype), config.weight_num_threshold)
        return config

    def _configs_in_use(self, refs: list[WeightRef]) -> list[Any]:
        configs = []
        for ref in refs:
            with contextlib.suppress(SkipWeight):
                config = self._checked_config(ref)
                if config not in configs:
                    configs.append(config)
        return configs

    def _prepared_weights(self, program: Program) -> list[WeightRef]:
        """The weights of ``program``, after raising its opset and IR version to what the encoding needs when
        there is something to compress (never for a model this pass leaves as it is)."""
        refs = program.weights()
        configs = self._configs_in_use(refs)
        if not configs:
            return refs
        needs = [self.requirements_of(config, program) for config in configs]
        opset, ir_version = max(n[0] for n in needs), max(n[1] for n in needs)
        if program.model.ir_version < 4:  # from IR 4 on, an initializer listed as an input is an overridable default
            program.initializers_out_of_inputs()
        program.model.ir_version = max(program.model.ir_version, ir_version)
        if program.graph.opset_imports.get("", 1) >= opset:
            return refs
        program.require_opset(opset)
        return program.weights()

    def _jobs(self, refs: list[WeightRef], report: CompressionReport) -> Iterator[tuple[WeightRef, Callable]]:
        for ref in refs:
            try:
                config = self._checked_config(ref)
                assert ref.value is not None and ref.value.const_value is not None
                array = ref.value.const_value.numpy()
                prefetch_pages(ref.value.const_value)
                yield ref, self.job(ref, array, config)
            except SkipWeight as skip:
                release_pages(ref.value.const_value if ref.value is not None else None)
                self._skip(report, ref, skip)

    def _skip(self, report: CompressionReport, ref: WeightRef, skip: SkipWeight) -> None:
        if skip.warn:
            warnings.warn(f"weight {ref.name!r} skipped: {skip.reason}", UserWarning, stacklevel=4)
        report.rows.append(WeightResult(ref.name, ref.op, ref.shape, ref.nbytes, ref.nbytes, skipped=skip.reason))

    def __call__(self, program: Program) -> CompressionReport:
        """Compress the weights of ``program`` in place; return the report."""
        report = CompressionReport()
        refs = self._prepared_weights(program)
        # a model saved with external data keeps its compressed weights on disk until then, not in memory
        self.spill = Spill(program) if program.tensor_nbytes() > PROTO_LIMIT_BYTES else None
        owned = self.executor is None
        # a pool only pays for itself with several weights to share out; with one, its kernel may use threads
        executor = default_executor(min(self.workers, len(refs))) if owned else self.executor
        self.kernel_threads = self.workers if executor is None else 1
        try:
            with (
                encoding.writing(program.model),
                tqdm(total=len(refs), desc=self.name, unit="weight", disable=None, leave=False) as bar,
            ):
                for ref, outcome in self._outcomes(refs, report, executor):
                    self._record(program, report, ref, outcome)
                    bar.update()
                bar.update(len(refs) - bar.n)
        finally:
            if owned and executor is not None:
                executor.shutdown()
        self.selection.warn_unmatched("op_name_configs", "weight", stacklevel=3)
        order = {ref.name: i for i, ref in enumerate(refs)}
        report.rows.sort(key=lambda r: order.get(r.name, math.inf))
        return report

    def _outcomes(self, refs, report, executor: Executor | None) -> Iterator[tuple[WeightRef, Callable[[], Any]]]:
        """Each weight's result getter, in weight order; at most ``2 x workers`` jobs in flight, to bound memory."""
        if executor is None:
            for ref, job in self._jobs(refs, report):
                yield ref, job
            return
        window = max(2, 2 * self.workers)
        pending: list[tuple[WeightRef, Future]] = []
        for ref, job in self._jobs(refs, report):
            pending.append((ref, executor.submit(job)))
            if len(pending) >= window:
                ref0, future = pending.pop(0)
                yield ref0, future.result
        for ref0, future in pending:
            yield ref0, future.result

    def _record(self, program: Program, report: CompressionReport, ref: WeightRef, outcome: Callable[[], Any]) -> None:
        assert ref.value is not None
        source = ref.value.const_value
        try:
            result = outcome()
            config = self.config_for(ref)
            stored = self.stored_nbytes(ref, result, config)
            if stored >= ref.nbytes:
                raise SkipWeight(f"compressed it would take {stored} bytes, not fewer than its {ref.nbytes}")
            known = self.spill.before() if self.spill else None
            after = self.write(program, ref, result, config)
            if self.spill and known is not None:
                self.spill.after(known)
        except SkipWeight as skip:
            self._skip(report, ref, skip)
            return
        finally:
            release_pages(source)
        report.rows.append(WeightResult(ref.name, ref.op, ref.shape, ref.nbytes, after, result.rel_mse))
