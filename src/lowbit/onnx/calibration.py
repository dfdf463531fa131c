"""Calibration on the graph path: run the model in ONNX Runtime on the user's data with the weights' activation
inputs as extra outputs, and accumulate each weight's :class:`~lowbit.statistics.InputMoments`, one feed at a time
(only the running sums are kept, never the activations of more than one feed)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from lowbit.onnx.discovery import WeightRef
from lowbit.onnx.program import PROTO_LIMIT_BYTES, Program
from lowbit.statistics import InputMoments

__all__ = [
    "capturing_session",
    "checked_feed",
    "collect_input_moments",
    "feeds_of",
    "run_checked",
    "session",
    "sole_consumers",
]


def session(model: ir.Model) -> ort.InferenceSession:
    """A CPU session of ``model`` with no graph optimization (values as the graph computes them)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options, ["CPUExecutionProvider"])


def capturing_session(program: Program, names: Iterable[str]) -> ort.InferenceSession:
    """A session of a copy of ``program`` that also outputs the main-graph values named ``names``. ``ValueError``
    for a model past protobuf's 2 GB (the session is built from memory: not supported yet)."""
    if program.tensor_nbytes() > PROTO_LIMIT_BYTES:
        raise ValueError("calibration of a model whose tensors exceed 2 GB is not supported yet")
    model = program.copy().model
    graph = model.graph
    produced = {out.name: out for node in graph for out in node.outputs}
    for name in sorted(set(names)):
        value = produced.get(name)
        if value is not None and value not in graph.outputs:
            graph.outputs.append(value)
    return session(model)


def feeds_of(calibration_data: Any) -> Iterator[Mapping[str, np.ndarray]]:
    """The feeds of ``calibration_data``: an iterable of ``{input name: array}`` dicts, or an ONNX Runtime
    ``CalibrationDataReader`` (anything with ``get_next()`` returning a dict, then None). ``TypeError`` for
    anything else."""
    if hasattr(calibration_data, "get_next"):
        while (feed := calibration_data.get_next()) is not None:
            yield feed
        return
    if isinstance(calibration_data, Mapping) or not isinstance(calibration_data, Iterable):
        raise TypeError(
            "calibration_data must be an iterable of {input name: array} dicts or a CalibrationDataReader, "
            f"got {type(calibration_data).__name__}"
        )
    for feed in calibration_data:
        if not isinstance(feed, Mapping):
            raise TypeError(f"calibration_data must yield {{input name: array}} dicts, got {type(feed).__name__}")
        yield feed


@dataclass(frozen=True)
class _Tap:
    """Where a weight's input activations are read: the value's name and its input-channel axis."""

    weight: str
    activation: str
    channel_axis: int
    channels: int
    full: bool = False  # keep the whole X^T X: a 2-D weight's error feedback needs it


def _tap(ref: WeightRef, node: ir.Node) -> _Tap | None:
    """The activation input of ``node`` whose channels meet ``ref``'s input axis (None: no statistic for it)."""
    x = node.inputs[0] if node.inputs else None
    if x is None or not x.name or x.const_value is not None:
        return None
    channels = ref.shape[ref.input_axis]
    if node.op_type == "MatMul" and node.inputs[1] is ref.value:
        return _Tap(ref.name, x.name, -1, channels, len(ref.shape) == 2)
    if node.op_type == "Gemm" and node.inputs[1] is ref.value:
        trans_a = node.attributes.get("transA")
        return _Tap(ref.name, x.name, 0 if trans_a is not None and trans_a.as_int() else -1, channels, True)
    group = node.attributes.get("group")
    if node.op_type == "Conv" and node.inputs[1] is ref.value and (group is None or group.as_int() == 1):
        return _Tap(ref.name, x.name, 1, channels)
    return None


def sole_consumers(program: Program) -> Iterator[tuple[WeightRef, ir.Node]]:
    """Each dense weight of ``program`` read by exactly one node, in the main graph, with that node."""
    for ref in program.weights():
        value = ref.value
        if value is None or value.const_value is None or ref.compression is not None:
            continue
        consumers = {use.node for use in value.uses()}
        if len(consumers) == 1 and (node := consumers.pop()).graph is program.graph:
            yield ref, node


def _taps(program: Program) -> list[_Tap]:
    return [tap for ref, node in sole_consumers(program) if (tap := _tap(ref, node)) is not None]


def checked_feed(feed: Mapping[str, Any], inputs: set[str]) -> dict[str, np.ndarray]:
    """``feed`` as arrays; ``ValueError`` naming the model's inputs when it misses one or names another."""
    unknown, missing = sorted(set(feed) - inputs), sorted(inputs - set(feed))
    if unknown or missing:
        problem = f"has no model input named {unknown[0]!r}" if unknown else f"lacks the model input {missing[0]!r}"
        raise ValueError(f"a calibration feed {problem}; the model's inputs: {', '.join(sorted(inputs))}")
    return {k: np.asarray(v) for k, v in feed.items()}


def collect_input_moments(program: Program, calibration_data: Any) -> dict[str, InputMoments]:
    """Each MatMul / Gemm / Conv (group 1) weight's :class:`InputMoments` over ``calibration_data`` (see
    :func:`feeds_of`), by weight name. Other weights (embeddings, weights shared or reached through a Cast or
    Transpose, inside subgraphs) get none and are compressed data-free. ``ValueError`` when the data holds no
    feed, or a feed's activations do not have the weight's input channels."""
    taps = _taps(program)
    capture = capturing_session(program, (t.activation for t in taps))
    names = [o.name for o in capture.get_outputs()]
    inputs = {i.name for i in capture.get_inputs()}
    # weights that read the same activation (q / k / v, gate / up) share one accumulator
    shared: dict[tuple[str, int, bool], InputMoments] = {}
    for t in taps:
        shared.setdefault((t.activation, t.channel_axis, t.full), InputMoments.empty(t.channels, full=t.full))
    feeds = 0
    for feed in feeds_of(calibration_data):
        values = run_checked(capture, checked_feed(feed, inputs), names, feeds)
        for (activation, axis, _), moments in shared.items():
            x = values[activation]
            if x.shape[axis] != len(moments.squares) or not np.isfinite(x).all():
                tap = next(t for t in taps if t.activation == activation)
                problem = (
                    "are not finite" if x.shape[axis] == len(moments.squares) else f"have {x.shape[axis]} channels"
                )
                raise ValueError(f"activations of {tap.weight!r} {problem} on calibration feed {feeds}")
            moments.add(x, axis)
        feeds += 1
    if feeds == 0:
        raise ValueError("calibration_data yielded no feed")
    return {t.weight: shared[(t.activation, t.channel_axis, t.full)] for t in taps}


def run_checked(capture: ort.InferenceSession, feed: dict[str, np.ndarray], names: list[str], index: int) -> dict:
    """The feed's inputs and the captured values by name; ``ValueError`` (ONNX Runtime's reason, one line) when
    the model cannot run on it (an input of the wrong dtype or shape)."""
    try:
        outputs = capture.run(None, feed)
    except Exception as err:  # onnxruntime's own exception types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"ONNX Runtime cannot run the model on calibration feed {index}: {reason}") from err
    return {**feed, **dict(zip(names, outputs, strict=True))}
