"""The per-weight report of a palettized torch model, in the graph path's table."""

from __future__ import annotations

from torch import nn

from lowbit.report import CompressionReport, WeightResult
from lowbit.torch.modules import is_supported, module_weights
from lowbit.torch.palettization._base import SKIPPED
from lowbit.torch.records import palettization_of

__all__ = ["report"]


def report(model: nn.Module) -> CompressionReport:
    """One row per weight of every supported module of ``model``: palettized (bytes of the dense and of the
    palettized form, relative MSE) or not (why). ``report(model).table()`` prints it as the graph path does."""
    rows = []
    for module_name, module in model.named_modules():
        if not is_supported(module):
            continue
        records, skipped = palettization_of(module), module.__dict__.get(SKIPPED, {})
        for weight in module_weights(module):
            param = weight.parameter
            name = f"{module_name}.{weight.name}" if module_name else weight.name
            shape, before = tuple(param.shape), param.numel() * param.element_size()
            op = type(module).__name__
            if weight.name in records:
                record = records[weight.name]
                rows.append(WeightResult(name, op, shape, before, record.nbytes, record.rel_mse, None, "palettized"))
            else:
                reason = skipped.get(weight.name, "not palettized")
                rows.append(WeightResult(name, op, shape, before, before, skipped=reason))
    return CompressionReport(rows)
