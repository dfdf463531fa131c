"""Linear quantization of torch models: :class:`PostTrainingQuantizer`, with the configs of
``coremltools.optimize.torch.quantization``'s post-training quantizer, and GPTQ's error feedback from calibration
data (lowbit's extension)."""

from lowbit.torch.quantization.post_training import (
    ModulePostTrainingQuantizerConfig,
    PostTrainingQuantizer,
    PostTrainingQuantizerConfig,
)
from lowbit.torch.records import quantization_of

__all__ = [
    "ModulePostTrainingQuantizerConfig",
    "PostTrainingQuantizer",
    "PostTrainingQuantizerConfig",
    "quantization_of",
]
