"""The integer rows shared by the benchmarks that set lowbit beside its peers: lowbit's int4
``PostTrainingQuantizer``, and round to nearest, HQQ (data-free) and llmcompressor's GPTQ, each of these quantizing
the Linear weights ``linears(model)`` names in groups of ``group`` input channels and writing the dequantized
weights into an fp32 copy of the model (the benchmark environment only: ``.venv-bench``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

Linears = Callable[[torch.nn.Module], dict[str, torch.nn.Linear]]


def integer_bits(bits: int, symmetric: bool, group: int) -> float:
    """Bits per weight of a packed int checkpoint: the codes, an fp16 scale per group, a zero point if asymmetric."""
    return bits + (16 + (0 if symmetric else bits)) / group


def int4_quantizer(model: torch.nn.Module, group: int, symmetric: bool, scale_search: bool, skip: dict[str, None]):
    """lowbit's ``PostTrainingQuantizer`` of ``model`` for int4 (symmetric) / uint4 (affine) blocks of ``group``
    input channels, the modules ``skip`` names left alone: its ``compress(calibration_data=...)`` chooses the codes
    by error feedback (the row these peers stand beside)."""
    from lowbit.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

    module = {
        "weight_dtype": "int4" if symmetric else "uint4",
        "granularity": "per_block",
        "block_size": group,
        "quantization_scheme": "symmetric" if symmetric else "affine",
        "scale_search": scale_search,
    }
    config = PostTrainingQuantizerConfig.from_dict({"global_config": module, "module_name_configs": skip})
    return PostTrainingQuantizer(model, config)


def rtn(model: torch.nn.Module, linears: Linears, bits: int, symmetric: bool, group: int) -> torch.nn.Module:
    """Round to nearest (the baseline every method should beat): symmetric codes in [-2^(b-1), 2^(b-1) - 1] with
    the scale max|w| / (2^(b-1) - 0.5); asymmetric ones in [0, 2^b - 1] from each group's min and max with an
    integer zero point."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for linear in linears(out).values():
            g = linear.weight.reshape(-1, group)
            if symmetric:
                top = 2 ** (bits - 1) - 1
                scale = (g.abs().amax(1, keepdim=True) / (top + 0.5)).clamp_min(1e-12)
                q = (g / scale).round().clamp(-top - 1, top) * scale
            else:
                top = 2**bits - 1
                low, high = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
                scale = ((high - low) / top).clamp_min(1e-12)
                zero = (-low / scale).round().clamp(0, top)
                q = ((g / scale + zero).round().clamp(0, top) - zero) * scale
            linear.weight.copy_(q.reshape(linear.weight.shape))
    return out


def hqq(model: torch.nn.Module, linears: Linears, bits: int, group: int) -> torch.nn.Module:
    """HQQ 0.2.8 (half-quadratic zero / scale optimization, data-free, asymmetric)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    out = copy.deepcopy(model)
    config = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    with torch.no_grad():
        for linear in linears(out).values():
            layer = HQQLinear(linear, quant_config=config, compute_dtype=torch.float32, device="cpu", del_orig=False)
            linear.weight.copy_(layer.dequantize().reshape(linear.weight.shape))
    return out


def gptq(
    model: torch.nn.Module,
    linears: Linears,
    bits: int,
    symmetric: bool,
    group: int,
    dataset: dict[str, list],
    ignore: list[str],
    prepare: Callable[[torch.nn.Module], None] | None = None,
    **oneshot_args: Any,
) -> torch.nn.Module:
    """llmcompressor 0.14's GPTQ (W{bits}A16 in groups, its default act-order, the sequential pipeline) of every
    Linear but ``ignore`` on ``dataset`` (columns of token lists, one sample a row); ``prepare`` is called on the
    copy of ``model`` that ``oneshot`` quantizes, ``oneshot_args`` go to ``oneshot`` (e.g. ``sequential_targets``)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group)
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=ignore
    )
    samples = len(next(iter(dataset.values())))
    work = copy.deepcopy(model)
    if prepare is not None:
        prepare(work)
    quantized = oneshot(
        model=work,
        dataset=Dataset.from_dict(dataset),
        recipe=recipe,
        pipeline="sequential",
        num_calibration_samples=samples,
        shuffle_calibration_samples=False,
        batch_size=1,
        **oneshot_args,
    )
    out = copy.deepcopy(model)  # the fake-quantized weights, in a plain fp32 model
    done = linears(quantized)
    with torch.no_grad():
        for name, linear in linears(out).items():
            linear.weight.copy_(done[name].weight.detach().float())
    return out
