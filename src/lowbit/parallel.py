"""How lowbit's threads share the cores with BLAS.

lowbit runs weights (the driver's pool) and widths (a budget's measure) on threads of its own; the kernels there
also call BLAS (error feedback's products, ``X^T X`` factors), whose own threads then compete with them for the same
cores. While two or more of lowbit's threads run, BLAS gets their share of the threads, one each when there are as
many workers as threads (threadpoolctl): the MiniLM graph door's calibrated 4-bit palettization took 8.8 s with two
BLAS threads under its four workers, 6.4 s with one; a SmolLM2 weight measured at five widths on two threads 0.86 s
against 0.65 s. A single thread (ADMM's pruning, quantization's one worker) keeps every BLAS thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from threadpoolctl import threadpool_limits

__all__ = ["blas_shared_by"]


@contextlib.contextmanager
def blas_shared_by(workers: int, threads: int | None = None) -> Iterator[None]:
    """Within the block, BLAS runs ``threads // workers`` threads per call (default one) when ``workers`` (> 1) of
    lowbit's threads share ``threads`` at once; with one worker, BLAS is left as it is. The limit is process-wide
    and restored on exit."""
    if workers <= 1:
        yield
        return
    with threadpool_limits(limits=max(1, (threads or workers) // workers), user_api="blas"):
        yield
