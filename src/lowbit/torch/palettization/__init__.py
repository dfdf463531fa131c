"""Palettization of torch models: :class:`PostTrainingPalettizer`, :class:`SKMPalettizer` and (during training)
:class:`DKMPalettizer`, with the configs of
``coremltools.optimize.torch.palettization`` (a user of it changes only the import)."""

from lowbit.torch.palettization.dkm import DKMPalettizer, FakePalettize
from lowbit.torch.palettization.dkm_config import DKMPalettizerConfig, ModuleDKMPalettizerConfig
from lowbit.torch.palettization.post_training import (
    ModulePostTrainingPalettizerConfig,
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
)
from lowbit.torch.palettization.sensitive import ModuleSKMPalettizerConfig, SKMPalettizer, SKMPalettizerConfig
from lowbit.torch.records import load_state_dict, palettization_of

__all__ = [
    "DKMPalettizer",
    "DKMPalettizerConfig",
    "FakePalettize",
    "ModuleDKMPalettizerConfig",
    "ModulePostTrainingPalettizerConfig",
    "ModuleSKMPalettizerConfig",
    "PostTrainingPalettizer",
    "PostTrainingPalettizerConfig",
    "SKMPalettizer",
    "SKMPalettizerConfig",
    "load_state_dict",
    "palettization_of",
]
