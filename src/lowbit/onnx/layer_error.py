"""Per-weight output error on data: how much each compressed weight changes its own layer's output.

For each weight of the reference (dense) model read directly by one op of the table, the op's activation inputs are
captured by running the reference model in ONNX Runtime on the given feeds (one feed at a time: nothing is kept but
running sums), and the op alone is run twice on them, with the reference weight and with the compressed model's
decoded one: the error is ``||Y_q - Y||^2 / ||Y||^2`` summed over the feeds. Each layer sees the reference
activations, so a weight's figure is its own, not what earlier layers passed on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from lowbit.onnx.calibration import Capture, session, sole_consumers
from lowbit.onnx.discovery import OP_TABLE
from lowbit.onnx.program import Program

__all__ = ["layer_output_errors"]


@dataclass
class _Layer:
    """One weight, its consumer, its reference values, and the running sums of its output error."""

    weight: str
    node: ir.Node
    dense: np.ndarray
    activations: list[str]  # the node's non-constant inputs, by value name
    squared_error: float = 0.0
    energy: float = 0.0
    sessions: list[ort.InferenceSession] = field(default_factory=list)  # [reference, compressed]

    def run(self, samples: Mapping[str, np.ndarray], compressed: np.ndarray, opset: Mapping[str, int]) -> None:
        """Add one feed's output error."""
        if not self.sessions:
            self.sessions = [session(_single_node(self, w, samples, opset)) for w in (self.dense, compressed)]
        reference, ours = (s.run(None, dict(samples))[0].astype(np.float64) for s in self.sessions)
        diff = ours - reference
        self.squared_error += float(np.vdot(diff, diff))
        self.energy += float(np.vdot(reference, reference))


def _layers(reference: Program) -> list[_Layer]:
    """The dense weights of ``reference`` read directly by one op of the table in the main graph."""
    layers = []
    for ref, node in sole_consumers(reference):
        if node.op_type in OP_TABLE:
            activations = [v.name for v in node.inputs if v is not None and v.const_value is None and v.name]
            layers.append(_Layer(ref.name, node, ref.value.const_value.numpy(), activations))
    return layers


def _single_node(layer: _Layer, weight: np.ndarray, samples: Mapping[str, np.ndarray], opset) -> ir.Model:
    """The consumer alone: its activations as inputs (any batch / length), its constants as initializers, with
    ``weight`` for the weight."""
    inputs: list[ir.Value] = []
    initializers: list[ir.Value] = []
    values: list[ir.Value | None] = []
    for v in layer.node.inputs:
        new: ir.Value | None = None
        if v is not None and v.name is not None and v.name in samples:
            array = samples[v.name]
            dtype = ir.DataType.from_numpy(array.dtype)
            new = ir.Value(name=v.name, type=ir.TensorType(dtype), shape=ir.Shape([None] * array.ndim))
            inputs.append(new)
        elif v is not None and v.const_value is not None:
            array = weight if v.name == layer.weight else v.const_value.numpy()
            new = ir.Value(name=v.name, const_value=ir.tensor(array))
            initializers.append(new)
        values.append(new)
    attributes = list(layer.node.attributes.values())
    node = ir.Node(layer.node.domain, layer.node.op_type, values, attributes, num_outputs=len(layer.node.outputs))
    taken = {v.name for v in layer.node.inputs if v is not None}
    node.outputs[0].name = next(
        n for n in (f"lowbit.layer_output.{i}" for i in range(len(taken) + 1)) if n not in taken
    )
    graph = ir.Graph(inputs, [node.outputs[0]], nodes=[node], initializers=initializers, opset_imports=opset)
    return ir.Model(graph, ir_version=10)


def layer_output_errors(
    compressed: Mapping[str, np.ndarray], reference: Program, feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """``{weight name: relative squared error of its layer's output}`` over ``feeds`` (dicts of the reference
    model's inputs), for every weight of ``reference`` read directly by one op of the table whose decoded values
    ``compressed`` holds (by name, e.g. ``Program.weight_arrays()``). ``ValueError`` when ``feeds`` is empty."""
    layers = [layer for layer in _layers(reference) if layer.weight in compressed]
    capture = Capture(reference, {name for layer in layers for name in layer.activations})
    opset = dict(reference.graph.opset_imports)
    count = 0
    for feed in feeds:
        count += 1
        results = capture.run(feed, count - 1)
        for layer in layers:
            samples = {name: results[name] for name in layer.activations if name in results}
            if len(samples) == len(layer.activations):
                layer.run(samples, compressed[layer.weight], opset)
    if count == 0:
        raise ValueError("calibration data yielded no feed: the layer output errors need at least one")
    return {layer.weight: layer.squared_error / layer.energy for layer in layers if layer.energy > 0}
