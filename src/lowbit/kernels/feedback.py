"""Error feedback across input channels (GPTQ's): codes chosen one input channel at a time, each channel's rounding
error pushed onto the channels not yet coded, in proportion to how the calibration activations correlate them, so
that the layer's output error ``||X W - X W_q||`` is what is kept small rather than each weight's own error.

Arrays in, arrays out. The grid the weights land on is data (:class:`Grid`: a LUT per output channel, a linear
quantizer's scales and zero points, or pruning's kept set), so the row-by-row loop runs compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import numba
import numpy as np

from lowbit.parallel import blas_shared_by

T = TypeVar("T")

__all__ = [
    "FEEDBACK_DAMPING",
    "Fed",
    "Grid",
    "by_groups",
    "damped_gram",
    "feedback",
    "grouped_feedback",
    "inverse_factor",
    "kept_by_gram",
    "linear_grid",
    "lut_grid",
    "ordered_factor",
    "ordered_feedback",
]

CODES = np.int16  # the codes' dtype: every LUT index (< 256) and linear code (int8 / uint8 and narrower)
# equal-width buckets per LUT entry in a LUT's index of where to start looking for a value's nearest entry (one or two
# steps from there). One SmolLM2 gate projection's act-order feedback, per-channel LUTs, against a bisection (best of
# five): 4-bit 62-64 -> 51-53 ms, 8-bit 113 -> 75 ms, 2-bit 49 -> 52-55 ms (1 bucket per entry: 4-bit and 8-bit slower)
BUCKETS_PER_ENTRY = 2
FEEDBACK_DAMPING = 0.01  # of the mean diagonal, added to X^T X's diagonal before it is inverted (GPTQ's percdamp)
BLOCK = 128  # rows whose updates run eagerly; the rows after a block get its updates in one product (GPTQ's lazy)
COLUMNS = 256  # output channels the feedback runs on at a time (threads take such spans; the same on any count)


def _none(dtype: type = np.float64) -> np.ndarray:
    return np.zeros((0, 0), dtype)


@dataclass(frozen=True)
class Grid:
    """Where the weights of a ``[K, N]`` matrix (rows: its K input channels) may land.

    ``luts`` ``[N, L]``: each output channel's scalar LUT, sorted, with ``lut_codes`` ``[N, L]`` the code each
    sorted entry writes (the nearest entry; the smallest code on a tie) and ``buckets`` ``[N, B]`` an index into
    it: the first entry at or above each of B equal steps from ``bucket_low`` (the smallest entry), ``bucket_scale``
    steps per unit, from where the nearest entry is usually a step or two away; else (no columns) the linear
    grid of ``scale`` / ``zero_point`` ``[K, N]`` per element, codes rounded half to even and clipped to
    ``[low, high]`` (scale 0: the zero point). ``exact`` ``[K, N]`` (or empty): elements kept as they are (outliers;
    with all-zero LUTs, pruning's kept weights: SparseGPT's update of a fixed mask), which push no error on. Built by
    :func:`lut_grid` and :func:`linear_grid`; ``scale``, ``zero_point`` and ``exact`` are indexed by input channel,
    not by row order.
    """

    luts: np.ndarray = field(default_factory=_none)
    lut_codes: np.ndarray = field(default_factory=lambda: _none(np.int64))
    buckets: np.ndarray = field(default_factory=lambda: _none(np.int16))
    bucket_low: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bucket_scale: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale: np.ndarray = field(default_factory=_none)
    zero_point: np.ndarray = field(default_factory=_none)
    low: int = 0
    high: int = 0
    exact: np.ndarray = field(default_factory=lambda: _none(np.bool_))

    def __post_init__(self) -> None:
        rows, entries = self.luts.shape
        indexed = self.buckets.shape == (rows, BUCKETS_PER_ENTRY * entries)
        indexed = indexed and self.bucket_low.shape == self.bucket_scale.shape == (rows,)
        if self.luts.shape[1] > 0 and (self.lut_codes.shape != self.luts.shape or not indexed):
            raise ValueError("a LUT grid needs lut_codes of the LUTs' shape and an index: build it with lut_grid(luts)")

    def nearest(self, values: np.ndarray, channel: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes, decoded values) of one input channel's ``values`` [N] with no feedback (plain rounding)."""
        codes = np.empty(values.shape, CODES)
        work = np.array(values, np.float64, ndmin=2)
        _rows(work, np.ones((1, 1)), np.array([channel]), 0, 1, *self._arrays(), codes[None], np.empty_like(work))
        return codes, work[0]

    def columns(self, start: int, stop: int) -> Grid:
        """The grid of output channels ``start:stop``."""

        def part(array: np.ndarray, by_column: bool) -> np.ndarray:
            if array.shape[0] == 0:
                return array
            return np.ascontiguousarray(array[:, start:stop] if by_column else array[start:stop])

        return Grid(
            luts=part(self.luts, False),
            lut_codes=part(self.lut_codes, False),
            buckets=part(self.buckets, False),
            bucket_low=part(self.bucket_low, False),
            bucket_scale=part(self.bucket_scale, False),
            scale=part(self.scale, True),
            zero_point=part(self.zero_point, True),
            low=self.low,
            high=self.high,
            exact=part(self.exact, True),
        )

    def _arrays(
        self,
    ) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int, np.ndarray
    ]:
        """The fields in :func:`_rows`' order."""
        lut = (self.luts, self.lut_codes, self.buckets, self.bucket_low, self.bucket_scale)
        return (*lut, self.scale, self.zero_point, self.low, self.high, self.exact)


def lut_grid(luts: np.ndarray, exact: np.ndarray | None = None) -> Grid:
    """The grid of scalar LUTs, one per output channel: ``luts`` ``[N, L]`` (sorted or not; a code indexes its
    channel's row); ``exact`` as in :class:`Grid`."""
    values = np.asarray(luts, dtype=np.float64)
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.ascontiguousarray(np.take_along_axis(values, order, axis=1))
    for entry in range(1, ordered.shape[1]):  # equal entries write the smallest code of their run
        repeated = ordered[:, entry] == ordered[:, entry - 1]
        order[repeated, entry] = order[repeated, entry - 1]
    low, scale, buckets = _bucket_index(ordered)
    grid = Grid(ordered, np.ascontiguousarray(order, np.int64), buckets, low, scale)
    return _with_exact(grid, exact)


def _bucket_index(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, steps per unit, buckets) of sorted LUTs ``[N, L]``: :class:`Grid`'s index. Where a value's step lands
    need not be exact: the search walks from the bucket's entry to the first entry at or above the value."""
    count = BUCKETS_PER_ENTRY * ordered.shape[1]
    low = ordered[:, 0].copy()
    width = (ordered[:, -1] - low) / count
    with np.errstate(divide="ignore", over="ignore"):
        scale = np.where(width > 0, 1.0 / np.where(width > 0, width, 1.0), 0.0)
    buckets = np.empty((ordered.shape[0], count), np.int16)
    _fill_buckets(ordered, low, width, buckets)
    return low, scale, buckets


@numba.njit(cache=True, nogil=True)
def _fill_buckets(ordered, low, width, buckets):
    """``buckets[n, b]``: the first entry of ``ordered[n]`` at or above ``low[n] + b * width[n]``."""
    for n in range(ordered.shape[0]):
        at = 0
        for b in range(buckets.shape[1]):
            edge = low[n] + width[n] * b
            while at < ordered.shape[1] and ordered[n, at] < edge:
                at += 1
            buckets[n, b] = at


def linear_grid(scale: np.ndarray, zero_point: np.ndarray, low: int, high: int) -> Grid:
    """The grid of a linear quantizer: ``scale`` / ``zero_point`` ``[K, N]`` per element (each block's repeated),
    codes in ``[low, high]``."""
    as_float = [np.ascontiguousarray(a, dtype=np.float64) for a in (scale, zero_point)]
    return Grid(scale=as_float[0], zero_point=as_float[1], low=int(low), high=int(high))


def _with_exact(grid: Grid, exact: np.ndarray | None) -> Grid:
    return grid if exact is None else dataclasses.replace(grid, exact=np.ascontiguousarray(exact, np.bool_))


def inverse_factor(gram: np.ndarray, damping: float = FEEDBACK_DAMPING) -> np.ndarray:
    """The upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1``, ``H = X^T X`` (channels never active
    get a unit diagonal): the row-by-row form of the inverse the feedback needs."""
    inverse = np.linalg.inv(damped_gram(gram, damping))
    return np.linalg.cholesky((inverse + inverse.T) / 2).T


def damped_gram(gram: np.ndarray, damping: float) -> np.ndarray:
    """``H + damping * mean(diag H) * I`` in float64, a channel never active given a unit diagonal."""
    h = np.array(gram, dtype=np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damping * max(float(np.mean(np.diag(h))), 1e-12)
    return h


def feedback(
    w: np.ndarray,
    factor: np.ndarray,
    grid: Grid,
    block: int = BLOCK,
    channels: np.ndarray | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(codes, the values the feedback ends with) of ``w`` ``[K, N]`` (rows: the K input channels, coded in
    order), each row's rounding error fed to the rows after it through ``factor`` (:func:`inverse_factor`);
    ``channels[row]``: a row's input channel when ``w``'s rows are reordered (default: in order). Updates within
    ``block`` rows run eagerly, then reach the rows after in one product (GPTQ's lazy batches); ``block >= K`` is
    the plain recurrence. The output channels never mix: they run in spans of :data:`COLUMNS`, on up to
    ``threads`` threads (the result does not depend on them)."""
    rows, outputs = w.shape
    channel_of = np.arange(rows) if channels is None else np.asarray(channels, np.int64)
    factor = np.ascontiguousarray(factor, dtype=np.float64)
    codes = np.empty(w.shape, CODES)
    values = np.empty(w.shape, np.float64)

    def run(start: int) -> None:
        stop = min(start + COLUMNS, outputs)
        part = grid if (start, stop) == (0, outputs) else grid.columns(start, stop)
        codes[:, start:stop], values[:, start:stop] = _columns(w[:, start:stop], factor, part, block, channel_of)

    spans = range(0, outputs, COLUMNS)
    workers = max(1, min(threads, len(spans)))
    if workers == 1:
        for start in spans:
            run(start)
        return codes, values
    with blas_shared_by(workers, threads), ThreadPoolExecutor(workers, thread_name_prefix="lowbit-feedback") as pool:
        list(pool.map(run, spans))
    return codes, values


def _columns(
    w: np.ndarray, factor: np.ndarray, grid: Grid, block: int, channel_of: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`feedback` of one span of output channels (``grid`` its own)."""
    work = np.array(w, dtype=np.float64, copy=True, order="C")
    rows = work.shape[0]
    codes = np.empty(work.shape, CODES)
    errors = np.empty((min(block, rows), work.shape[1]), np.float64)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        _rows(work, factor, channel_of, start, stop, *grid._arrays(), codes, errors)
        work[stop:] -= factor[start:stop, stop:].T @ errors[: stop - start]
    return codes, work


# the last factorizations computed, up to this many bytes, are kept for the next weights of the same X^T X (q / k /
# v, one weight at several widths); SmolLM2's largest is 19 MB, a 7B model's down projection's 0.97 GB (not kept)
FACTORS_KEPT_BYTES = 256 << 20
_factors: OrderedDict[tuple, tuple[np.ndarray, ...]] = OrderedDict()
_factors_bytes = [0]  # what ``_factors`` holds, kept as entries come and go (a depthwise conv adds one per channel)
_factors_lock = threading.Lock()
_computing: dict[tuple, Future] = {}


def kept_by_gram(
    kind: str, gram: np.ndarray, damping: float, compute: Callable[[np.ndarray], tuple[np.ndarray, ...]]
) -> tuple[np.ndarray, ...]:
    """``compute(gram)`` (arrays derived from ``gram`` alone: a factor, an eigendecomposition), made read-only and
    kept by the gram's content, ``kind`` and ``damping`` among the last ones computed (:data:`FACTORS_KEPT_BYTES` in
    all; a result larger than that is returned, not kept), so that the weights reading one activation factor it
    once, also when threads ask for it at the same time."""
    matrix = np.ascontiguousarray(gram)
    digest = hashlib.blake2b(matrix.data, digest_size=16).digest()
    key = (kind, digest, matrix.shape, matrix.dtype.str, float(damping))
    with _factors_lock:
        if key in _factors:
            _factors.move_to_end(key)
            return _factors[key]
        running = _computing.get(key)
        if running is None:
            running = _computing[key] = Future()
            owner = True
        else:
            owner = False
    if not owner:  # a second thread asking meanwhile takes the first one's result, or its error
        return running.result()
    try:
        found = _kept(key, compute(matrix))
        running.set_result(found)
        return found
    except BaseException as error:
        running.set_exception(error)
        raise
    finally:
        with _factors_lock:
            _computing.pop(key, None)


def _kept(key: tuple, found: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    for array in found:
        array.setflags(write=False)  # shared by every caller of the same gram
    size = sum(array.nbytes for array in found)
    if size > FACTORS_KEPT_BYTES:
        return found
    with _factors_lock:
        _factors[key] = found
        _factors_bytes[0] += size
        while _factors_bytes[0] > FACTORS_KEPT_BYTES:
            _, dropped = _factors.popitem(last=False)
            _factors_bytes[0] -= sum(array.nbytes for array in dropped)
    return found


def ordered_factor(gram: np.ndarray, damping: float = FEEDBACK_DAMPING) -> tuple[np.ndarray, np.ndarray]:
    """(the order the input channels are coded in, act-order: decreasing ``diag(gram)``; :func:`inverse_factor` of
    ``gram`` in that order), computed once per ``X^T X`` (:func:`kept_by_gram`): the weights reading one
    activation, or one weight at several widths, invert it once."""

    def compute(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(-np.diag(matrix), kind="stable")
        return order, inverse_factor(matrix[np.ix_(order, order)], damping)

    order, factor = kept_by_gram("act-order factor", gram, damping, compute)
    return order, factor


class Fed(NamedTuple):
    """What :func:`ordered_feedback` gives: the codes, the values the feedback ends with (both ``[K, N]``, in the
    weight's order) and their squared distance from the weight."""

    codes: np.ndarray
    values: np.ndarray
    squared_change: float


def ordered_feedback(
    w: np.ndarray,
    gram: np.ndarray,
    grid: Grid,
    damping: float = FEEDBACK_DAMPING,
    threads: int = 1,
) -> Fed:
    """:func:`feedback` (on up to ``threads`` threads) with the input channels coded in decreasing order of their
    activations' energy (``diag(X^T X)``, GPTQ's act-order: the channels that matter most are coded while the most
    rows can still absorb their error); codes and values returned in ``w``'s own order (:class:`Fed`). ``w`` is
    best C-contiguous: its rows are gathered in that order."""
    order, factor = ordered_factor(gram, damping)
    ordered = w[order]
    codes, values = feedback(ordered, factor, grid, channels=order, threads=threads)
    change = values - ordered  # both in the coding order, contiguous
    squared_change = float(np.vdot(change, change))
    del change, ordered  # before the gathers back into the weight's order
    back = np.argsort(order)
    return Fed(codes[back], values[back], squared_change)


def by_groups(w: np.ndarray, gram: np.ndarray, solve: Callable[[np.ndarray, np.ndarray, int, int], T]) -> list[T]:
    """``solve(columns, block, start, stop)`` for each group of a grouped convolution's ``w`` ``[K, N]`` (its ``N``
    output channels in ``G`` groups, ``start:stop`` each, contiguous) under its block of ``gram`` ``[G, K, K]``, one
    group after another (a depthwise conv's groups are small: on two threads its feedback took 0.23 s against 0.12 s
    for a [960, 1, 3, 3] weight)."""
    per = w.shape[1] // len(gram)
    spans = [(g * per, (g + 1) * per) for g in range(len(gram))]
    return [solve(np.ascontiguousarray(w[:, a:b]), block, a, b) for (a, b), block in zip(spans, gram, strict=True)]


def grouped_feedback(w: np.ndarray, gram: np.ndarray, grid: Grid, threads: int = 1) -> Fed:
    """:func:`ordered_feedback` of ``w`` ``[K, N]``, under ``gram`` ``[K, K]``, or ``[G, K, K]``: a grouped
    convolution's, fed back group by group (:func:`by_groups`; ``threads`` serve a 2-D ``gram`` only; a depthwise
    3 x 3 convolution: each output channel under its own 9 x 9)."""
    if gram.ndim == 2:
        return ordered_feedback(w, gram, grid, threads=threads)
    parts = by_groups(w, gram, lambda part, block, a, b: ordered_feedback(part, block, grid.columns(a, b)))
    codes, values = (np.concatenate([getattr(p, f) for p in parts], axis=1) for f in ("codes", "values"))
    return Fed(codes, values, sum(p.squared_change for p in parts))


@numba.njit(cache=True, nogil=True)
def _rows(
    work,
    factor,
    channel_of,
    start,
    stop,
    luts,
    lut_codes,
    buckets,
    bucket_low,
    bucket_scale,
    scale,
    zero_point,
    low,
    high,
    exact,
    codes,
    errors,
):
    """Rows ``start..stop`` of :func:`feedback`: each row rounded to the grid, its error (over the factor's
    diagonal) into ``errors`` and onto the block's later rows."""
    n = work.shape[1]
    for i in range(stop - start):
        k = start + i
        channel = channel_of[k]
        pivot = factor[k, k]
        for j in range(n):
            value = work[k, j]
            if luts.shape[1] > 0:
                at = _nearest(luts[j], lut_codes[j], buckets[j], (value - bucket_low[j]) * bucket_scale[j], value)
                code, decoded = lut_codes[j, at], luts[j, at]
            else:
                s, z = scale[channel, j], zero_point[channel, j]
                steps = np.rint(value / s) if s != 0 else 0.0
                clipped = min(max(steps + z, low), high)
                code, decoded = int(clipped), (clipped - z) * s
            if exact.shape[0] > 0 and exact[channel, j]:
                decoded = value
            codes[k, j] = code
            errors[i, j] = (value - decoded) / pivot
            work[k, j] = decoded
        for later in range(k + 1, stop):
            f = factor[k, later]
            for j in range(n):
                work[later, j] -= f * errors[i, j]


@numba.njit(cache=True, nogil=True, inline="always")
def _nearest(ordered, codes, buckets, step, value):
    """The position in the sorted ``ordered`` of the entry nearest ``value`` (of two at the same distance, the one
    with the smaller code): the first entry at or above it is walked to from the start of the bucket ``step`` falls
    in (:func:`_bucket_index`; the step is rounded: the walk also goes back). A bucket holds one or two entries of a
    k-means LUT; a far outlier in a LUT crowds the others into a few buckets and the walk can take up to the LUT's
    length (a walk bounded by a bisection was measured slower on every LUT: SmolLM2 per-channel 8-bit 75 -> 88-113 ms,
    2-bit 52-55 -> 63 ms per weight)."""
    size = ordered.shape[0]
    last = buckets.shape[0] - 1
    bucket = 0 if not step > 0 else last if step >= last else int(step)  # NaN: the first
    low = buckets[bucket]
    while low < size and ordered[low] < value:
        low += 1
    while low > 0 and ordered[low - 1] >= value:
        low -= 1
    if low == size:
        return low - 1
    if low == 0:
        return 0
    below, above = value - ordered[low - 1], ordered[low] - value
    if below < above or (below == above and codes[low - 1] < codes[low]):
        return low - 1
    return low
