"""Mixed bits to a budget (issue 26): each weight is palettized at every width of :data:`BUDGET_BITS`, each result's
bytes and error are measured, and the widths are chosen so that the weights' total size stays within
``bits_per_weight`` times their element count while the summed error is smallest. Both doors call it, so the same
weights and statistics get the same allocation. Imports neither onnx nor torch.

The error of a width is what the data says about the weight:

- a per-element ``sensitivity`` (SKM's diagonal Fisher: the loss change, comparable across weights): ``sum s dW^2``;
- input-activation statistics (calibration): the layer's relative output error ``||X dW|| / ||X W||`` squared,
  from ``X^T X`` (its diagonal for a weight of more than two axes);
- nothing: the relative weight error (the output error for white inputs).

Relative errors make weights with unlike output scales comparable; each counts once per weight, so a small weight
with a large error is upgraded before a large one gains a little (see ``benchmarks/data_aware.py``'s mixed rows).

The allocation solves this multiple-choice knapsack by dynamic programming over the budget (tested against brute
force).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.config import PalettizeConfig
from lowbit.errors import SkipWeight
from lowbit.kernels.feedback import FACTORS_KEPT_BYTES, ordered_factor
from lowbit.parallel import blas_shared_by
from lowbit.statistics import InputMoments
from lowbit.weights.palettize import feeds_back, palettize_weight

__all__ = [
    "BUDGET_BITS",
    "DEFERRED_BITS",
    "Choice",
    "Measurable",
    "allocate",
    "allocate_measuring",
    "allocation_note",
    "check_bits_per_weight",
    "measured_choices",
    "measured_together",
    "relative_output_error",
]

BUDGET_BITS = (2, 3, 4, 6, 8)  # the widths a budget chooses from
# the widths whose error feedback a measure may put off until an allocation picks them (Measurable.deferred): 8 bits
# took ~17 % of a SmolLM2 weight's measure (five widths with feedback) and 3.5 bits per weight never chose it
DEFERRED_BITS = (8,)


def check_bits_per_weight(value: Any) -> float | None:
    """``bits_per_weight`` as given (None: no budget), else ``TypeError`` / ``ValueError``: a finite number above
    the narrowest width, ``BUDGET_BITS[0]`` (its tables take some bits too)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"bits_per_weight must be a number or None, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= BUDGET_BITS[0]:
        raise ValueError(
            f"bits_per_weight must be a finite number above {BUDGET_BITS[0]} (the widths are {set(BUDGET_BITS)}; "
            f"tables, scales and outliers count too), got {value}"
        )
    return float(value)


def allocation_note(n_bits: int, bits_per_weight: float) -> str:
    """What a report says about a width chosen for the budget."""
    return f"{n_bits}-bit for the {bits_per_weight:g} bits/weight budget"


@dataclass(frozen=True)
class Choice:
    """One width of one weight: its ``n_bits``, the bytes of its compressed form and its error; ``bound``: the
    error is not measured yet, only bounded below (by 0: a width whose measure was deferred, see
    :class:`Measurable`), so an allocation that gives the weight this width must measure it and allocate again."""

    n_bits: int
    nbytes: int
    error: float
    bound: bool = False


def relative_output_error(array: np.ndarray, decoded: np.ndarray, input_axis: int, stats: InputMoments | None) -> float:
    """``||X (decoded - array)||^2 / ||X array||^2`` over the calibration rows of ``stats`` (the full ``X^T X`` of
    a 2-D weight when kept, else its diagonal); without ``stats`` the relative weight error."""
    return _error_measure(array, input_axis, stats, None)(decoded)


def _error_measure(
    array: np.ndarray,
    input_axis: int,
    stats: InputMoments | None,
    sensitivity: np.ndarray | None,
    output_weights: np.ndarray | None = None,
) -> Callable[[np.ndarray], float]:
    """The error of a decode of ``array``: ``sum sensitivity dW^2`` with a ``sensitivity``; with ``output_weights``
    (each output channel's mean squared loss gradient) and the whole ``X^T X``, the loss change the layer's output
    error makes, ``sum_n s_n dW_n X^T X dW_n`` (the Fisher information of the outputs, K-FAC's factoring); else the
    relative output error (:func:`relative_output_error`). What does not depend on the decode is computed once."""
    if sensitivity is not None:
        exact = array.astype(np.float64)

        def weighted(decoded: np.ndarray) -> float:
            diff = decoded.astype(np.float64) - exact
            return float(np.vdot(diff * sensitivity, diff))

        return weighted
    gram = None if stats is None else stats.gram

    def by_input(values: np.ndarray, dtype: type) -> np.ndarray:
        """``values`` in ``dtype``, input channels first (a convolution's with its kernel positions), the rest
        flattened."""
        typed: np.ndarray = values.astype(dtype, copy=False)
        if stats is not None:
            return stats.channels_first(typed, input_axis)
        return np.moveaxis(typed, input_axis, 0).reshape(array.shape[input_axis], -1)

    if output_weights is not None and gram is not None and gram.ndim == 2:
        # in float32 (as X^T X was summed), the change included: a third of float64's time on SmolLM2's weights, the
        # errors within 1e-7 of it and the same widths
        h, s, exact = (
            gram.astype(np.float32),
            np.asarray(output_weights, np.float64).reshape(-1),
            by_input(array, np.float32),
        )

        def loss_change(decoded: np.ndarray) -> float:
            d = np.subtract(by_input(decoded, np.float32), exact)
            return float(np.einsum("kn,kn->n", h @ d, d) @ s)

        return loss_change
    w = by_input(array, np.float64)

    def change(decoded: np.ndarray) -> np.ndarray:
        """``decoded - array``, input channels first, as ``w``."""
        return by_input(decoded, np.float64) - w

    def energy(x: np.ndarray) -> float:
        if stats is None:
            return float(np.vdot(x, x))
        if gram is not None:  # a grouped convolution's: each group's [pairs, outputs] under its block
            return float(np.vdot(x, gram @ x))
        return float(stats.channel_weights() @ (x * x).sum(-1).reshape(-1))

    reference = max(energy(w), np.finfo(np.float64).tiny)

    def relative(decoded: np.ndarray) -> float:
        return energy(change(decoded)) / reference

    return relative


def measured_choices(
    array: np.ndarray,
    output_axis: int,
    input_axis: int,
    config: PalettizeConfig,
    name: str = "",
    stats: InputMoments | None = None,
    sensitivity: np.ndarray | None = None,
    damping: float = 0.0,
    threads: int = 1,
    stored: Callable[[Any], int] | None = None,
    output_weights: np.ndarray | None = None,
    feedback: bool = False,
    keep: Callable[[int, Any], None] | None = None,
) -> tuple[Choice, ...]:
    """``array`` palettized as ``config`` says at each width of :data:`BUDGET_BITS`, on ``threads`` threads (the
    widths side by side, up to five; the threads left over share each width's k-means; the result does not depend
    on them), weighted as the final pass will be: by the calibration ``stats``,
    else by ``sensitivity`` damped by ``damping``. Returns each width's :class:`Choice`: bytes (``stored(result)``,
    default the weight layer's count: what the door stores) and error (with ``output_weights``, each output
    channel's mean squared loss gradient, and the whole ``X^T X``: the loss change, see :func:`_error_measure`).

    ``feedback`` (default False): each width gets the error feedback of ``stats``' whole ``X^T X``, as the
    compression gives it, so that its error is that of the codes written. ``keep(n_bits, result)``, when given,
    receives each width's palettization (e.g. to write the chosen one without palettizing it again).

    Raises what :func:`~lowbit.weights.palettize_weight` raises."""
    weight = Measurable(
        array,
        output_axis,
        input_axis,
        config,
        name=name,
        stats=stats,
        sensitivity=sensitivity,
        damping=damping,
        stored=stored,
        output_weights=output_weights,
        feedback=feedback,
        keep=keep,
    )
    (outcome,) = measured_together([weight], threads)
    if isinstance(outcome, SkipWeight):
        raise outcome
    return outcome


@dataclass(frozen=True, eq=False)
class Measurable:
    """A weight to measure at every width: :func:`measured_choices`' parameters but ``threads``; ``widths``: those to
    measure (default every width of :data:`BUDGET_BITS`); ``deferred``: among them, those whose error feedback is
    put off (the widest, where it costs most and a budget seldom goes): palettized for their bytes alone, their
    error bounded by 0 (:attr:`Choice.bound`), not kept. Without feedback every width is measured."""

    array: np.ndarray
    output_axis: int
    input_axis: int
    config: PalettizeConfig
    name: str = ""
    stats: InputMoments | None = None
    sensitivity: np.ndarray | None = None
    damping: float = 0.0
    stored: Callable[[Any], int] | None = None
    output_weights: np.ndarray | None = None
    feedback: bool = False
    keep: Callable[[int, Any], None] | None = None
    widths: tuple[int, ...] = BUDGET_BITS
    deferred: tuple[int, ...] = ()

    @property
    def gram(self) -> np.ndarray | None:
        """The ``X^T X`` whose error feedback each width gets."""
        return self.stats.gram if self.feedback and self.stats is not None else None

    def measure(self, threads: int) -> Callable[[int], Choice]:
        """``measured(n_bits)``: the :class:`Choice` of one width, its k-means on ``threads`` threads."""
        stats, array = self.stats, self.array
        importance, damping = (
            (self.sensitivity, self.damping) if stats is None else stats.weighting(array.shape, self.input_axis)
        )
        error_of = _error_measure(array, self.input_axis, stats, self.sensitivity, self.output_weights)

        def measured(bits: int) -> Choice:
            config = dataclasses.replace(self.config, n_bits=bits)
            gram = self.gram
            fed = gram is not None and feeds_back(config, array.shape, self.output_axis, self.input_axis)
            deferred = bits in self.deferred and fed
            result = palettize_weight(
                array,
                self.output_axis,
                config,
                self.name,
                importance,
                threads,
                damping,
                None if deferred else gram,
                self.input_axis,
            )
            nbytes = result.nbytes if self.stored is None else self.stored(result)
            if deferred:  # the feedback keeps the LUTs, hence the bytes
                return Choice(bits, nbytes, 0.0, bound=True)
            if self.keep is not None:
                self.keep(bits, result)
            return Choice(bits, nbytes, error_of(result.decode()))

        return measured


def measured_together(weights: Sequence[Measurable], threads: int = 1) -> list[tuple[Choice, ...] | SkipWeight]:
    """Each of ``weights`` at its widths (:func:`measured_choices`), every (weight, width) on one pool of up to
    ``threads`` threads, the largest weights' widest widths first, their deferred ones (the cheapest) last (so that
    no thread waits at the end of each weight: a block's seven SmolLM2 weights measured one after another took 1.1x
    as long); the threads left over share each width's k-means. A weight's arrays are prepared when its first width
    starts and dropped after its last; the caller bounds how many weights it passes at once (their arrays). A weight
    that cannot be palettized gives the :class:`SkipWeight` of its widest width that fails, the others are
    measured; other errors are raised."""
    tasks = sorted(
        ((i, bits) for i, weight in enumerate(weights) for bits in weight.widths),
        key=lambda task: (-weights[task[0]].array.size, task[0], task[1] in weights[task[0]].deferred, -task[1]),
    )
    workers = max(1, min(threads, len(tasks)))
    measures = [_Once(weight, max(1, threads // workers)) for weight in weights]

    def measured(task: tuple[int, int]) -> Choice | SkipWeight:
        index, bits = task
        try:
            return measures[index](bits)
        except SkipWeight as skip:
            return skip

    if workers == 1:
        results = list(map(measured, tasks))
    else:
        grams = _kept_factors([weights[i] for i, _ in tasks])
        with (
            blas_shared_by(workers, threads),
            ThreadPoolExecutor(workers + bool(grams), thread_name_prefix="lowbit-widths") as pool,
        ):
            if grams:  # the feedback's factors of X^T X, computed beside the widths, not while a width waits
                pool.submit(lambda: [ordered_factor(g) for g in grams])
            results = list(pool.map(measured, tasks))
    outcomes: dict[int, dict[int, Choice | SkipWeight]] = {}
    for (index, bits), outcome in zip(tasks, results, strict=True):
        outcomes.setdefault(index, {})[bits] = outcome
    return [_choices_or_skip(outcomes[i], weight.widths) for i, weight in enumerate(weights)]


def _choices_or_skip(
    by_bits: Mapping[int, Choice | SkipWeight], widths: Sequence[int]
) -> tuple[Choice, ...] | SkipWeight:
    """A weight's choices, ascending, or the :class:`SkipWeight` of its widest failing width."""
    ascending = [by_bits[bits] for bits in sorted(widths)]
    failed = [outcome for outcome in ascending[::-1] if isinstance(outcome, SkipWeight)]
    return failed[0] if failed else tuple(outcome for outcome in ascending if isinstance(outcome, Choice))


def _kept_factors(in_order: Sequence[Measurable]) -> list[np.ndarray]:
    """The distinct ``X^T X`` of the weights (in the order their widths run) whose feedback factors are worth
    computing ahead: those the factor cache keeps (:data:`~lowbit.kernels.feedback.FACTORS_KEPT_BYTES`) without one
    evicting another before its widths read it (a larger one is computed by its first width, and not kept)."""
    chosen: dict[int, np.ndarray] = {}
    room = FACTORS_KEPT_BYTES
    for weight in in_order:
        shape, axes = weight.array.shape, (weight.output_axis, weight.input_axis)
        gram = weight.gram if feeds_back(weight.config, shape, *axes) else None
        if gram is None or gram.ndim != 2 or id(gram) in chosen:  # a grouped conv's blocks: factored as they come
            continue
        factor_bytes = 8 * gram.shape[0] * (gram.shape[0] + 1)  # the factor and the order
        if factor_bytes > room:
            break
        chosen[id(gram)] = gram
        room -= factor_bytes
    return list(chosen.values())


class _Once:
    """A weight's :meth:`Measurable.measure`, prepared by the first of its widths to run and dropped after the last
    (the prepared arrays of only the weights in flight are held); a width whose preparation fails counts too."""

    def __init__(self, weight: Measurable, threads: int) -> None:
        self.weight, self.threads, self.left = weight, threads, len(weight.widths)
        self.lock = threading.Lock()
        self.prepared: Callable[[int], Choice] | None = None

    def __call__(self, bits: int) -> Choice:
        try:
            with self.lock:
                if self.prepared is None:
                    self.prepared = self.weight.measure(self.threads)
                prepared = self.prepared
            return prepared(bits)
        finally:
            with self.lock:
                self.left -= 1
                if not self.left:
                    self.prepared = None


UNITS = 1 << 16  # the budget's resolution in the allocation's dynamic program


def allocate(choices: Mapping[str, Sequence[Choice]], budget_bytes: float) -> dict[str, int]:
    """``{weight name: n_bits}`` whose bytes sum to at most ``budget_bytes`` with the smallest summed error.

    A dynamic program over the budget in :data:`UNITS` steps, each choice's bytes rounded up to a whole step. The
    table runs one step per weight past the budget (as far as the rounding can push an allocation that fits), and
    the largest capacity whose best allocation fits in exact bytes is taken: the optimum itself whenever that is
    the one found there, never worse than the optimum of the budget less one step per weight. The bytes left over
    are then spent on the single changes that save the most error per byte. ``ValueError`` when every weight's
    smallest choice together exceeds the budget."""
    return _filled(choices, _scanned(choices, budget_bytes)[0], budget_bytes)


def _scanned(
    choices: Mapping[str, Sequence[Choice]], budget_bytes: float
) -> tuple[dict[str, Choice], dict[str, set[int]]]:
    """:func:`allocate`'s dynamic program and scan, before the bytes left over are spent: the allocation, and the
    widths whose errors are only bounded (:attr:`Choice.bound`) in the best allocations the scan passed over (over
    the budget in exact bytes), by weight name."""
    names = list(choices)
    smallest = sum(min(c.nbytes for c in choices[name]) for name in names)
    if smallest > budget_bytes:
        raise ValueError(
            f"bits_per_weight is too small: every weight at its narrowest ({BUDGET_BITS[0]} bits) already takes "
            f"{smallest} bytes, over the budget of {budget_bytes:.0f}"
        )
    unit, capacity = budget_bytes / UNITS, UNITS + len(names)
    error = np.zeros(capacity + 1)  # the least summed error of the weights so far within each number of steps
    picks = []
    for name in names:
        units = [math.ceil(c.nbytes / unit - 1e-9) for c in choices[name]]
        best, pick = np.full(capacity + 1, np.inf), np.zeros(capacity + 1, np.int8)
        for j, (u, c) in enumerate(zip(units, choices[name], strict=True)):
            if u <= capacity:
                candidate = error[: capacity + 1 - u] + c.error
                better = candidate < best[u:]
                best[u:][better], pick[u:][better] = candidate[better], j
        error = best
        picks.append((units, pick))

    def allocation(steps: int) -> dict[str, Choice]:
        at = {}
        for name, (units, pick) in zip(reversed(names), reversed(picks), strict=True):
            at[name] = choices[name][int(pick[steps])]
            steps -= units[int(pick[steps])]
        return at

    passed: dict[str, set[int]] = {}
    for steps in range(capacity, -1, -1):
        if np.isfinite(error[steps]):
            at = allocation(steps)
            if sum(c.nbytes for c in at.values()) <= budget_bytes:
                return at, passed
            for name, choice in at.items():
                if choice.bound:
                    passed.setdefault(name, set()).add(choice.n_bits)
    # only the rounding kept every allocation out: the smallest choices fit in exact bytes
    return {n: min(choices[n], key=lambda c: (c.nbytes, c.error)) for n in names}, passed


def allocate_measuring(
    choices: Mapping[str, Sequence[Choice]],
    budget_bytes: float,
    measure: Callable[[list[str]], Mapping[str, Sequence[Choice]]],
) -> dict[str, int]:
    """:func:`allocate` where some choices' errors are only bounded (:attr:`Choice.bound`): while the allocation
    gives a weight such a width, or the scan passed over an allocation that does (one whose true errors might have
    fitted where the bound did not), ``measure(names)`` measures those weights at their bounded widths (each name's
    measured choices) and the allocation runs again. A bound is never above the error it stands for, so once none is
    in the allocation nor in those passed over, every step the scan looked at holds the allocation the true errors
    give it: the allocation is the one every width measured first gives (but for ties). A bound ``measure`` leaves
    unmeasured is dropped. ``ValueError`` as :func:`allocate`, and when a weight is left with no choice."""
    options = {name: tuple(found) for name, found in choices.items()}
    while True:
        at, pending = _scanned(options, budget_bytes)
        allocation = _filled(options, at, budget_bytes)
        for name, bits in allocation.items():
            if any(c.bound and c.n_bits == bits for c in options[name]):
                pending.setdefault(name, set()).add(bits)
        if not pending:
            return allocation
        measured = measure(sorted(pending))
        for name, widths in pending.items():
            options[name] = _resolved(options[name], measured.get(name, ()), widths)
            if not options[name]:
                raise ValueError(f"{name!r} has no measured choice left: measure gave none of its bounded widths")


def _resolved(options: Sequence[Choice], measured: Sequence[Choice], pending: set[int]) -> tuple[Choice, ...]:
    """``options`` with each bound replaced by its ``measured`` choice; a ``pending`` width's bound left unmeasured
    dropped (so that no allocation picks it again)."""
    by_bits = {c.n_bits: c for c in measured if not c.bound}
    resolved = []
    for choice in options:
        if choice.bound and choice.n_bits in by_bits:
            resolved.append(by_bits[choice.n_bits])
        elif not (choice.bound and choice.n_bits in pending):
            resolved.append(choice)
    return tuple(resolved)


def _filled(choices: Mapping[str, Sequence[Choice]], at: dict[str, Choice], budget_bytes: float) -> dict[str, int]:
    """``at`` with the bytes the rounding left over spent: the single changes of one weight's choice that fit and
    save the most error per byte, one at a time."""
    spent = sum(c.nbytes for c in at.values())
    while True:
        moves = [
            ((at[name].error - c.error) / max(c.nbytes - at[name].nbytes, 1), name, c)
            for name, options in choices.items()
            for c in options
            if c.error < at[name].error and spent - at[name].nbytes + c.nbytes <= budget_bytes
        ]
        if not moves:
            return {name: c.n_bits for name, c in at.items()}
        _, name, c = max(moves, key=lambda m: m[0])
        spent += c.nbytes - at[name].nbytes
        at[name] = c
