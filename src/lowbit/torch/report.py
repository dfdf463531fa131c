"""The per-weight report of a palettized or quantized torch model, in the graph path's table."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from lowbit.budget import allocation_note
from lowbit.report import CompressionReport, WeightResult
from lowbit.torch._compressor import ALLOCATED, SKIPPED
from lowbit.torch.modules import computed_weights, is_supported, module_weights, qualified_name
from lowbit.torch.records import palettization_of, quantization_of

__all__ = ["report"]


def report(model: nn.Module) -> CompressionReport:
    """One row per weight of every supported module of ``model``: palettized or quantized (bytes of the dense and
    of the compressed form, relative MSE), in DKM training (what ``finalize()`` would store now, and the error of
    the hard assignment), or not compressed (why). A weight tied to one listed before it counts its bytes once.
    ``report(model).table()`` prints it as the graph path does."""
    rows, seen = [], set()
    for module_name, module in model.named_modules():
        if not is_supported(module):
            continue
        records, skipped = palettization_of(module), module.__dict__.get(SKIPPED, {})
        quantized = quantization_of(module)
        allocated = module.__dict__.get(ALLOCATED, {})
        op = type(module).__name__.removeprefix("Parametrized")
        for name, reason in computed_weights(module):
            training = _in_training(module, name, qualified_name(module_name, name), op)
            if training is None:
                owner_name, _, leaf = name.rpartition(".")
                shape = tuple(getattr(module.get_submodule(owner_name), leaf).shape)
                training = WeightResult(qualified_name(module_name, name), op, shape, 0, 0, skipped=reason)
            rows.append(training)
        for weight in module_weights(module):
            param, name = weight.parameter, qualified_name(module_name, weight.name)
            shape, before = tuple(param.shape), param.numel() * param.element_size()
            if id(param) in seen:
                before = 0
            seen.add(id(param))
            if weight.name in records:
                record = records[weight.name]
                after, error = record.nbytes, record.rel_mse
                note = allocation_note(*allocated[weight.name]) if weight.name in allocated else None
                rows.append(WeightResult(name, op, shape, before, after, error, None, "palettized", note))
            elif weight.name in quantized:
                q = quantized[weight.name]
                rows.append(WeightResult(name, op, shape, before, q.nbytes, q.rel_mse, None, "quantized"))
            else:
                reason = skipped.get(weight.name, "not compressed")
                rows.append(WeightResult(name, op, shape, before, before, skipped=reason))
    return CompressionReport(rows)


def _in_training(module: nn.Module, name: str, qualified: str, op: str) -> WeightResult | None:
    """The row of a weight DKM is training (a :class:`FakePalettize` parametrization), else None."""
    from lowbit.torch.palettization.dkm import FakePalettize

    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if not parametrize.is_parametrized(owner, leaf):
        return None
    chain: parametrize.ParametrizationList = owner.parametrizations[leaf]  # type: ignore[index, assignment]
    fake = next((p for p in chain if isinstance(p, FakePalettize)), None)
    if fake is None:
        return None
    latent = chain.original
    status, after, error = fake.describe(latent)
    before = latent.numel() * latent.element_size()
    return WeightResult(
        qualified, f"{op} [DKM: {status}]", tuple(latent.shape), before, after, error, None, "palettized"
    )
