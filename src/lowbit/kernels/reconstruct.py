"""Pruned weights solved for the layer's output: which weights to keep (ADMM, with the sparsity reached gradually)
and the exact re-solve of the kept ones, each output channel's ``min_v (w - v)^T H (w - v)`` over ``v`` zero where
pruned, ``H = X^T X`` of the calibration activations (damped as the error feedback damps it).

Arrays in, arrays out; matrices ``[K, N]``: rows the K input channels, columns the N output channels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lowbit.kernels.feedback import FEEDBACK_DAMPING, damped_gram, kept_by_gram

__all__ = ["Select", "admm_prune", "refit_kept"]

# which weights to keep: (scores [K, N], the fraction of the target sparsity to reach now, in (0, 1]) -> keep [K, N]
Select = Callable[[np.ndarray, float], np.ndarray]

# ADMM's schedule (MiniLM's Linear layers, 50 % and 2:4: mean relative output error 0.0062 / 0.0135 against
# SparseGPT's 0.0100 / 0.0184; 30 iterations: the same, 1.35x the time; first penalty 0.1: 0.0069 / 0.0136, 0.01:
# 0.0081 / 0.0181)
ADMM_ITERATIONS = 20
ADMM_PENALTY = 0.03  # the first penalty, on the channels scaled to unit activation energy
ADMM_GROWTH = 1.4  # ... multiplied by this every second iteration, so that the iterates settle on one mask
ADMM_RAMP = 0.7  # the target sparsity is reached after this fraction of the iterations (cubic ramp)

REFIT_ITERATIONS = 25  # conjugate-gradient steps of refit_kept (MiniLM: 10 / 20 / 40 give the same cosine to 1e-4)
# ... from ADMM's values, already near the solve (MiniLM: mean output error 0.00623 / 0.01349 against 0.00622 /
# 0.01347 with 25; a SmolLM2 layer's re-solve is a third of its time)
ADMM_REFIT_ITERATIONS = 10
REFIT_TOLERANCE = 1e-12  # ... or fewer, once every output channel's squared residual has fallen this far (relative)


def admm_prune(
    w: np.ndarray, gram: np.ndarray, select: Select, damping: float = FEEDBACK_DAMPING
) -> tuple[np.ndarray, np.ndarray]:
    """(keep, values) of ``w`` ``[K, N]`` pruned for the smallest output error under ``gram`` (``X^T X``).

    ADMM on ``min ||X (w - v)||^2`` with ``v`` in the pruned set (after Boža, *Fast and Effective Weight Update for
    Pruned Large Language Models*, 2024), on the input channels scaled to unit (damped) activation energy, so that
    the penalty weighs every channel alike: a weight iterate solved under ``H`` plus a penalty toward its pruned
    copy (growing, so that the iterates settle on one mask; the dual is not rescaled as it grows), the pruned copy
    chosen by ``select`` from Wanda's score (``|v| * sqrt(diag X^T X)``, undamped, plus 1e-8 of its mean so that
    ties, e.g. channels never active, go by ``|v|``) of the iterate plus the dual. ``select`` gets the fraction of
    the target to reach, raised gradually (cubic, 1 after :data:`ADMM_RAMP` of the iterations) so that early
    choices can be undone (unstructured pruning ramps; n:m takes its pattern from the first step). SparseGPT fixes
    each kept weight once as it passes; here every weight can enter and leave the kept set until the penalty
    settles it. The kept values are then re-solved (:func:`refit_kept`, :data:`ADMM_REFIT_ITERATIONS` steps); an
    output channel that keeps every weight keeps ``w``. Float64 throughout, on one eigendecomposition per ``X^T X``
    (:func:`~lowbit.kernels.feedback.kept_by_gram`).
    """
    weights = np.asarray(w, dtype=np.float64)
    scale, eigenvalues, basis = kept_by_gram("scaled eigendecomposition", gram, damping, _scaled_eigh(damping))
    energy = np.sqrt(np.maximum(np.diag(np.asarray(gram, dtype=np.float64)), 0.0))
    energy += 1e-8 * (float(np.mean(energy)) or 1.0)
    kept, dual = weights * scale, np.zeros(weights.shape)
    target = eigenvalues[:, None] * (basis.T @ kept)  # the scaled H times the scaled weights, in the eigenbasis
    keep = np.ones(weights.shape, np.bool_)
    for step in range(ADMM_ITERATIONS):
        penalty = ADMM_PENALTY * ADMM_GROWTH ** (step // 2)
        shifted = basis @ ((target + penalty * (basis.T @ (kept - dual))) / (eigenvalues + penalty)[:, None]) + dual
        reached = 1.0 - (1.0 - min(1.0, (step + 1) / (ADMM_ITERATIONS * ADMM_RAMP))) ** 3
        keep = np.asarray(select(np.abs(shifted) * (energy[:, None] / scale), reached), dtype=np.bool_)
        kept = np.where(keep, shifted, 0.0)
        dual = shifted - kept
    start = np.where(keep.all(axis=0), weights, kept / scale)
    return keep, refit_kept(weights, gram, keep, start, damping, ADMM_REFIT_ITERATIONS)


def _scaled_eigh(damping: float) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """(each input channel's scale ``sqrt(diag H)`` [K, 1], the eigenvalues and eigenvectors of ``H`` scaled to a
    unit diagonal), ``H`` the damped ``X^T X``."""

    def compute(gram: np.ndarray) -> tuple[np.ndarray, ...]:
        h = damped_gram(gram, damping)
        scale = np.sqrt(np.diag(h))[:, None]
        return (scale, *np.linalg.eigh(h / scale / scale.T))

    return compute


def refit_kept(
    w: np.ndarray,
    gram: np.ndarray,
    keep: np.ndarray,
    start: np.ndarray,
    damping: float = FEEDBACK_DAMPING,
    iterations: int = REFIT_ITERATIONS,
) -> np.ndarray:
    """The kept weights of ``w`` ``[K, N]`` (``keep`` the same shape) re-solved for the smallest output error, each
    output channel's ``min_v (w - v)^T H (w - v)`` over ``v`` zero where not kept, ``H`` ``gram`` damped as
    :func:`~lowbit.kernels.feedback.inverse_factor` damps it: the exact re-solve of a fixed mask, up to the steps
    taken (about 1 % from the exact objective on a 1024-channel layer). Conjugate gradients from ``start`` (e.g. the
    error feedback's values), all output channels at once, Jacobi-preconditioned: at most ``iterations`` products
    with ``H``."""
    h = damped_gram(gram, damping)
    diagonal = np.diag(h)[:, None]
    mask = np.asarray(keep, dtype=np.float64)
    values = np.asarray(start, dtype=np.float64) * mask
    residual = mask * (h @ (np.asarray(w, dtype=np.float64) - values))
    z = residual / diagonal
    direction, rz = z.copy(), (residual * z).sum(0)
    first = np.maximum(rz, np.finfo(np.float64).tiny)
    for _ in range(iterations):
        if (rz <= REFIT_TOLERANCE * first).all():
            break
        product = mask * (h @ direction)
        curvature = (direction * product).sum(0)
        step = np.divide(rz, curvature, out=np.zeros_like(rz), where=curvature > 0)
        values += step * direction
        residual -= step * product
        z = residual / diagonal
        rz, previous = (residual * z).sum(0), rz
        direction = z + np.divide(rz, previous, out=np.zeros_like(rz), where=previous > 0) * direction
    return values
