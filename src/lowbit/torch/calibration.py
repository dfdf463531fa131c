"""Calibration on the torch door: forward hooks on the Linear modules being palettized accumulate each weight's
:class:`~lowbit.statistics.InputMoments` (the whole ``X^T X`` of its input), streamed item by item, into the same
slot the graph door fills from ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.statistics import InputMoments

__all__ = ["collect_linear_moments", "default_forward"]


def default_forward(model: nn.Module, item: Any) -> Any:
    """``model(**item)`` for a dict, ``model(*item)`` for a tuple or list, else ``model(item)``."""
    if isinstance(item, dict):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


def collect_linear_moments(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    calibration_data: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, InputMoments]:
    """``{weight name: InputMoments}`` of the ``linears`` (by weight name) over ``calibration_data``, each item run
    through ``forward_fn(model, item)`` (default :func:`default_forward`) in eval mode without gradients; the
    model's mode is restored. ``ValueError`` when the data holds no item, ``TypeError`` for a non-callable
    ``forward_fn``."""
    forward = default_forward if forward_fn is None else forward_fn
    if not callable(forward):
        raise TypeError(f"forward_fn must be callable as forward_fn(model, item), got {type(forward).__name__}")
    moments = {name: InputMoments.empty(linear.in_features, full=True) for name, linear in linears.items()}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach().to(torch.float64).cpu().numpy()
            if not np.isfinite(x).all():
                raise ValueError(f"the input activations of {name!r} are not finite on a calibration item")
            moments[name].add(x, -1)

        return hook

    handles = [linear.register_forward_hook(hook_for(name)) for name, linear in linears.items()]
    training = model.training
    items = 0
    try:
        model.eval()
        with torch.no_grad():
            for item in calibration_data:
                forward(model, item)
                items += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    if items == 0:
        raise ValueError("calibration_data yielded nothing")
    return moments
