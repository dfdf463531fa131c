"""16-bit casting of an exported program before compression, as the Core AI flow asks ("ensure the model uses 16-bit
precision before compressing"), with the contract of coreai-opt's ``casting``: float32 becomes float16 except where a
value would overflow, and integer arithmetic on the inputs runs in int16.

float16: a float32 parameter, buffer or constant becomes float16 unless one of its finite values (``|v| < 1e38``;
larger ones are sentinels) exceeds 65,504, and then it stays float32 whole; a nonzero value below float16's smallest
subnormal keeps its sign at that subnormal instead of flushing to zero. float32 inputs become float16. Each op runs in
float16 unless an input is still float32, a float argument exceeds 65,504, or ``ignored_ops`` names it: such an op
runs in float32 between casts (its float16 inputs cast up, its outputs cast back down); one that reads only float32
values (a view of a parameter kept float32) passes its float32 output on uncast, so that the large values reach the op
that mixes them in float32 (coreai-opt casts it down, to infinity). Float constants an op makes
(``full``, ``arange``, ``.to(float32)``) are made in float16.

int16: ``add`` / ``sub`` / ``mul`` of two integer tensors computed from the inputs, and the integer arithmetic they
connect to, run in int16 (an integer input they read becomes int16), cast back to int32 where a value leaves that
arithmetic; values that index (``embedding``, ``gather``, ``index_select``, ``index``, ...) are left as they are."""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

__all__ = ["cast_fp32_to_fp16", "cast_int32_to_int16", "cast_to_16_bit_precision"]

FP16_MAX = 65504.0
SENTINEL = 1e38  # values this large stand for infinity (masks): they do not keep a tensor float32
FP16_TINY = 2.0**-24  # float16's smallest subnormal
_aten = torch.ops.aten
_INT_ARITHMETIC = {_aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor}
_INT_FOLLOW = _INT_ARITHMETIC | {_aten.neg.default, _aten.abs.default, _aten.clone.default}
# (op, argument position) of index arguments: their values stay as they are
_INDEX_ARGUMENTS = {
    _aten.embedding.default: 1,
    _aten.gather.default: 2,
    _aten.index_select.default: 2,
    _aten.take_along_dim.default: 1,
    _aten.scatter.src: 2,
    _aten.scatter_add.default: 2,
    _aten.index.Tensor: 1,
    _aten.index_put.default: 1,
}
IgnoredOps = Callable[[fx.Node], bool] | Collection[Any] | Any | None


def cast_to_16_bit_precision(exported_program: ExportedProgram, ignored_ops: IgnoredOps = None) -> ExportedProgram:
    """:func:`cast_fp32_to_fp16` then :func:`cast_int32_to_int16`; changes ``exported_program`` in place and returns
    it. ``ignored_ops``: ops to keep in float32 (an ``OpOverload`` / ``OpOverloadPacket``, a collection of them, or
    a predicate on the graph node). ``TypeError`` when ``exported_program`` is not a
    ``torch.export.ExportedProgram``."""
    return cast_int32_to_int16(cast_fp32_to_fp16(exported_program, ignored_ops))


def _checked(exported_program: Any) -> ExportedProgram:
    if not isinstance(exported_program, ExportedProgram):
        raise TypeError(
            f"exported_program must be a torch.export.ExportedProgram, got {type(exported_program).__name__}"
        )
    return exported_program


def fits_fp16(tensor: torch.Tensor) -> bool:
    """Whether every finite value of ``tensor`` (``|v| < 1e38``) is within float16's range."""
    magnitude = tensor.detach().abs()
    finite = magnitude[magnitude < SENTINEL]
    return finite.numel() == 0 or float(finite.max()) <= FP16_MAX


def to_fp16(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float16, a nonzero value below the smallest subnormal kept at it (with its sign)."""
    tiny = (tensor != 0) & (tensor.abs() < FP16_TINY)
    return torch.where(tiny, torch.sign(tensor) * FP16_TINY, tensor).to(torch.float16)


def _ignored(ignored_ops: IgnoredOps) -> Callable[[fx.Node], bool]:
    if ignored_ops is None:
        return lambda node: False
    if callable(ignored_ops) and not isinstance(ignored_ops, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return ignored_ops
    ops = set(ignored_ops) if isinstance(ignored_ops, Collection) else {ignored_ops}
    for op in ops:
        if not isinstance(op, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            raise TypeError(f"ignored_ops must hold torch ops (e.g. torch.ops.aten.exp), got {op!r}")
    return lambda node: node.target in ops or getattr(node.target, "overloadpacket", None) in ops


def _dtype(node: Any) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _state(ep: ExportedProgram) -> dict[str, tuple[dict[str, Any], str]]:
    """Placeholder name -> (the dict holding its tensor, key) for parameters, buffers and lifted constants."""
    held = {}
    kinds = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    for spec in ep.graph_signature.input_specs:
        if spec.kind not in kinds or spec.target is None:
            continue
        for store in (ep.state_dict, ep.constants):  # a non-persistent buffer is among the constants
            if spec.target in store:
                held[spec.arg.name] = (store, spec.target)
                break
    return held


def _cast(graph: fx.Graph, value: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
    with graph.inserting_before(before):
        return graph.call_function(_aten._to_copy.default, (value,), {"dtype": dtype})


def cast_fp32_to_fp16(exported_program: ExportedProgram, ignored_ops: IgnoredOps = None) -> ExportedProgram:
    """The float16 half of :func:`cast_to_16_bit_precision` (see the module's description); in place, returned."""
    ep, is_ignored = _checked(exported_program), _ignored(ignored_ops)
    graph, held = ep.graph, _state(ep)
    dtypes: dict[fx.Node, Any] = {}  # a tensor's float type after the pass; a tuple's: one per element
    for node in list(graph.nodes):
        if node.op == "placeholder":
            dtypes[node] = _placeholder_fp16(node, held)
        elif node.op == "call_function":
            dtypes[node] = _op_fp16(graph, node, dtypes, is_ignored)
    _refresh(ep)
    return ep


def _placeholder_fp16(node: fx.Node, held: dict[str, tuple[dict[str, Any], str]]) -> torch.dtype | None:
    dtype = _dtype(node)
    if dtype != torch.float32:
        return dtype
    if node.name in held:
        store, key = held[node.name]
        tensor = store[key]
        if not fits_fp16(tensor):
            return torch.float32
        cast = to_fp16(tensor.detach())
        store[key] = torch.nn.Parameter(cast, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else cast
    else:
        _retype(node, torch.float16)
    return torch.float16


def _retype(placeholder: fx.Node, dtype: torch.dtype) -> None:
    """A user input's fake value in ``dtype`` (its symbolic shape kept)."""
    value = placeholder.meta["val"]
    with value.fake_mode:
        placeholder.meta["val"] = value.to(dtype)


def _op_fp16(graph: fx.Graph, node: fx.Node, dtypes: dict[fx.Node, Any], is_ignored: Callable[[fx.Node], bool]) -> Any:
    """Rewrite ``node`` to run in float16, or in float32 between casts; returns its output's float type (a tuple of
    them for an op with several outputs)."""
    if node.target is operator.getitem and isinstance(dtypes.get(node.args[0]), _Outputs):  # type: ignore[arg-type]
        outputs = dtypes[node.args[0]]  # type: ignore[index]
        element = outputs.dtypes[node.args[1]]  # type: ignore[index]
        return _cast_down(graph, node, dtypes) if element == torch.float32 and outputs.cast_down else element
    inputs = [a for a in node.all_input_nodes if dtypes.get(a) in (torch.float16, torch.float32)]
    scalars = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, float)]
    too_big = any(FP16_MAX < abs(s) < SENTINEL for s in scalars)
    value, out = node.meta.get("val"), _dtype(node)
    if any(dtypes[a] == torch.float32 for a in inputs) or too_big or is_ignored(node):
        mixed = any(dtypes[a] == torch.float16 for a in inputs)
        for a in inputs:
            if dtypes[a] == torch.float16:
                node.replace_input_with(a, _cast(graph, a, torch.float32, node))
        if isinstance(value, list | tuple):  # each float32 element cast down where it is taken out
            return _Outputs(tuple(_dtype_of(v) for v in value), mixed or not inputs)
        if out == torch.float32 and (mixed or not inputs):
            return _cast_down(graph, node, dtypes)
        return out
    node.args = tuple(_fp16_argument(a) for a in node.args)
    node.kwargs = {k: _fp16_argument(v) for k, v in node.kwargs.items()}
    if isinstance(value, list | tuple):
        return _Outputs(tuple(_half(_dtype_of(v)) if inputs else _dtype_of(v) for v in value), not inputs)
    if out == torch.float32 and not inputs:  # made here from no float input: a creation op, or int -> float
        if "dtype" not in _schema_arguments(node):
            return _cast_down(graph, node, dtypes)
        if "dtype" not in node.kwargs:
            node.kwargs = {**node.kwargs, "dtype": torch.float16}
    return _half(out)


class _Outputs(NamedTuple):
    """The float types of an op's several outputs, and whether a float32 one is cast down where it is taken."""

    dtypes: tuple[torch.dtype | None, ...]
    cast_down: bool


def _dtype_of(value: Any) -> torch.dtype | None:
    return value.dtype if isinstance(value, torch.Tensor) else None


def _half(dtype: torch.dtype | None) -> torch.dtype | None:
    return torch.float16 if dtype == torch.float32 else dtype


def _cast_down(graph: fx.Graph, node: fx.Node, dtypes: dict[fx.Node, Any]) -> torch.dtype:
    """Cast ``node``'s float32 output to float16 for every use; ``node`` itself stays float32."""
    down = _cast(graph, node, torch.float16, node.next)
    node.replace_all_uses_with(down, delete_user_cb=lambda user: user is not down)
    dtypes[down] = torch.float16
    return torch.float32


def _schema_arguments(node: fx.Node) -> set[str]:
    schema = getattr(node.target, "_schema", None)
    return {a.name for a in schema.arguments if a.kwarg_only} if schema is not None else set()


def _fp16_argument(value: Any) -> Any:
    if value is torch.float32:
        return torch.float16
    if isinstance(value, float) and value != 0 and abs(value) < SENTINEL:
        rounded = float(torch.tensor(value, dtype=torch.float16))
        return rounded if rounded != 0 else (FP16_TINY if value > 0 else -FP16_TINY)
    if isinstance(value, float) and abs(value) >= SENTINEL:
        return FP16_MAX if value > 0 else -FP16_MAX
    return value


def cast_int32_to_int16(exported_program: ExportedProgram) -> ExportedProgram:
    """The int16 half of :func:`cast_to_16_bit_precision` (see the module's description); in place, returned. The
    program's integer inputs that the int16 arithmetic reads become int16 inputs."""
    ep = _checked(exported_program)
    graph = ep.graph
    user_inputs = set(ep.graph_signature.user_inputs)
    from_inputs = _reachable(graph, {n for n in graph.nodes if n.op == "placeholder" and n.name in user_inputs})
    indexing = {
        node.args[position]
        for node in graph.nodes
        if node.op == "call_function"
        and (position := _INDEX_ARGUMENTS.get(node.target)) is not None
        and position < len(node.args)
    }

    def integer(node: Any) -> bool:
        return isinstance(node, fx.Node) and _dtype(node) in (torch.int32, torch.int64) and node in from_inputs

    def follows(node: fx.Node) -> bool:
        if node in indexing or not integer(node):
            return False
        if node.op == "placeholder":
            return True
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        return node.target in _INT_FOLLOW and all(integer(a) for a in tensors)

    seeds = [
        n
        for n in graph.nodes
        if n.op == "call_function"
        and n.target in _INT_ARITHMETIC
        and follows(n)
        and sum(isinstance(a, fx.Node) for a in n.args[:2]) == 2
    ]
    castable: set[fx.Node] = set()
    pending = list(seeds)
    while pending:
        node = pending.pop()
        if node in castable:
            continue
        castable.add(node)
        pending.extend(n for n in (*node.all_input_nodes, *node.users) if n not in castable and follows(n))
    for node in [n for n in graph.nodes if n in castable]:
        _int16_edges(graph, node, castable)
    _refresh(ep)
    return ep


def _reachable(graph: fx.Graph, sources: set[fx.Node]) -> set[fx.Node]:
    reached = set(sources)
    for node in graph.nodes:
        if any(a in reached for a in node.all_input_nodes):
            reached.add(node)
    return reached


def _int16_edges(graph: fx.Graph, node: fx.Node, castable: set[fx.Node]) -> None:
    """``node`` computes in int16: integer inputs from outside the set cast down, uses outside cast back up."""
    if node.op == "placeholder":
        _retype(node, torch.int16)
    else:
        for a in node.all_input_nodes:
            if a not in castable:
                node.replace_input_with(a, _cast(graph, a, torch.int16, node))
    outside = [u for u in node.users if u not in castable]
    if outside:
        up = _cast(graph, node, torch.int32, outside[0] if node.op != "placeholder" else _first_op(graph))
        for user in outside:
            user.replace_input_with(node, up)


def _first_op(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op != "placeholder")


def _refresh(ep: ExportedProgram) -> None:
    """Recompile the graph and recompute every node's fake value from the placeholders' new types."""
    graph = ep.graph
    graph.eliminate_dead_code()
    graph.lint()
    ep.graph_module.recompile()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    held = _state(ep)
    mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in placeholders])
    assert mode is not None
    fakes = []
    for node in placeholders:
        if node.name in held:
            store, key = held[node.name]
            fakes.append(mode.from_tensor(store[key], static_shapes=True))
        else:
            fakes.append(node.meta["val"])
    FakeTensorProp(ep.graph_module, mode).propagate_dont_convert_inputs(*fakes)
