"""Calibration of Core AI programs: run a copy of the program in Core AI's runtime on the user's data with the
weights' activation inputs as the outputs of its main graph, and accumulate each weight's
:class:`~lowbit.statistics.InputMoments`, one feed at a time (:class:`lowbit.calibration.MomentSums`).

The copy is saved to a temporary asset (the runtime executes assets) and run in a child process
(:mod:`lowbit.coreai._capture`): the runtime keeps every output it returns, so a child is replaced once its outputs
pass :data:`CHILD_OUTPUT_BYTES`, and a runtime abort stops the child, not the caller. The caller runs no event loop
(a notebook's cell can calibrate).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lowbit.calibration import MomentSums, Tap, check_source, checked_feed, feeds_of, keeps_gram
from lowbit.coreai import _mlir
from lowbit.coreai.discovery import OP_TABLE, TRANSPOSE, CoreAIWeight
from lowbit.coreai.program import Program
from lowbit.kernels.patches import Window
from lowbit.statistics import InputMoments

__all__ = ["collect_input_moments"]

TAP_PREFIX = "lowbit.calibration."  # the names of the capture's outputs
# a runtime process is replaced once the outputs it returned pass this many bytes: it keeps them (see _capture)
CHILD_OUTPUT_BYTES = 1 << 30
_Inputs = dict[str, tuple[np.dtype | None, tuple[int | None, ...] | None]]  # the main graph's (dtype, dims) by name


def _only_reader(value: Any) -> tuple[Any, int] | None:
    """(the op, the operand) that alone reads ``value``, through transposes that have no other reader (None when
    anything else reads it: a shared weight gets no statistics)."""
    uses = list(value.uses)
    if len(uses) != 1:
        return None
    owner, index = uses[0].owner, uses[0].operand_number
    if owner.name == TRANSPOSE and index == 0:
        return _only_reader(owner.results[0])
    return owner, index


class _Read(NamedTuple):
    """What calibration reads for a weight: the value read with it, that value's channel axis and channel count
    (a grouped convolution's: every group's), whether it holds lookup indices, a convolution's window and groups."""

    value: Any
    axis: int
    channels: int
    lookup: bool = False
    window: Window | None = None
    groups: int = 1


def _activation(weight: CoreAIWeight) -> _Read | None:
    """What calibration reads for a dense weight read by one op of the main graph whose other input's channels meet
    the weight's input axis (a grouped convolution's: its groups' channels together; None: no statistic)."""
    reader = None if weight.compression is not None else _only_reader(weight.value)
    if reader is None or _mlir.graph_name(reader[0]) != "main":
        return None
    owner, index = reader
    operand = OP_TABLE.get(owner.name, {}).get(index)
    if operand is None or operand.activation is None:
        return None
    source, axis = operand.activation
    x = owner.operands[source]
    dims = _mlir.tensor_dims(x)
    if operand.lookup:  # indices [..., 1] into the weight's rows
        looked_up = weight.output_axis == 0 and dims is not None and dims[-1:] == (1,)
        return _Read(x, axis, weight.shape[0], True) if looked_up else None
    kernel = tuple(weight.shape[2:])
    found = (None, 1) if operand.window is None else _window(owner, operand.window, kernel, operand.transposed)
    if dims is None or found is None:
        return None
    per_group = 1 if operand.transposed else found[1]  # a convolution's weight holds one group's input channels
    channels = weight.shape[weight.input_axis] * per_group
    if dims[axis] != channels:  # dynamic channels
        return None
    return _Read(x, axis, channels, False, *found)


def _window(
    op: Any, operands: tuple[int, int, int], kernel: tuple[int, ...], transposed: tuple[int, int] | None = None
) -> tuple[Window, int] | None:
    """(the window of a convolution ``op`` whose weight has ``kernel``, its input padded already, its groups; a
    transposed one's padded by its ``transposed`` (padding, output padding) operands); None when these are not
    constants or its groups do not divide the weight's first axis (a convolution's output channels, a transposed
    one's input channels)."""
    found = []
    for index in (*operands, *(transposed or ())):
        owner = op.operands[index].owner
        if getattr(owner, "name", None) != "coreai.constant":
            return None
        found.append(tuple(_mlir.attribute_ints(owner)))
    strides, dilations, (groups,) = found[:3]
    outputs = _mlir.tensor_dims(op.operands[1])
    if groups < 1 or outputs is None or outputs[0] is None or outputs[0] % groups:
        return None
    pads, extra = (found[3], found[4]) if transposed else ((0,) * len(kernel), ())
    try:
        window = Window(
            kernel, strides, dilations, tuple((p, p) for p in pads), transposed=bool(transposed), output_padding=extra
        )
    except ValueError:
        return None
    return window, groups


def _taps(program: Program) -> tuple[list[Tap], list[Any]]:
    """The taps of ``program``'s weights, and the values they read (one output each, named ``TAP_PREFIX + i``)."""
    taps: list[Tap] = []
    values: list[Any] = []
    for weight in program.weights():
        read = _activation(weight)
        if read is None:
            continue
        index = next((i for i, v in enumerate(values) if v == read.value), len(values))
        if index == len(values):
            values.append(read.value)
        matrix = len(weight.shape) == 2 or read.window is not None
        full = not read.lookup and matrix and keeps_gram(read.channels, read.window, read.groups)
        name = f"{TAP_PREFIX}{index}"
        taps.append(Tap(weight.name, name, read.axis, read.channels, full, read.lookup, read.window, read.groups))
    return taps, values


def _typed(feed: dict[str, np.ndarray], inputs: _Inputs, index: int) -> dict[str, np.ndarray]:
    """``feed`` in the program's input types: floats cast to its float type (float64 arrays to float32), integers
    and booleans cast within their kind when every value survives (a tokenizer's int64 ids to int32);
    ``ValueError`` for anything else, and for a shape that does not fit the program's (its static dims)."""
    typed = {}
    for name, array in feed.items():
        dtype, dims = inputs[name]
        if dims is not None and not _fits(array.shape, dims):
            shape = "x".join("?" if d is None else str(d) for d in dims)
            raise ValueError(f"calibration feed {index}: input {name!r} has shape {array.shape}, the program's {shape}")
        if dtype is not None and array.dtype != dtype:
            cast = array.astype(dtype) if np.can_cast(array.dtype, dtype, "same_kind") else None
            if cast is None or (cast.dtype.kind != "f" and not np.array_equal(cast, array)):
                problem = f"input {name!r} is {array.dtype}, the program takes {dtype}"
                raise ValueError(f"calibration feed {index}: {problem}")
            array = cast
        typed[name] = np.ascontiguousarray(array)
    return typed


def _fits(shape: tuple[int, ...], dims: tuple[int | None, ...]) -> bool:
    """Whether ``shape`` has ``dims``' rank and every static dim of it."""
    return len(shape) == len(dims) and all(d is None or d == n for n, d in zip(shape, dims, strict=True))


class _Child:
    """A runtime process (:mod:`lowbit.coreai._capture`) serving the capture asset at ``path``; a context manager
    that stops it (at once when leaving on an exception). ``ValueError`` naming the feed when it reports an error or
    stops."""

    def __init__(self, path: Path, taps: list[Tap]) -> None:
        self.connection, theirs = multiprocessing.Pipe()
        paths = os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)  # this process's lowbit
        # -P: not the working directory first on the child's path (a coreai.py there is not the package)
        command = [sys.executable, "-P", "-m", "lowbit.coreai._capture", str(theirs.fileno()), str(path)]
        self.process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), env={**os.environ, "PYTHONPATH": paths})
        theirs.close()
        try:
            self.ask((taps, CHILD_OUTPUT_BYTES), None)
        except BaseException:
            self.stop(at_once=True)
            raise

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.stop(at_once=kind is not None)

    def stop(self, at_once: bool) -> None:
        """Close the connection and wait for the child (killed first when ``at_once``, or after a minute)."""
        self.connection.close()
        if at_once:
            self.process.kill()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def ask(self, message: Any, index: int | None) -> tuple[str, Any]:
        """Send ``message`` about feed ``index`` (None: the start) and return the child's answer."""
        with contextlib.suppress(OSError):  # the child has stopped: its last message, or its exit, is read below
            self.connection.send(message)
        status, payload = self.receive(index)
        if status == "error":
            raise ValueError(payload)
        return status, payload

    def receive(self, index: int | None) -> Any:
        """The child's next message; ``ValueError`` naming feed ``index`` and its exit when it has stopped."""
        try:
            return self.connection.recv()
        except (EOFError, OSError):  # a runtime abort, or an error before it could answer
            where = "while loading the program" if index is None else f"on calibration feed {index}"
            raise ValueError(f"Core AI's runtime stopped ({_exit(self.process.wait())}) {where}") from None

    def run(self, index: int, arrays: dict[str, np.ndarray]) -> bool:
        """Run feed ``index``; whether the child has returned its budget of outputs."""
        return self.ask((index, arrays), index)[0] == "full"

    def add_to(self, sums: MomentSums, index: int) -> None:
        """Add what the child has summed to ``sums``, one accumulator at a time (it then exits)."""
        _, feeds = self.ask(None, index)
        for moments in sums.shared.values():
            moments.merge(self.receive(index))
        sums.feeds += feeds


def _exit(code: int) -> str:
    """A child's exit code in words: the signal that stopped it, if one did."""
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _collect(path: Path, taps: list[Tap], inputs: _Inputs, calibration_data: Any) -> dict[str, InputMoments]:
    """The taps' statistics: the asset at ``path`` run in Core AI's runtime on each feed in turn, in a child process
    replaced whenever the outputs it returned pass :data:`CHILD_OUTPUT_BYTES`."""
    sums = MomentSums(taps)
    feeds = enumerate(feeds_of(calibration_data))
    pending = next(feeds, None)
    while pending is not None:
        with _Child(path, taps) as child:
            full = False
            while pending is not None and not full:
                index, feed = pending
                full = child.run(index, _typed(checked_feed(feed, set(inputs)), inputs, index))
                pending = next(feeds, None)
            child.add_to(sums, index)
    return sums.result()


def collect_input_moments(program: Program, calibration_data: Any) -> dict[str, InputMoments]:
    """Each matmul / conv (a grouped one's blocks) weight's :class:`InputMoments` over ``calibration_data`` (see
    :func:`lowbit.calibration.feeds_of`; a feed's arrays are cast to the program's input types: float64 arrays to
    float32, int64 ids to int32 when every id fits), and each embedding table's (a ``gather_nd``'s rows: how often
    each was looked up), by weight name. Other weights (shared, already compressed, inside composite graphs, whose
    input channels are dynamic) get none and are compressed data-free. ``ValueError`` when the data holds no feed,
    a feed does not fit the program's inputs, or the runtime cannot run it (its reason, one line)."""
    check_source(calibration_data)
    capture = program.copy()
    taps, values = _taps(capture)
    if not taps:  # nothing to calibrate: every weight is compressed data-free (the report says so)
        return {}
    _mlir.set_outputs(capture, values, [f"{TAP_PREFIX}{i}" for i in range(len(values))])
    inputs = _mlir.graph_inputs(capture)
    with tempfile.TemporaryDirectory(prefix="lowbit-calibration-") as folder:
        path = capture.save(Path(folder) / "capture.aimodel")
        del capture
        return _collect(path, taps, inputs, calibration_data)
