"""Palettization of torch models: :class:`PostTrainingPalettizer` and :class:`SKMPalettizer`, with the configs of
``coremltools.optimize.torch.palettization`` (a user of it changes only the import)."""

from lowbit.torch.palettization._base import palettization_of
from lowbit.torch.palettization.post_training import (
    ModulePostTrainingPalettizerConfig,
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
)
from lowbit.torch.palettization.sensitive import ModuleSKMPalettizerConfig, SKMPalettizer, SKMPalettizerConfig

__all__ = [
    "ModulePostTrainingPalettizerConfig",
    "ModuleSKMPalettizerConfig",
    "PostTrainingPalettizer",
    "PostTrainingPalettizerConfig",
    "SKMPalettizer",
    "SKMPalettizerConfig",
    "palettization_of",
]
