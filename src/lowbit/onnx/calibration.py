"""Calibration of ONNX models: run the model in ONNX Runtime on the user's data with the weights' activation inputs
as extra outputs, and accumulate each weight's :class:`~lowbit.statistics.InputMoments`, one feed at a time
(:func:`lowbit.calibration.accumulate_moments`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from lowbit.calibration import Tap, accumulate_moments, check_source, checked_feed, keeps_gram
from lowbit.errors import one_line
from lowbit.kernels.patches import Window
from lowbit.onnx.discovery import WeightRef
from lowbit.onnx.program import PROTO_LIMIT_BYTES, Program
from lowbit.statistics import InputMoments

__all__ = ["Capture", "collect_input_moments", "session", "sole_consumers"]


def session(model: ir.Model) -> ort.InferenceSession:
    """A CPU session of ``model`` with no graph optimization (values as the graph computes them)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options, ["CPUExecutionProvider"])


FED_WEIGHT_BYTES = 1 << 16  # float initializers at least this large are fed to the capture, not copied into it
_FEEDABLE = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}


class Capture:
    """A session of a copy of ``program`` that also outputs the main-graph values named ``names``.

    The program's float weights (initializers of :data:`FED_WEIGHT_BYTES` or more) become graph inputs fed on every
    run from the program's own arrays, which ONNX Runtime reads in place: the session holds no second copy of the
    weights (nor does the protobuf it is built from), memory-mapped external data stays on disk until read, and only
    the graph and its small constants count against protobuf's 2 GB. ``ValueError`` when even those exceed it."""

    def __init__(self, program: Program, names: Iterable[str]) -> None:
        model = program.copy().model
        graph = model.graph
        produced = {out.name: out for node in graph for out in node.outputs}
        for name in sorted(set(names)):
            value = produced.get(name)
            if value is not None and value not in graph.outputs:
                graph.outputs.append(value)
        self.weights: dict[str, np.ndarray] = {}
        for name, value in list(graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or tensor.dtype not in _FEEDABLE or tensor.nbytes < FED_WEIGHT_BYTES:
                continue
            self.weights[name] = tensor.numpy()
            graph.initializers.pop(name)
            value.const_value = None
            value.type, value.shape = ir.TensorType(tensor.dtype), ir.Shape(tensor.shape.numpy())  # as an input needs
            if value not in graph.inputs:  # an initializer listed as an input too (IR < 4) already is one
                graph.inputs.append(value)
        if (
            sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
            > PROTO_LIMIT_BYTES
        ):
            raise ValueError("calibration of a model whose small constants exceed 2 GB is not supported")
        self.session = session(model)
        self.names = [o.name for o in self.session.get_outputs()]
        self.inputs = {i.name for i in self.session.get_inputs()} - self.weights.keys()

    def run(self, feed: Mapping[str, Any], index: int) -> dict[str, np.ndarray]:
        """The feed's inputs and the captured values by name. ``ValueError`` when the feed names an input the model
        does not have or lacks one, or ONNX Runtime cannot run the model on it (its reason, one line)."""
        checked = checked_feed(feed, self.inputs)
        try:
            outputs = self.session.run(None, checked | self.weights)
        except Exception as err:  # onnxruntime's own exception types
            raise ValueError(f"ONNX Runtime cannot run the model on calibration feed {index}: {one_line(err)}") from err
        return {**checked, **dict(zip(self.names, outputs, strict=True))}


def _tap(ref: WeightRef, node: ir.Node) -> Tap | None:
    """The activation input of ``node`` whose channels meet ``ref``'s input axis, or the indices a Gather looks up
    its rows by (None: no statistic for it)."""
    if node.op_type == "Gather" and node.inputs[0] is ref.value and ref.output_axis == 0 and len(node.inputs) > 1:
        indices = node.inputs[1]
        if indices is None or not indices.name or indices.const_value is not None:
            return None
        return Tap(ref.name, indices.name, 0, ref.shape[0], lookup=True)
    x = node.inputs[0] if node.inputs else None
    if x is None or not x.name or x.const_value is not None:
        return None
    channels = ref.shape[ref.input_axis]
    if node.op_type == "MatMul" and node.inputs[1] is ref.value:
        return Tap(ref.name, x.name, -1, channels, len(ref.shape) == 2)
    if node.op_type == "Gemm" and node.inputs[1] is ref.value:
        trans_a = node.attributes.get("transA")
        return Tap(ref.name, x.name, 0 if trans_a is not None and trans_a.as_int() else -1, channels, True)
    group = node.attributes.get("group")
    groups = 1 if group is None else group.as_int()
    if node.op_type == "Conv" and node.inputs[1] is ref.value and groups >= 1 and ref.shape[0] % groups == 0:
        window = _window(node, tuple(ref.shape[2:]))
        if window is None:
            return None
        inputs = channels * groups  # the weight holds one group's input channels
        full = keeps_gram(inputs, window, groups)
        return Tap(ref.name, x.name, 1, inputs, full, window=window, groups=groups)
    if node.op_type == "ConvTranspose" and node.inputs[1] is ref.value and groups >= 1 and channels % groups == 0:
        window = _window(node, tuple(ref.shape[2:]))
        if window is None:
            return None
        return Tap(ref.name, x.name, 1, channels, keeps_gram(channels, window, groups), window=window, groups=groups)
    return None


_SAME = {"SAME_UPPER": "upper", "SAME_LOWER": "lower"}


def _ints(node: ir.Node, name: str, count: int, default: int) -> tuple[int, ...]:
    attr = node.attributes.get(name)
    return tuple(attr.as_ints()) if attr is not None else (default,) * count


def _window(node: ir.Node, kernel: tuple[int, ...]) -> Window | None:
    """The window of a Conv or ConvTranspose ``node`` whose weight has ``kernel`` (None when its attributes do not
    describe one)."""
    rank = len(kernel)
    transposed = node.op_type == "ConvTranspose"
    auto_pad = node.attributes.get("auto_pad")
    mode = "NOTSET" if auto_pad is None else auto_pad.as_string()
    pads = _ints(node, "pads", 2 * rank, 0) if mode == "NOTSET" else (0,) * 2 * rank
    pairs = tuple(zip(pads[:rank], pads[rank:], strict=False))
    strides, dilations = _ints(node, "strides", rank, 1), _ints(node, "dilations", rank, 1)
    same = _SAME.get(mode, "")
    extra: dict[str, Any] = {}
    if transposed:
        shape = node.attributes.get("output_shape")
        output_shape = () if shape is None else tuple(shape.as_ints())
        extra = {"output_padding": _ints(node, "output_padding", rank, 0), "output_shape": output_shape}
        same = same or ("lower" if output_shape else "")  # ONNX Runtime: the odd pad before unless SAME_UPPER
    try:
        return Window(kernel, strides, dilations, pairs, same, transposed=transposed, **extra)
    except ValueError:
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


def _taps(program: Program) -> list[Tap]:
    return [tap for ref, node in sole_consumers(program) if (tap := _tap(ref, node)) is not None]


def collect_input_moments(program: Program, calibration_data: Any) -> dict[str, InputMoments]:
    """Each MatMul / Gemm / Conv / ConvTranspose (over its input's windows; a grouped Conv's blocks) weight's
    :class:`InputMoments` over ``calibration_data`` (see :func:`lowbit.calibration.feeds_of`), and each embedding
    table's (a Gather's rows: how often each was looked up), by weight name. Other weights (weights shared or reached
    through a Cast or Transpose, inside subgraphs) get none and are compressed data-free. ``ValueError`` when the
    data holds no feed, or a feed's activations do not have the weight's input channels."""
    check_source(calibration_data)
    taps = _taps(program)
    capture = Capture(program, (t.activation for t in taps))
    return accumulate_moments(taps, capture.run, calibration_data)
