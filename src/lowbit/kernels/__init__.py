"""numpy-only compression kernels: arrays in, arrays out. Nothing here imports onnx or torch."""


class CannotCompress(ValueError):
    """A kernel's refusal: this weight cannot be compressed as asked (passes skip it with a warning)."""


def check_finite(values) -> None:
    """Raise :class:`CannotCompress` when ``values`` holds NaN or Inf."""
    import numpy as np

    if not np.isfinite(values).all():
        raise CannotCompress("contains NaN or Inf")
