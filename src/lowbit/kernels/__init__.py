"""numpy-only compression kernels: arrays in, arrays out. Nothing here imports onnx or torch."""
