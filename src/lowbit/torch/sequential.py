"""Calibration block by block on the torch door (issue 26; the shape of llmcompressor's sequential pipeline): the
palettized weights are taken block after block (a transformer's layers), so that only one block's ``X^T X`` is held
at a time.

Each block's statistics are those of the dense model, as on the graph door (the palettized weights are written
once every block is done): the same weight and calibration give the same codes through either door. Statistics from
inputs that went through the blocks already palettized (llmcompressor's choice) measured worse on SmolLM2-135M,
4-bit per-channel: 1.030x / 1.034x / 1.039x fp32 perplexity over three runs against 1.030x every time; error
feedback minimizes ``||X W - X W_q||`` on the inputs it is given, so it does not undo the error of earlier blocks
either way.

When the blocks form a chain (each block's first input is the previous block's output, its other arguments shared,
as in a decoder's stack of layers), each item's inputs to the current block are kept and replaced by its outputs:
every block runs once per item. Otherwise each block's statistics come from the whole model run again up to that
block.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from lowbit.statistics import InputMoments
from lowbit.torch._compressor import Target
from lowbit.torch.calibration import (
    Enough,
    ModuleMoments,
    collect_module_moments,
    evaluating,
    forward_of,
    reads_rows,
    run_items,
)

__all__ = [
    "BlockInputs",
    "Group",
    "calibrated_modules",
    "calibration_items",
    "chained",
    "compressed_in_sequence",
    "in_sequence",
]

T = TypeVar("T")

# arguments of a block that carry state from call to call (a key/value cache): dropped when a block is run again
_STATE = ("past_key_values", "past_key_value", "layer_past")


@dataclass(frozen=True)
class Group:
    """Modules (Linear, convolutions of one group, embeddings) compressed together: those of one ``block`` (a child of
    the model's outermost ``nn.ModuleList``, ``is_block``), or a single module outside any (``block`` is its name)."""

    block: str
    is_block: bool
    modules: dict[str, nn.Module]


def in_sequence(
    model: nn.Module, modules: Mapping[str, nn.Module], first_item: Any, forward_fn: Callable | None = None
) -> list[Group]:
    """The ``modules`` in the order one forward of ``first_item`` calls them, grouped: consecutive modules under
    one child of the model's outermost ``nn.ModuleList`` form one group, any other module its own. Modules the
    forward does not call are left out."""
    order: list[str] = []

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if name not in order:
                order.append(name)

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    run_items(model, handles, [first_item], forward_of(forward_fn))
    names = {id(module): name for name, module in model.named_modules()}
    groups: list[Group] = []
    for name in order:
        module_name = names[id(modules[name])]
        block = _block_of(model, module_name)
        if not groups or groups[-1].block != block:
            groups.append(Group(block, block != module_name, {}))
        groups[-1].modules[name] = modules[name]
    return groups


def _block_of(model: nn.Module, module_name: str) -> str:
    """The child of the outermost ``nn.ModuleList`` on the path to ``module_name`` (``"model.layers.3"``), or
    ``module_name`` itself when no ModuleList holds it."""
    parts = module_name.split(".")
    for i in range(len(parts) - 1):
        if isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
            return ".".join(parts[: i + 1])
    return module_name


def _stateless(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block's keyword arguments without a key/value cache (run again, it would grow)."""
    out = {key: None if key in _STATE else value for key, value in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _first(output: Any) -> Any:
    """A block's output as the next block's first input (the first element of a tuple)."""
    return output[0] if isinstance(output, tuple | list) else output


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool | int | float | str | type(None)) and isinstance(b, bool | int | float | str | type(None)):
        return a == b
    return False


@dataclass
class _Call:
    args: tuple
    kwargs: dict[str, Any]
    output: Any = None
    calls: int = 0


def chained(model: nn.Module, blocks: Sequence[str], first_item: Any, forward_fn: Callable | None = None) -> bool:
    """Whether ``blocks`` (in call order) form a chain on one forward of ``first_item``: each called once, each
    one's first input the previous one's output (its first element, for a tuple) and its other arguments the same,
    and the first block's output the same when it is run again on its inputs without a key/value cache."""
    if not blocks:
        return False
    calls: dict[str, _Call] = {}

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = calls.setdefault(name, _Call(args, kwargs))
            call.calls += 1

        return hook

    def post(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            calls[name].output = output

        return hook

    modules = [model.get_submodule(block) for block in blocks]
    handles = [m.register_forward_pre_hook(pre(b), with_kwargs=True) for b, m in zip(blocks, modules, strict=True)]
    handles += [m.register_forward_hook(post(b), with_kwargs=True) for b, m in zip(blocks, modules, strict=True)]
    run_items(model, handles, [first_item], forward_of(forward_fn))
    if any(calls.get(block, _Call((), {})).calls != 1 for block in blocks):
        return False
    for before, after in itertools.pairwise(blocks):
        a, b = calls[before], calls[after]
        if not b.args or not _same(b.args[0], _first(a.output)) or not _same(a.args[1:], b.args[1:]):
            return False
        if a.kwargs.keys() != b.kwargs.keys() or not all(_same(a.kwargs[k], b.kwargs[k]) for k in a.kwargs):
            return False
    first = calls[blocks[0]]
    if not first.args:
        return False
    with evaluating(model):
        again, recorded = _first(modules[0](*first.args, **_stateless(first.kwargs))), _first(first.output)
    return (
        isinstance(again, torch.Tensor)
        and isinstance(recorded, torch.Tensor)
        and again.shape == recorded.shape
        and bool(torch.allclose(again, recorded, rtol=1e-4, atol=1e-6))
    )


class BlockInputs:
    """Each calibration item's inputs (positional, keyword) to the current block of a chain, taken with one forward
    per item that stops at ``block``, then advanced block by block."""

    def __init__(self, model: nn.Module, block: str, items: Sequence[Any], forward_fn: Callable | None) -> None:
        self.model = model
        self.inputs: list[tuple[tuple, dict[str, Any]]] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs.append((args, _stateless(kwargs)))
            raise Enough

        handle = model.get_submodule(block).register_forward_pre_hook(hook, with_kwargs=True)
        run_items(model, [handle], items, forward_of(forward_fn))

    def moments(self, block: str, modules: Mapping[str, nn.Module]) -> dict[str, InputMoments]:
        """The ``modules``' input moments (whole ``X^T X``) over every item, running ``block`` alone; its outputs
        become the next block's inputs."""
        hooks = ModuleMoments(modules)
        module = self.model.get_submodule(block)
        outputs = []
        with evaluating(self.model, hooks.register()):
            for args, kwargs in self.inputs:
                outputs.append(((_first(module(*args, **kwargs)), *args[1:]), kwargs))
                hooks.item_done()
        self.inputs = outputs
        return hooks.moments


def calibration_items(calibration_data: Iterable[Any]) -> Sequence[Any]:
    """``calibration_data`` as a sequence (it is run more than once); ``ValueError`` when it yields nothing."""
    items = calibration_data if isinstance(calibration_data, Sequence) else list(calibration_data)
    if not items:
        raise ValueError("calibration_data yielded nothing")
    return items


def calibrated_modules(targets: Iterable[Target], model: nn.Module) -> dict[str, nn.Module]:
    """The weights among ``targets`` that calibration reaches, by target name: ``nn.Linear``'s, those of
    convolutions' (their ``X^T X`` over their input's windows, a grouped one's blocks, as on the graph door; not a
    subclass with its own ``forward``: :func:`~lowbit.torch.calibration.reads_rows`) and plain embeddings'
    (their rows' lookup counts; not a subclass with its own ``forward``, whose input may not be row indices, nor a
    table tied to another module, an LM head that reads every row, which the graph door gives no statistics)."""
    return {t.name: t.module for t in targets if t.weight.name == "weight" and _calibrated(t.module, model)}


def _calibrated(module: nn.Module, model: nn.Module) -> bool:
    if isinstance(module, nn.Embedding):
        return type(module).forward is nn.Embedding.forward and not _shared(module.weight, model)
    return reads_rows(module)


def _shared(parameter: torch.Tensor, model: nn.Module) -> bool:
    """Whether more than one module of ``model`` holds ``parameter`` (a tied weight)."""
    return sum(any(p is parameter for p in m.parameters(recurse=False)) for m in model.modules()) > 1


def compressed_in_sequence(
    model: nn.Module,
    targets: Sequence[Target],
    items: Sequence[Any],
    forward_fn: Callable | None,
    compress: Callable[[list[Target], Mapping[str, InputMoments]], Iterable[T]],
    only: Collection[str] | None = None,
) -> list[T]:
    """``compress(targets, statistics)`` for each group of ``targets``' calibrated weights (:func:`calibrated_modules`)
    in the order the model runs them (a block's together, with the dense model's input moments), holding one
    block's ``X^T X`` at a time; then for the other targets (not calibrated, or not called by the items), with no
    statistics. Returns what ``compress`` gave, in order. ``only`` (target names): just those compressed, from the
    same statistics (the blocks run as for every target, up to the last one holding such a target; the others'
    moments not taken)."""
    by_name = {t.name: t for t in targets}
    wanted = set(by_name if only is None else only)
    groups = in_sequence(model, calibrated_modules(targets, model), items[0], forward_fn)
    blocks = [group.block for group in groups if group.is_block]
    chain = chained(model, blocks, items[0], forward_fn)
    last = max((i for i, group in enumerate(groups) if wanted & set(group.modules)), default=-1)
    inputs: BlockInputs | None = None
    outcomes: list[T] = []
    for group in groups[: last + 1]:
        modules = {name: module for name, module in group.modules.items() if name in wanted}
        if chain and group.is_block:  # a chain's every block runs, to give the next its inputs
            inputs = inputs or BlockInputs(model, group.block, items, forward_fn)
            statistics = inputs.moments(group.block, modules)
        elif modules:
            statistics = collect_module_moments(model, modules, items, forward_fn, stop_early=True)
        if modules:
            outcomes += compress([by_name[name] for name in modules], statistics)
    seen = {name for group in groups for name in group.modules}
    outcomes += compress([t for t in targets if t.name not in seen and t.name in wanted], {})
    return outcomes
