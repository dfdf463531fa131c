"""Weight discovery: which constants are weights, which op consumes each, and its channel axes.

A weight is a constant fed (directly or through ``Cast`` / ``Identity`` / ``Transpose``) to a weight input of an op
in :data:`OP_TABLE`. A weight already compressed is found as the output of its decode node (``lowbit.*`` function or
``DequantizeLinear`` on constants) and reported with its encoding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lowbit.driver import Weight
from lowbit.onnx import fused
from lowbit.onnx.decoders import decoder_for, dtype_of, value_shape
from lowbit.onnx.encoding import stored_nbytes

__all__ = ["OP_TABLE", "WeightRef", "find_weights", "has_fp16_weights"]


@dataclass(frozen=True)
class WeightInput:
    """One weight input of an op: its index and the (output, input) channel axes for a weight of a given rank."""

    index: int
    axes: Callable[[ir.Node, int], tuple[int, int] | None]


def _fixed(out_axis: int, in_axis: int) -> Callable[[ir.Node, int], tuple[int, int] | None]:
    return lambda node, rank: (out_axis % rank, in_axis % rank) if rank >= 2 else None


def _gemm_axes(node: ir.Node, rank: int) -> tuple[int, int] | None:
    attr = node.attributes.get("transB")
    trans_b = attr.as_int() if attr is not None else 0
    return ((0, 1) if trans_b else (1, 0)) if rank == 2 else None


def _gather_axes(node: ir.Node, rank: int) -> tuple[int, int] | None:
    attr = node.attributes.get("axis")
    return (0, 1) if rank == 2 and (attr is None or attr.as_int() == 0) else None


def _recurrent_axes(node: ir.Node, rank: int) -> tuple[int, int] | None:
    return (1, 2) if rank == 3 else None


# op type (default domain) -> weight inputs. Axes are (output-channel axis, input-channel axis).
OP_TABLE: dict[str, tuple[WeightInput, ...]] = {
    "Conv": (WeightInput(1, _fixed(0, 1)),),
    "ConvTranspose": (WeightInput(1, _fixed(1, 0)),),
    "Gemm": (WeightInput(1, _gemm_axes),),
    "MatMul": (WeightInput(1, _fixed(-1, -2)),),
    "Gather": (WeightInput(0, _gather_axes),),
    "LSTM": (WeightInput(1, _recurrent_axes), WeightInput(2, _recurrent_axes)),
    "GRU": (WeightInput(1, _recurrent_axes), WeightInput(2, _recurrent_axes)),
    "RNN": (WeightInput(1, _recurrent_axes), WeightInput(2, _recurrent_axes)),
}

_PASS_THROUGH = {"Cast", "Identity", "Transpose", "Unsqueeze", "Slice", "Concat"}


@dataclass(frozen=True)
class WeightRef(Weight):
    """A weight of an ONNX program (:class:`lowbit.driver.Weight`): ``name`` is the constant's name (for a
    compressed weight: the decode node's output), ``dtype`` its ``onnx_ir.DataType``, ``op`` the consumer's op type,
    ``value`` its ``onnx_ir.Value``."""


def _is_constant(value: ir.Value) -> bool:
    """An initializer that no caller can override: not also a graph input (IR >= 4), or any initializer before IR 4
    (where every initializer is listed among the inputs)."""
    if not value.is_initializer() or value.const_value is None:
        return False
    graph = value.graph
    return not value.is_graph_input() or bool(isinstance(graph, ir.Graph) and graph.meta.get(_IR3_KEY))


_IR3_KEY = "lowbit.initializers_are_constants"


def _is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


# op type -> (position of the first carried value among the body's inputs, among the body's outputs, among the
# node's inputs): a Loop carries (iteration, condition, state...), a Scan (state..., scanned...)
_CARRIERS = {"Loop": (2, 1, 2), "Scan": (0, 0, 0)}


def _owners(graph: ir.Graph) -> dict[int, ir.Node]:
    """Subgraph (by id) -> the node holding it as an attribute."""
    owners = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                owners[id(attr.as_graph())] = node
            elif attr.type == ir.AttributeType.GRAPHS:
                owners.update((id(g), node) for g in attr.as_graphs())
    return owners


def _carried_from(value: ir.Value, owners: dict[int, ir.Node], opset: int) -> ir.Value | None:
    """For a Loop/Scan body input that the body passes on unchanged (directly or through Identity), the value the
    node feeds it with: constant over the iterations, so a weight when that one is."""
    body, owner = value.graph, owners.get(id(value.graph))
    if owner is None or not isinstance(body, ir.Graph) or owner.op_type not in _CARRIERS:
        return None
    first_in, first_out, first_node_in = _CARRIERS[owner.op_type]
    carried = len(body.inputs) - first_in  # a Loop carries all its body inputs after (iteration, condition)
    if owner.op_type == "Scan":  # ... a Scan its states only, not the scanned slices (opset 8's layout: left out)
        scanned = owner.attributes.get("num_scan_inputs")
        if scanned is None or opset < 9:  # opset 8's Scan takes sequence_lens and batched inputs first
            return None
        carried -= scanned.as_int()
    k = body.inputs.index(value) - first_in
    if not 0 <= k < carried or first_out + k >= len(body.outputs) or first_node_in + k >= len(owner.inputs):
        return None
    passed: ir.Value | None = body.outputs[first_out + k]
    producer = passed.producer() if passed is not None else None
    if producer is not None and producer.op_type == "Identity" and _is_default_domain(producer):
        passed = producer.inputs[0]
    return owner.inputs[first_node_in + k] if passed is value else None


# a step from a consumer's input up to its source: ("transpose", perm or None for reversed) or ("unsqueeze", axes)
Step = tuple[str, list[int] | None]


def _trace(value: ir.Value, owners: dict[int, ir.Node], opset: int) -> list[tuple[ir.Value, list[Step]]]:
    """Follow ``value`` up through pass-through ops (Cast, Identity, Transpose, Unsqueeze; Slice and Concat, as a
    model that cuts a weight into gate blocks and restacks them does; into the values a Loop/Scan carries unchanged)
    to constants or decode nodes' outputs.

    Returns each source (a Concat has several) with the steps passed on the way (consumer first).
    """
    found: list[tuple[ir.Value, list[Step]]] = []
    pending: list[tuple[ir.Value, list[Step]]] = [(value, [])]
    while pending:
        value, steps = pending.pop()
        if _is_constant(value):
            found.append((value, steps))
            continue
        producer = value.producer()
        if producer is None:
            carried = _carried_from(value, owners, opset) if value.is_graph_input() else None
            if carried is not None:
                pending.append((carried, steps))
            continue
        if decoder_for(producer) is not None and _inputs_constant(producer):
            found.append((value, steps))
            continue
        if not (_is_default_domain(producer) and producer.op_type in _PASS_THROUGH) or producer.inputs[0] is None:
            continue
        step = _step(producer)
        if step is _OPAQUE:
            continue
        sources = producer.inputs if producer.op_type == "Concat" else producer.inputs[:1]
        pending.extend((v, steps + ([step] if step else [])) for v in reversed(sources) if v is not None)
    return found


_OPAQUE: Step = ("opaque", None)


def _step(node: ir.Node) -> Step | None:
    """How ``node`` moves its input's axes: a :data:`Step`, None when it keeps them, ``_OPAQUE`` when unknown."""
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        return "transpose", list(perm.as_ints()) if perm is not None else None
    if node.op_type != "Unsqueeze":
        return None
    attribute = node.attributes.get("axes")  # before opset 13 an attribute, then an input
    if attribute is not None:
        return "unsqueeze", list(attribute.as_ints())
    axes = node.inputs[1] if len(node.inputs) > 1 else None
    if axes is None or axes.const_value is None:
        return _OPAQUE
    return "unsqueeze", [int(a) for a in axes.const_value.numpy().reshape(-1)]


def _source_axes(axes: tuple[int, int], steps: list[Step], rank: int) -> tuple[int, int] | None:
    """The consumer's ``(output, input)`` axes carried through ``steps`` to the source (``rank``: the consumer
    input's rank); None when a channel axis is one an Unsqueeze inserted."""
    for kind, argument in steps:
        if kind == "transpose":
            perm = argument if argument is not None else list(range(rank))[::-1]
            axes = (perm[axes[0]], perm[axes[1]])
            continue
        inserted = sorted(a % rank for a in argument or [])
        if axes[0] in inserted or axes[1] in inserted:
            return None
        axes = (axes[0] - sum(i < axes[0] for i in inserted), axes[1] - sum(i < axes[1] for i in inserted))
        rank -= len(inserted)
    return axes


def _inputs_constant(node: ir.Node) -> bool:
    """All inputs of ``node`` are constants, or outputs of decode nodes over constants (chains)."""
    for value in node.inputs:
        if value is None or _is_constant(value):
            continue
        producer = value.producer()
        if producer is None or decoder_for(producer) is None or not _inputs_constant(producer):
            return False
    return True


def _describe(value: ir.Value) -> str | None:
    producer = value.producer()
    if value.const_value is not None or producer is None:
        return None
    decoder = decoder_for(producer)
    assert decoder is not None
    inner = [_describe(v) for v in producer.inputs if v is not None and v.producer() is not None]
    return " + ".join(d for d in [decoder.describe(producer), *inner] if d)


def _candidates(graph: ir.Graph) -> Iterator[tuple[ir.Node, ir.Value, tuple[int, ...], tuple[int, int]]]:
    owners, opset = _owners(graph), graph.opset_imports.get("", 1)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if not _is_default_domain(node) or node.op_type not in OP_TABLE:
            continue
        for slot in OP_TABLE[node.op_type]:
            if slot.index >= len(node.inputs) or node.inputs[slot.index] is None:
                continue
            for source, steps in _trace(node.inputs[slot.index], owners, opset):  # type: ignore[arg-type]
                shape = value_shape(source)
                if not shape:
                    continue
                rank = len(shape) + sum(len(argument or []) for kind, argument in steps if kind == "unsqueeze")
                axes = slot.axes(node, rank)
                axes = None if axes is None else _source_axes(axes, steps, rank)
                if axes is not None:
                    yield node, source, shape, axes


def find_weights(program) -> list[WeightRef]:
    """All weights of ``program`` (a :class:`~lowbit.onnx.program.Program`), in graph order.

    A constant used by several consumers that disagree on its channel axes is left out, with a ``UserWarning``.
    """
    found: dict[int, tuple[ir.Value, list[str], set[tuple[int, int]]]] = {}
    if program.model.ir_version < 4:
        for graph in program.model.graphs():
            graph.meta[_IR3_KEY] = True
    shapes: dict[int, tuple[int, ...]] = {}
    for node, value, shape, axes in _candidates(program.graph):
        shapes[id(value)] = shape
        entry = found.setdefault(id(value), (value, [], set()))
        if node.op_type not in entry[1]:
            entry[1].append(node.op_type)
        entry[2].add(axes)
    refs: list[WeightRef] = []
    refs.extend(_fused_ref(nodes) for nodes in fused.fused_by_codes(program.graph).values())
    for value, ops, axes_seen in found.values():
        name = value.name or "<unnamed>"
        if len(axes_seen) > 1:
            warnings.warn(
                f"weight {name!r} skipped: its consumers ({'+'.join(ops)}) disagree on the channel axes "
                f"{sorted(axes_seen)}",
                UserWarning,
                stacklevel=2,
            )
            continue
        ((out_axis, in_axis),) = axes_seen
        shape = shapes[id(value)]
        dtype = value.const_value.dtype if value.const_value is not None else value.dtype
        refs.append(
            WeightRef(
                name=name,
                shape=shape,
                dtype=dtype if dtype is not None else ir.DataType.UNDEFINED,
                op="+".join(ops),
                output_axis=out_axis,
                input_axis=in_axis,
                numel=int(np.prod(shape)),
                nbytes=stored_nbytes(value),
                compression=_describe(value),
                value=value,
            )
        )
    return refs


def _fused_ref(nodes: list[ir.Node]) -> WeightRef:
    """The weight fused kernels (``target="onnxruntime"``) hold: named like their codes, stored in all their inputs
    but the activation."""
    node, codes = nodes[0], fused.codes_input(nodes[0])
    shape, (out_axis, in_axis) = fused.weight_axes(node)
    stored = [v for i, v in enumerate(node.inputs) if v is not None and i != fused.activation_slot(node)]
    scales = node.inputs[2]
    assert scales is not None
    return WeightRef(
        name=codes.name or "<unnamed>",
        shape=shape,
        dtype=dtype_of(scales),
        op=node.op_type,
        output_axis=out_axis,
        input_axis=in_axis,
        numel=int(np.prod(shape)),
        nbytes=sum(stored_nbytes(v) for v in stored),
        compression=" + ".join(d for d in (fused.describe_fused(node), _describe(codes)) if d),
        value=codes,
    )


def has_fp16_weights(program) -> bool:
    """Whether any weight is fp16 (its DequantizeLinear scales then need opset 19; bf16 ones decode in float)."""
    return any(w.dtype == ir.DataType.FLOAT16 for w in find_weights(program))
