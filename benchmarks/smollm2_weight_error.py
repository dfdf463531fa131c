"""SmolLM2-135M: relative weight error of lowbit's and coremltools' 4-bit PostTraining palettization, same weights.

    .venv-bench/bin/python benchmarks/smollm2_weight_error.py

Perplexity at 4 bits differs between the two tools (``torch_palettize.py``); this prints what each one's LUTs cost
the weights themselves: sum of squared errors over sum of squares, over every palettized decoder weight.
"""

from __future__ import annotations

import logging
import warnings

import torch
from _common import one_core
from _smollm2 import load_smollm2
from torch_palettize import config_dict

import lowbit.torch.palettization as lowbit_palettization


def main() -> None:
    import coremltools.optimize.torch.palettization as coremltools_palettization

    one_core()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    _, model = load_smollm2()
    dense = dict(model.named_parameters())
    for granularity in ("per_tensor", "per_grouped_channel"):
        config = config_dict(4, granularity, skip=("lm_head", "model.embed_tokens"))
        errors = {}
        for name, tool in (("lowbit", lowbit_palettization), ("coremltools", coremltools_palettization)):
            palettized = tool.PostTrainingPalettizer(model, tool.PostTrainingPalettizerConfig.from_dict(config))
            squared = energy = 0.0
            for key, param in palettized.compress().named_parameters():
                if key.endswith("proj.weight"):
                    reference = dense[key].double()
                    squared += float(((param.double() - reference) ** 2).sum())
                    energy += float((reference**2).sum())
            errors[name] = squared / energy
        print(f"4-bit {granularity}: rel-MSE lowbit {errors['lowbit']:.9f}, coremltools {errors['coremltools']:.9f}")


if __name__ == "__main__":
    main()
