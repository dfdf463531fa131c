"""Calibration on the torch door: forward hooks on the Linear modules being palettized accumulate each weight's
:class:`~lowbit.statistics.InputMoments` (the whole ``X^T X`` of its input), streamed item by item, into the same
slot the graph door fills from ONNX Runtime."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.statistics import InputMoments

__all__ = ["collect_linear_moments", "default_forward", "in_sequence"]


def default_forward(model: nn.Module, item: Any) -> Any:
    """``model(**item)`` for a dict, ``model(*item)`` for a tuple or list, else ``model(item)``."""
    if isinstance(item, dict):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


class _Enough(BaseException):
    """Raised by a hook once every hooked module has seen this item's input: the rest of the forward is not needed.
    A ``BaseException``, so that a ``forward_fn`` catching ``Exception`` does not swallow it."""


def _forward_fn(forward_fn: Callable[[nn.Module, Any], Any] | None) -> Callable[[nn.Module, Any], Any]:
    forward = default_forward if forward_fn is None else forward_fn
    if not callable(forward):
        raise TypeError(f"forward_fn must be callable as forward_fn(model, item), got {type(forward).__name__}")
    return forward


def _run_hooked(
    model: nn.Module,
    hooks: Mapping[nn.Module, Callable],
    calibration_data: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    after_item: Callable[[], None] = lambda: None,
) -> int:
    """Run every item through ``forward(model, item)`` in eval mode without gradients, with forward ``hooks`` on
    their modules (a hook may stop the item's forward with :class:`_Enough`); the hooks are removed and the model's
    mode restored. Returns how many items ran; ``ValueError`` when there was none."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    training = model.training
    items = 0
    try:
        model.eval()
        with torch.no_grad():
            for item in calibration_data:
                with contextlib.suppress(_Enough):
                    forward(model, item)
                after_item()
                items += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    if items == 0:
        raise ValueError("calibration_data yielded nothing")
    return items


def collect_linear_moments(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    calibration_data: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    full: bool = True,
    stop_early: bool = False,
) -> dict[str, InputMoments]:
    """``{weight name: InputMoments}`` of the ``linears`` (by weight name) over ``calibration_data``, each item run
    through ``forward_fn(model, item)`` (default :func:`default_forward`) in eval mode without gradients; the
    model's mode is restored. ``full``: keep each whole ``X^T X`` (default; else its diagonal). ``stop_early``: end
    each item's forward once every one of the ``linears`` has seen its input (a module called twice in one forward
    then counts its first call only). ``ValueError`` when the data holds no item or an activation is not finite,
    ``TypeError`` for a non-callable ``forward_fn``."""
    forward = _forward_fn(forward_fn)
    moments = {name: InputMoments.empty(linear.in_features, full=full) for name, linear in linears.items()}
    seen: set[str] = set()

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if name in seen:
                return
            x = inputs[0].detach().to(torch.float64).cpu().numpy()
            if not np.isfinite(x).all():
                raise ValueError(f"the input activations of {name!r} are not finite on a calibration item")
            moments[name].add(x, -1)
            if stop_early:
                seen.add(name)
                if len(seen) == len(moments):
                    raise _Enough

        return hook

    hooks: dict[nn.Module, Callable] = {linear: hook_for(name) for name, linear in linears.items()}
    _run_hooked(model, hooks, calibration_data, forward, seen.clear)
    return moments


def in_sequence(
    model: nn.Module, linears: Mapping[str, nn.Linear], first_item: Any, forward_fn: Callable | None = None
) -> list[dict[str, nn.Linear]]:
    """The ``linears`` in the order one forward of ``first_item`` calls them, grouped by block: consecutive
    modules under one child of the model's outermost ``nn.ModuleList`` that holds them (a transformer's layer) form
    one group, any other module its own. Modules the forward does not call are left out. For sequential
    calibration: each group's statistics are taken with the groups before it already compressed."""
    order: list[str] = []

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if name not in order:
                order.append(name)

        return hook

    _run_hooked(
        model, {linear: hook_for(name) for name, linear in linears.items()}, [first_item], _forward_fn(forward_fn)
    )
    names = {id(module): name for name, module in model.named_modules()}
    groups: list[tuple[str, dict[str, nn.Linear]]] = []
    for name in order:
        block = _block_of(model, names[id(linears[name])])
        if not groups or groups[-1][0] != block:
            groups.append((block, {}))
        groups[-1][1][name] = linears[name]
    return [group for _, group in groups]


def _block_of(model: nn.Module, module_name: str) -> str:
    """The child of the outermost ``nn.ModuleList`` on the path to ``module_name`` (``"model.layers.3"``), or
    ``module_name`` itself when no ModuleList holds it."""
    parts = module_name.split(".")
    for i in range(len(parts) - 1):
        if isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
            return ".".join(parts[: i + 1])
    return module_name
