"""One compression driver over any program format.

The driver finds a program's weights through a :class:`Backend`, picks each weight's config (name > type > global),
checks it, reads it, hands it to the weight layer (optionally in parallel through a ``concurrent.futures.Executor``),
asks the backend to write the result in its place, and reports. A backend only discovers, reads, writes and states
what its program needs (ONNX: :mod:`lowbit.onnx.backend`; Core AI: :mod:`lowbit.coreai`): the algorithm, its
checks and its codes live here and in :mod:`lowbit.weights`, once for every format. Imports neither onnx nor torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from tqdm import tqdm

from lowbit.budget import allocate, allocation_note, measured_choices
from lowbit.errors import SkipWeight, warn_skipped
from lowbit.parallel import blas_shared_by
from lowbit.report import CompressionReport, WeightResult
from lowbit.statistics import ACTIVATION_DAMPING, InputMoments
from lowbit.weight_configs import WeightConfigs
from lowbit.weights import check_eligible, palettize_weight, quantize_weight, sparsify_weight

__all__ = ["ALGORITHMS", "Algorithm", "Backend", "Weight", "compress"]


@dataclass(frozen=True)
class Weight:
    """A weight as a backend finds it: a stable ``name`` (configs and the report use it), its ``shape`` and element
    ``dtype`` (the backend's own type), the consumer's op type(s) ``op`` (several joined with ``+``), the channel
    axes, ``numel``, ``nbytes`` (what it occupies in the file), ``compression`` (None for a dense weight, else a
    short description of its encoding) and ``value`` (the backend's handle on it)."""

    name: str
    shape: tuple[int, ...]
    dtype: Any
    op: str
    output_axis: int
    input_axis: int
    numel: int
    nbytes: int
    compression: str | None = None
    value: Any = field(default=None, repr=False, compare=False)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0


W = TypeVar("W", bound=Weight)


class Backend(Protocol[W]):
    """A program format as the driver sees it, over its own kind of :class:`Weight`. Each method is one step; none
    decides *what* the codes are."""

    def weights(self) -> Sequence[W]:
        """Every weight of the program, in program order, with its channel axes."""
        ...

    def element_dtype(self, weight: W) -> np.dtype | None:
        """The numpy dtype of ``weight``'s elements (None when it has none)."""
        ...

    def prepare(self, plan: Sequence[tuple[W, Any]]) -> bool:
        """Make the program able to hold the encodings of ``plan`` ((weight, config) pairs to compress), e.g. raise
        its opset. True when that rewrote the program, so that its weights must be found anew."""
        ...

    def read(self, weight: W) -> np.ndarray:
        """``weight``'s values (may be memory-mapped; the backend may start paging them in)."""
        ...

    def release(self, weight: W) -> None:
        """``weight``'s input is no longer needed: drop what memory it holds."""
        ...

    def stored_nbytes(self, weight: W, result: Any, config: Any) -> int:
        """Bytes ``result`` will take in the program once written (a weight is never made larger)."""
        ...

    def write(self, weight: W, result: Any, config: Any) -> int:
        """Put ``result`` in the program in place of ``weight``; return the bytes it occupies now."""
        ...

    def note(self, weight: W) -> str | None:
        """What the report should say about how ``weight`` was written (e.g. a fallback encoding), or None."""
        ...

    def writing(self) -> contextlib.AbstractContextManager[Any]:
        """The context the writes of one pass run in."""
        ...


def _palettize_job(array: np.ndarray, weight: Weight, config: Any, threads: int, stats: InputMoments | None):
    importance, damping = (
        (None, ACTIVATION_DAMPING) if stats is None else stats.weighting(weight.shape, weight.input_axis)
    )
    return functools.partial(
        palettize_weight,
        array,
        weight.output_axis,
        config,
        name=weight.name,
        threads=threads,
        importance=importance,
        damping=damping,
        gram=None if stats is None else stats.gram,
        input_axis=weight.input_axis,
    )


def _quantize_job(array: np.ndarray, weight: Weight, config: Any, threads: int, stats: InputMoments | None):
    gram = None if stats is None else stats.gram
    return functools.partial(quantize_weight, array, weight.output_axis, weight.input_axis, config, gram, threads)


def _sparsify_job(array: np.ndarray, weight: Weight, config: Any, threads: int, stats: InputMoments | None):
    importance = None if stats is None else stats.importance(weight.shape, weight.input_axis)
    gram = None if stats is None else stats.gram
    return functools.partial(sparsify_weight, array, weight.output_axis, weight.input_axis, config, importance, gram)


def _measure_job(
    array: np.ndarray,
    weight: Weight,
    config: Any,
    threads: int,
    stats: InputMoments | None,
    stored: Callable[[Any], int],
) -> Callable[[], Any]:
    return functools.partial(
        measured_choices,
        array,
        weight.output_axis,
        weight.input_axis,
        config,
        name=weight.name,
        stats=stats,
        damping=ACTIVATION_DAMPING,
        threads=threads,
        stored=stored,
    )


Job = Callable[[np.ndarray, Weight, Any, int, InputMoments | None], Callable[[], Any]]
# a Job with, last, the bytes the backend stores a result in
Measure = Callable[[np.ndarray, Weight, Any, int, InputMoments | None, Callable[[Any], int]], Callable[[], Any]]


@dataclass(frozen=True)
class Algorithm:
    """A compression as the driver runs it: ``job(array, weight, config, threads, statistics)`` returns a picklable
    call of the weight layer (``statistics``: the weight's :class:`~lowbit.statistics.InputMoments` from calibration
    data, or None); ``workers(config)`` is how many weights it runs at once by default; ``measure`` (the same
    arguments and, last, ``stored(result)``: the bytes the backend stores a result in), where the algorithm has a
    width to choose, returns the call measuring each width's :class:`~lowbit.budget.Choice` for a bits-per-weight
    budget."""

    name: str
    kind: str  # what it makes of a weight, for the report: palettized, quantized, sparse
    job: Job
    workers: Callable[[Any], int] = lambda config: 1
    measure: Measure | None = None


ALGORITHMS: dict[str, Algorithm] = {
    "palettize": Algorithm(
        "palettize", "palettized", _palettize_job, lambda config: config.num_kmeans_workers, _measure_job
    ),
    "quantize": Algorithm("quantize", "quantized", _quantize_job),
    "sparsify": Algorithm("sparsify", "sparse", _sparsify_job),
}


def default_executor(workers: int) -> Executor | None:
    """A pool of ``workers`` threads (None for one worker: run in this thread). The kernels release the GIL, so
    threads run them in parallel without pickling, without re-importing the user's script (which a process pool
    does: a script with no ``if __name__ == "__main__":`` guard would run again in every worker) and without
    worker processes that could outlive a killed parent."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowbit") if workers > 1 else None


def compress(
    backend: Backend[W],
    algorithm: Algorithm,
    config: Any,
    configs: WeightConfigs | None = None,
    executor: Executor | None = None,
    statistics: Mapping[str, InputMoments] | None = None,
    bits_per_weight: float | None = None,
) -> CompressionReport:
    """Compress every eligible weight of ``backend``'s program with ``algorithm`` in place; return the report.

    ``config`` is the call's config (a frozen dataclass of :mod:`lowbit.config` with ``weight_num_threshold``);
    ``configs`` varies it per weight or leaves weights out; ``executor`` runs the weight layer (default: a pool of
    ``algorithm.workers(config)`` threads); ``statistics`` holds calibration statistics by weight name (weights
    without an entry are compressed data-free, which the report notes when ``statistics`` is given);
    ``bits_per_weight`` (an algorithm with ``measure`` only) first measures every eligible weight at each width and
    chooses each one's width so that their compressed bytes stay within that many bits per element
    (:func:`lowbit.budget.allocate`; ``ValueError`` when no choice fits). A weight that cannot be compressed is
    reported as skipped, with a warning naming it and why (not for weights left out on purpose).
    """
    return _Driver(backend, algorithm, config, configs, executor, statistics, bits_per_weight).run()


class _Driver(Generic[W]):
    def __init__(
        self,
        backend: Backend[W],
        algorithm: Algorithm,
        config: Any,
        configs: WeightConfigs | None,
        executor,
        stats: Mapping[str, InputMoments] | None,
        bits_per_weight: float | None,
    ) -> None:
        if bits_per_weight is not None and algorithm.measure is None:
            raise ValueError(f"bits_per_weight needs an algorithm with widths to choose, not {algorithm.name!r}")
        self.backend, self.algorithm, self.statistics = backend, algorithm, stats or {}
        self.calibrated = stats is not None
        self.bits_per_weight = bits_per_weight
        self.allocation: dict[str, int] = {}  # weight name -> n_bits chosen for the budget
        self.selection = (configs or WeightConfigs()).selection(config)
        self.workers = algorithm.workers(config)
        self.executor = executor
        self.kernel_threads = 1  # threads a kernel may use: the workers when the kernels run in this thread

    def config_for(self, weight: W) -> Any:
        """The config of ``weight`` (None: left out by the per-weight configs), at its allocated width."""
        config = self.selection.lookup(weight.name, weight.op.split("+"))
        bits = self.allocation.get(weight.name)
        return config if config is None or bits is None else dataclasses.replace(config, n_bits=bits)

    def checked_config(self, weight: W) -> Any:
        """The config ``weight`` is compressed with; :class:`SkipWeight` when it is not to be compressed."""
        if weight.compression is not None:
            raise SkipWeight(f"already compressed ({weight.compression})")
        config = self.config_for(weight)
        if config is None:
            raise SkipWeight("left out by the per-weight configs", warn=False)
        check_eligible(weight.shape, self.backend.element_dtype(weight), config.weight_num_threshold)
        return config

    def plan(self, weights: Sequence[W]) -> list[tuple[W, Any]]:
        planned = []
        for weight in weights:
            with contextlib.suppress(SkipWeight):
                planned.append((weight, self.checked_config(weight)))
        return planned

    def run(self) -> CompressionReport:
        report = CompressionReport()
        weights = self.backend.weights()
        owned = self.executor is None
        # a pool only pays for itself with several weights to share out; with one, its kernel may use threads
        executor = default_executor(min(self.workers, len(weights))) if owned else self.executor
        self.kernel_threads = self.workers if executor is None else 1
        try:
            with blas_shared_by(self.workers if executor is not None else 1):
                weights = self.passes(weights, report, executor)
        finally:
            if owned and executor is not None:
                executor.shutdown()
        self.selection.warn_unmatched("op_name_configs", "weight", stacklevel=4)
        order = {weight.name: i for i, weight in enumerate(weights)}
        report.rows.sort(key=lambda r: order.get(r.name, math.inf))
        return report

    def passes(self, weights: Sequence[W], report: CompressionReport, executor: Executor | None) -> Sequence[W]:
        """The budget's measure (with ``bits_per_weight``), then the compression of every weight into ``report``;
        returns the weights as the program holds them before the compression's writes."""
        if self.bits_per_weight is not None:
            self.allocate(self.plan(weights), executor)
        plan = self.plan(weights)
        if plan and self.backend.prepare(plan):  # never change a program this pass leaves as it is
            weights = self.backend.weights()
        with (
            self.backend.writing(),
            tqdm(total=len(weights), desc=self.algorithm.name, unit="weight", disable=None, leave=False) as bar,
        ):
            for weight, outcome in self.outcomes(self.jobs(weights, report), executor):
                self.record(report, weight, outcome)
                bar.update()
            bar.update(len(weights) - bar.n)
        return weights

    def allocate(self, plan: Sequence[tuple[W, Any]], executor: Executor | None) -> None:
        """Measure each planned weight at every width and choose its width for the budget (``self.allocation``).
        A weight the measurement skips is left to the main pass, which skips it again and reports why."""
        assert self.algorithm.measure is not None and self.bits_per_weight is not None
        algorithm_measure = self.algorithm.measure

        def measure(array: np.ndarray, weight: Any, config: Any, threads: int, stats: InputMoments | None) -> Any:
            """The algorithm's measure, each width's bytes as the backend will store them."""
            return algorithm_measure(
                array, weight, config, threads, stats, lambda result: self.backend.stored_nbytes(weight, result, config)
            )

        choices = {}
        for weight, outcome in self.outcomes(self.jobs([w for w, _ in plan], None, measure), executor):
            try:
                choices[weight.name] = outcome()
            except SkipWeight:
                continue
            finally:
                self.backend.release(weight)
        numel = sum(weight.numel for weight, _ in plan if weight.name in choices)
        self.allocation = allocate(choices, self.bits_per_weight * numel / 8)

    def jobs(
        self, weights: Sequence[W], report: CompressionReport | None, job: Job | None = None
    ) -> Iterator[tuple[W, Callable]]:
        """Each weight's call of the weight layer (``job``, default the algorithm's); a weight that is not to be
        compressed is released and, with a ``report``, reported as skipped."""
        for weight in weights:
            try:
                config = self.checked_config(weight)
                array, stats = self.backend.read(weight), self.statistics.get(weight.name)
                yield weight, (job or self.algorithm.job)(array, weight, config, self.kernel_threads, stats)
            except SkipWeight as skip:
                self.backend.release(weight)
                if report is not None:
                    self.skip(report, weight, skip)

    def outcomes(self, jobs: Iterator[tuple[W, Callable]], executor: Executor | None) -> Iterator[tuple[W, Callable]]:
        """Each job's result getter, in order; at most ``2 x workers`` jobs in flight, to bound memory."""
        if executor is None:
            yield from jobs
            return
        window = max(2, 2 * self.workers)
        pending: list[tuple[W, Future]] = []
        for weight, job in jobs:
            pending.append((weight, executor.submit(job)))
            if len(pending) >= window:
                weight0, future = pending.pop(0)
                yield weight0, future.result
        for weight0, future in pending:
            yield weight0, future.result

    def record(self, report: CompressionReport, weight: W, outcome: Callable[[], Any]) -> None:
        try:
            result = outcome()
            config = self.config_for(weight)
            stored = self.backend.stored_nbytes(weight, result, config)
            if stored >= weight.nbytes:
                raise SkipWeight(f"compressed it would take {stored} bytes, not fewer than its {weight.nbytes}")
            after = self.backend.write(weight, result, config)
        except SkipWeight as skip:
            self.skip(report, weight, skip)
            return
        finally:
            self.backend.release(weight)
        report.rows.append(
            WeightResult(
                weight.name,
                weight.op,
                weight.shape,
                weight.nbytes,
                after,
                result.rel_mse,
                None,
                self.algorithm.kind,
                "; ".join(filter(None, [self.allocated(weight), self.uncalibrated(weight), self.backend.note(weight)]))
                or None,
            )
        )

    def allocated(self, weight: W) -> str | None:
        """The report's note of a width chosen for the budget."""
        bits = self.allocation.get(weight.name)
        return None if bits is None or self.bits_per_weight is None else allocation_note(bits, self.bits_per_weight)

    def uncalibrated(self, weight: W) -> str | None:
        """The report's note of a weight compressed data-free in a calibrated call (no statistics reach it: shared,
        or read by an op calibration does not tap)."""
        missing = self.calibrated and weight.name not in self.statistics
        return "data-free: no calibration statistics" if missing else None

    def skip(self, report: CompressionReport, weight: W, skip: SkipWeight) -> None:
        warn_skipped(weight.name, skip)
        report.rows.append(
            WeightResult(weight.name, weight.op, weight.shape, weight.nbytes, weight.nbytes, skipped=skip.reason)
        )
