"""Which weights of which torch modules are compressed, along which axes; reading and writing them as arrays."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "ModuleWeight",
    "computed_weights",
    "from_numpy",
    "is_supported",
    "module_weights",
    "numpy_dtype",
    "qualified_name",
    "to_numpy",
]

# (output-channel axis, input-channel axis) of the weights of each supported module class, as in the graph path's
# op table: a transposed convolution's weight is [C_in, C_out / groups, k...].
_AXES: dict[type[nn.Module], tuple[int, int]] = {
    nn.Linear: (0, 1),
    nn.Conv1d: (0, 1),
    nn.Conv2d: (0, 1),
    nn.Conv3d: (0, 1),
    nn.ConvTranspose1d: (1, 0),
    nn.ConvTranspose2d: (1, 0),
    nn.ConvTranspose3d: (1, 0),
    nn.Embedding: (0, 1),
    nn.MultiheadAttention: (0, 1),
    nn.LSTM: (0, 1),
    nn.GRU: (0, 1),
    nn.RNN: (0, 1),
}
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")


def _axes(module: nn.Module) -> tuple[int, int] | None:
    for cls in type(module).__mro__:
        if cls in _AXES:
            return _AXES[cls]
    return None


def qualified_name(module_name: str, name: str) -> str:
    """``name`` (a parameter's, relative to its module) as seen from the model: ``"0.weight"``, or ``"weight"`` for
    the model itself."""
    return f"{module_name}.{name}" if module_name else name


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` (or a subclass) is one the palettizers compress. A MultiheadAttention's ``out_proj``
    belongs to the attention module, not to itself."""
    return _axes(module) is not None and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


@dataclass(frozen=True)
class ModuleWeight:
    """One weight of a supported module: its parameter name within the module (``out_proj.weight`` for an
    attention's output projection) and its channel axes."""

    name: str
    parameter: nn.Parameter
    output_axis: int
    input_axis: int


def module_weights(module: nn.Module) -> Iterator[ModuleWeight]:
    """The weights of a supported module: ``weight``; an attention's projections; every ``weight_ih_l*`` /
    ``weight_hh_l*`` of a recurrent layer (biases are left dense)."""
    axes = _axes(module)
    if axes is None:
        return
    for name in _weight_names(module):
        owner_name, _, leaf = name.rpartition(".")
        if parametrize.is_parametrized(module.get_submodule(owner_name), leaf):
            continue  # computed: see computed_weights
        try:
            param = module.get_parameter(name)
        except AttributeError:  # e.g. in_proj_weight of an attention with separate q/k/v projections
            continue
        yield ModuleWeight(name, param, *axes)


def _weight_names(module: nn.Module) -> tuple[str, ...]:
    if isinstance(module, nn.MultiheadAttention):
        return _ATTENTION_WEIGHTS
    if isinstance(module, nn.RNNBase):
        return tuple(n for n in module._flat_weights_names if n.startswith("weight_"))
    return ("weight",)


def computed_weights(module: nn.Module) -> Iterator[tuple[str, str]]:
    """The weights of a supported module that are not parameters but computed, with why they are left as they
    are: by a parametrization (``torch.nn.utils.parametrize``, ``parametrizations.weight_norm``, ...) or in a
    forward pre-hook (the older ``torch.nn.utils.weight_norm``)."""
    if _axes(module) is None:
        return
    for name in _weight_names(module):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if parametrize.is_parametrized(owner, leaf):
            kinds = ", ".join(type(p).__name__ for p in owner.parametrizations[leaf])  # type: ignore[index, union-attr]
            yield (
                name,
                (
                    f"computed by a parametrization ({kinds}): remove it first "
                    f"(torch.nn.utils.parametrize.remove_parametrizations(module, {leaf!r}))"
                ),
            )
        elif isinstance(getattr(owner, leaf, None), torch.Tensor) and not isinstance(
            getattr(owner, leaf), nn.Parameter
        ):
            yield name, "computed before each forward (e.g. torch.nn.utils.weight_norm): remove that hook first"


_NUMPY_DTYPES = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.float64: np.dtype(np.float64),
}


def numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    """The numpy dtype :func:`to_numpy` gives a float tensor of ``dtype`` (None for other types)."""
    return _NUMPY_DTYPES.get(dtype)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values as a numpy array of the same float type (bfloat16 as ``ml_dtypes.bfloat16``), on the CPU;
    no copy for a contiguous CPU tensor."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``array`` as a tensor of ``like``'s dtype and device."""
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        t = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(array))
    return t.to(device=like.device, dtype=like.dtype)
