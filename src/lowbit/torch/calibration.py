"""Calibration on the torch door: forward hooks on the modules being compressed (Linear, convolutions,
embeddings) accumulate each weight's :class:`~lowbit.statistics.InputMoments` (the whole ``X^T X`` of a Linear's
input, a convolution's over its input's windows, an embedding's lookup counts), streamed item by item, into the same
slot the graph door fills from ONNX Runtime."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.calibration import add_activations, empty_moments, keeps_gram
from lowbit.kernels.patches import Window
from lowbit.statistics import FLOAT32_SAFE, GRAM_CHUNK, InputMoments

__all__ = [
    "Enough",
    "ModuleMoments",
    "collect_module_moments",
    "collect_output_gradients",
    "default_forward",
    "evaluating",
    "forward_of",
    "moments_of",
    "reads_rows",
    "run_items",
    "window_of",
]


def default_forward(model: nn.Module, item: Any) -> Any:
    """``model(**item)`` for a dict, ``model(*item)`` for a tuple or list, else ``model(item)``."""
    if isinstance(item, dict):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


class Enough(BaseException):
    """Raised by a hook once every hooked module has seen this item's input: the rest of the forward is not needed.
    A ``BaseException``, so that a ``forward_fn`` catching ``Exception`` does not swallow it."""


def forward_of(forward_fn: Callable[[nn.Module, Any], Any] | None) -> Callable[[nn.Module, Any], Any]:
    forward = default_forward if forward_fn is None else forward_fn
    if not callable(forward):
        raise TypeError(f"forward_fn must be callable as forward_fn(model, item), got {type(forward).__name__}")
    return forward


@contextlib.contextmanager
def evaluating(model: nn.Module, handles: Iterable[Any] = (), gradients: bool = False) -> Iterator[None]:
    """``model`` in eval mode, without gradients unless ``gradients``; its mode restored and the hook ``handles``
    removed after."""
    training = model.training
    try:
        model.eval()
        with torch.enable_grad() if gradients else torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)


def run_items(
    model: nn.Module,
    handles: list[Any],
    calibration_data: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    after_item: Callable[[], None] = lambda: None,
    gradients: bool = False,
) -> int:
    """Run every item through ``forward(model, item)`` in eval mode, without gradients unless ``gradients``, with
    the hooks whose ``handles`` are given (a hook may end an item's forward with :class:`Enough`); the hooks are
    removed and the model's mode restored. Returns how many items ran; ``ValueError`` when there was none."""
    items = 0
    with evaluating(model, handles, gradients):
        for item in calibration_data:
            with contextlib.suppress(Enough):
                forward(model, item)
            after_item()
            items += 1
    if items == 0:
        raise ValueError("calibration_data yielded nothing")
    return items


def moments_of(activations: torch.Tensor, full: bool) -> InputMoments:
    """The :class:`InputMoments` of ``activations`` (input channels last), as :meth:`InputMoments.add` computes
    them (the same sums of float32 chunks, float64 past :data:`FLOAT32_SAFE`), but in torch: numpy's BLAS threads
    then stay idle between forwards, where their spinning would slow torch's own threads two-fold."""
    x = activations.reshape(-1, activations.shape[-1]).cpu()
    wide = x.to(torch.float64)
    squares = (wide * wide).sum(0).numpy()
    if not full:
        return InputMoments(squares, x.shape[0])
    narrow = wide if float(wide.abs().max()) > FLOAT32_SAFE else x.to(torch.float32)
    gram = torch.zeros((x.shape[1], x.shape[1]), dtype=narrow.dtype)
    for chunk in narrow.split(GRAM_CHUNK):
        gram += chunk.T @ chunk
    return InputMoments(squares, x.shape[0], gram.numpy())


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


_STOCK_FORWARDS = {conv.forward for conv in CONVS + TRANSPOSED_CONVS}


def reads_rows(module: nn.Module) -> bool:
    """Whether calibration reads ``module``'s input as rows its weight multiplies: a Linear, a convolution or a
    transposed one (of any groups: a grouped one's ``X^T X`` kept as its groups' blocks), with the stock ``forward``
    (a subclass that pads in its own ``forward``, as timm's ``Conv2dSame`` does, would multiply other windows than
    its attributes say)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, CONVS + TRANSPOSED_CONVS) and type(module).forward in _STOCK_FORWARDS


def window_of(module: nn.Module, sizes: tuple[torch.Size, torch.Size] | None = None) -> Window | None:
    """A convolution's :class:`~lowbit.kernels.patches.Window` (None for any other module); a transposed one's
    output padding read off the spatial ``sizes`` (input, output) of a call when given (``output_size`` sets it)."""
    if not isinstance(module, CONVS + TRANSPOSED_CONVS):
        return None
    kernel = tuple(int(k) for k in module.kernel_size)
    padding = module.padding
    pads = ((0, 0),) * len(kernel) if isinstance(padding, str) else tuple((int(p), int(p)) for p in padding)
    strides, dilations = (tuple(int(v) for v in values) for values in (module.stride, module.dilation))
    if isinstance(module, CONVS):
        same = "upper" if padding == "same" else ""
        return Window(kernel, strides, dilations, pads, same, _PAD_MODES[module.padding_mode])
    extra = tuple(int(p) for p in module.output_padding)
    if sizes is not None:  # the output's size less what the attributes give without output padding
        spans = zip(*sizes, strides, pads, dilations, kernel, strict=True)
        extra = tuple(n - (i - 1) * s + 2 * p[0] - d * (k - 1) - 1 for i, n, s, p, d, k in spans)
    return Window(kernel, strides, dilations, pads, transposed=True, output_padding=extra)


class ModuleMoments:
    """Forward hooks on Linear modules (and convolutions, and embeddings) that accumulate each one's input
    :class:`InputMoments` (``full``: the whole ``X^T X``, else the diagonal; a convolution's over its input's
    windows, as the graph door takes it; an embedding's rows' lookup counts), by weight name. Modules that read one
    tensor in an item (a transformer's q / k / v) share its moments, computed once. ``stop_early``: once every
    module has seen this item's input the forward ends (:class:`Enough`; a module called twice in one forward counts
    its first call only); call :meth:`item_done` after each item."""

    def __init__(self, modules: Mapping[str, nn.Module], full: bool = True, stop_early: bool = False) -> None:
        self.modules, self.full, self.stop_early = modules, full, stop_early
        self.moments = {name: _empty_moments(module, full) for name, module in modules.items()}
        self.seen: set[str] = set()
        # this item's inputs by (id, window, groups): the tensor, its version (bumped by in-place ops), its moments
        self.parts: dict[tuple[int, Window | None, int], tuple[torch.Tensor, int, InputMoments]] = {}

    def register(self) -> list[Any]:
        """Register the hooks; returns their handles."""
        return [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]

    def item_done(self) -> None:
        self.seen.clear()
        self.parts.clear()

    def _part(self, name: str, tensor: torch.Tensor, module: nn.Module, output: Any, full: bool) -> InputMoments:
        """The moments of ``tensor`` (this item's input of ``name``: a Linear's, its channels last, or a
        convolution's, read through its window and groups, a transposed one's to its ``output``'s size; the whole
        ``X^T X`` when ``full``), computed once per tensor, window and item (again when it was changed in place
        since)."""
        rank = len(getattr(module, "kernel_size", ()))
        sizes = (tensor.shape[-rank:], output.shape[-rank:]) if isinstance(module, TRANSPOSED_CONVS) else None
        window, groups = window_of(module, sizes), getattr(module, "groups", 1)
        known = self.parts.get((id(tensor), window, groups))
        if known is not None and known[0] is tensor and known[1] == tensor._version:
            return known[2]
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"the input activations of {name!r} are not finite on a calibration item")
        if window is None:
            part = moments_of(tensor.detach(), full)
        else:  # the graph door's windows and sums (numpy's: the same statistics, bit for bit)
            batched = tensor if tensor.ndim == len(window.kernel) + 2 else tensor.unsqueeze(0)  # torch takes [C, ...]
            part = empty_moments(batched.shape[1], full, window, groups)
            add_activations(part, batched.detach().float().cpu().numpy(), 1, window, groups)  # exact for fp16 / bf16
        self.parts[(id(tensor), window, groups)] = (tensor, tensor._version, part)
        return part

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if name in self.seen:
                return
            if isinstance(module, nn.Embedding):
                self.moments[name].add_lookups(inputs[0].detach().cpu().numpy())
            else:
                moments = self.moments[name]
                moments.merge(self._part(name, inputs[0], module, output, moments.gram is not None))
            if self.stop_early:
                self.seen.add(name)
                if len(self.seen) == len(self.moments):
                    raise Enough

        return hook


def _empty_moments(module: nn.Module, full: bool) -> InputMoments:
    """No rows yet for ``module``'s input: a Linear's or a convolution's (whole ``X^T X`` when ``full``), or an
    embedding's rows (their lookup counts, the graph door's Gather statistics)."""
    if isinstance(module, nn.Embedding):
        return InputMoments.lookups(module.num_embeddings)
    window, groups = window_of(module), int(getattr(module, "groups", 1))
    channels = int(module.in_channels if window is not None else module.in_features)  # type: ignore[arg-type]
    return empty_moments(channels, full and keeps_gram(channels, window, groups), window, groups)


def collect_module_moments(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calibration_data: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    full: bool = True,
    stop_early: bool = False,
) -> dict[str, InputMoments]:
    """``{weight name: InputMoments}`` of the ``modules`` (Linear, convolutions, embeddings) over
    ``calibration_data``, each item run through ``forward_fn(model, item)`` (default :func:`default_forward`) in eval
    mode without gradients; the model's mode is restored. ``full`` and ``stop_early``: see :class:`ModuleMoments`.
    ``ValueError`` when the data holds no item or an activation is not finite, ``TypeError`` for a non-callable
    ``forward_fn``."""
    forward = forward_of(forward_fn)
    hooks = ModuleMoments(modules, full, stop_early)
    run_items(model, hooks.register(), calibration_data, forward, hooks.item_done)
    return hooks.moments


def _graph_start(module: nn.Module, args: tuple) -> tuple | None:
    """A float input no gradient reaches, as a leaf that takes one: the outputs after it get theirs."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
        return (x.detach().requires_grad_(), *args[1:])
    return None


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """``model``'s parameters without ``requires_grad``, restored after."""
    wanted = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in wanted:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in wanted:
            p.requires_grad_(flag)


def collect_output_gradients(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    calibration_data: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
) -> dict[str, np.ndarray]:
    """Each Linear's mean squared gradient of ``loss_fn(model, item)`` with respect to its output channels, by
    weight name, over ``calibration_data``: one forward and backward per item in eval mode (the model's mode and
    gradients restored). With a layer's ``X^T X`` they give the loss change its output error makes (the outputs'
    Fisher information, K-FAC's factoring). No parameter's gradient is taken (their ``requires_grad`` is off for
    the pass, then restored): each Linear's input becomes where the graph starts when nothing before it needs a
    gradient. ``ValueError`` when the data holds no item; ``TypeError`` when ``loss_fn`` is not callable or does
    not return a scalar tensor."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, item), got {type(loss_fn).__name__}")
    squares = {name: torch.zeros(linear.out_features, dtype=torch.float64) for name, linear in linears.items()}
    rows = dict.fromkeys(linears, 0)

    def gradient_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            def on_gradient(gradient: torch.Tensor) -> None:
                wide = torch.promote_types(gradient.dtype, torch.float32)  # float32 ones not copied
                flat = gradient.detach().reshape(-1, gradient.shape[-1]).to(wide)
                squares[name] += (flat * flat).sum(0, dtype=torch.float64)
                rows[name] += flat.shape[0]

            if output.requires_grad:
                output.register_hook(on_gradient)

        return hook

    def backward(model: nn.Module, item: Any) -> None:
        loss = loss_fn(model, item)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        if loss.requires_grad:  # else no Linear reached the loss: their gradients stay zero
            loss.backward()
        model.zero_grad(set_to_none=True)

    handles = [m.register_forward_hook(gradient_hook(n)) for n, m in linears.items()]
    handles += [m.register_forward_pre_hook(_graph_start) for m in linears.values()]
    with _frozen(model):
        run_items(model, handles, calibration_data, backward, gradients=True)
    return {name: (squares[name] / max(rows[name], 1)).numpy() for name in linears}
