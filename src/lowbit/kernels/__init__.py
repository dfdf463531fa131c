"""numpy-only compression kernels: arrays in, arrays out. Nothing here imports onnx or torch."""


class CannotCompress(ValueError):
    """A kernel's refusal: this weight cannot be compressed as asked (passes skip it with a warning)."""
