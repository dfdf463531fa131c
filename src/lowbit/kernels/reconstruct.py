"""Pruned weights solved for the layer's output: which weights to keep (ADMM, with the sparsity reached gradually)
and the exact re-solve of the kept ones, each output channel's ``min_v (w - v)^T H (w - v)`` over ``v`` zero where
pruned, ``H = X^T X`` of the calibration activations (damped as the error feedback damps it).

Arrays in, arrays out; matrices ``[K, N]``: rows the K input channels, columns the N output channels.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from lowbit.kernels.feedback import FEEDBACK_DAMPING, damped_gram, kept_by_gram

__all__ = ["Select", "admm_prune", "refit_kept"]

# which weights to keep: (scores [N, K], a row per output channel, the fraction of the target sparsity to reach now,
# in (0, 1]) -> keep [N, K]
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
    ties, e.g. channels never active, go by ``|v|``) of the iterate plus the dual, given ``[N, K]`` (each output
    channel's scores along contiguous memory, as the iterates are held). ``select`` gets the fraction of the target
    to reach, raised gradually (cubic, 1 after :data:`ADMM_RAMP` of the iterations) so that early choices can be
    undone (unstructured pruning ramps; n:m takes its pattern from the first step). SparseGPT fixes each kept weight
    once as it passes; here every weight can enter and leave the kept set until the penalty settles it. The kept
    values are then re-solved (:func:`refit_kept`, :data:`ADMM_REFIT_ITERATIONS` steps); an output channel that
    keeps every weight keeps ``w``. One eigendecomposition per ``X^T X`` in float64
    (:func:`~lowbit.kernels.feedback.kept_by_gram`); the iterations in float32 (their products twice as fast; on
    SmolLM2's layers the same output error to 1e-4: the rounding moves a few near-ties between kept and pruned); the
    re-solve's products in float32 too, its values and residuals in float64. ``ValueError`` when ``select``
    returns a mask of another shape than its scores'.
    """
    rows = np.ascontiguousarray(np.asarray(w).T, dtype=np.float64)  # [N, K]
    scale, eigenvalues, basis = kept_by_gram("scaled eigendecomposition", gram, damping, _scaled_eigh(damping))
    energy = np.sqrt(np.maximum(np.diag(gram).astype(np.float64), 0.0))
    energy += 1e-8 * (float(np.mean(energy)) or 1.0)
    basis, weight = basis.astype(np.float32), (energy / scale).astype(np.float32)
    signed = (rows * scale).astype(np.float32)  # the pruned copy minus the dual; first the scaled weights
    target = (signed @ basis) * eigenvalues.astype(np.float32)  # the scaled H times the scaled weights, rotated
    dual, rotated, shifted, scores = (np.zeros(rows.shape, np.float32) for _ in range(4))
    keep = np.ones(rows.shape, np.bool_)
    for step in range(ADMM_ITERATIONS):
        penalty = ADMM_PENALTY * ADMM_GROWTH ** (step // 2)
        np.matmul(signed, basis, out=rotated)
        rotated *= np.float32(penalty)
        rotated += target
        rotated /= (eigenvalues + penalty).astype(np.float32)
        np.matmul(rotated, basis.T, out=shifted)
        _shifted_scores(shifted, dual, weight, scores)
        reached = 1.0 - (1.0 - min(1.0, (step + 1) / (ADMM_ITERATIONS * ADMM_RAMP))) ** 3
        keep = np.ascontiguousarray(select(scores, reached), dtype=np.bool_)
        if keep.shape != scores.shape:  # the compiled split below reads keep unchecked
            raise ValueError(
                f"select must return a mask of its scores' shape {scores.shape} ([N, K]), not {keep.shape}"
            )
        _split(shifted, keep, signed, dual)
    start = np.where(keep.all(axis=1, keepdims=True), rows, np.where(keep, shifted, 0.0) / scale)
    values = _refit_rows(rows, gram, keep, start, damping, ADMM_REFIT_ITERATIONS)
    return np.ascontiguousarray(keep.T), np.ascontiguousarray(values.T)


@numba.njit(cache=True, nogil=True)
def _shifted_scores(shifted: np.ndarray, dual: np.ndarray, weight: np.ndarray, scores: np.ndarray) -> None:
    """ADMM's iterate plus the dual, in place, and its scores ``|shifted| * weight`` (per input channel)."""
    rows, k = shifted.shape
    for i in range(rows):
        for j in range(k):
            value = shifted[i, j] + dual[i, j]
            shifted[i, j] = value
            scores[i, j] = abs(value) * weight[j]


@numba.njit(cache=True, nogil=True)
def _split(shifted: np.ndarray, keep: np.ndarray, signed: np.ndarray, dual: np.ndarray) -> None:
    """ADMM's iterate split by ``keep`` into its pruned copy and the dual (what pruning took), written as the next
    solve reads them: the copy minus the dual (``±shifted``) and the dual."""
    rows, k = shifted.shape
    for i in range(rows):
        for j in range(k):
            value = shifted[i, j]
            signed[i, j] = value if keep[i, j] else -value
            dual[i, j] = 0.0 if keep[i, j] else value


def _scaled_eigh(damping: float) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """(each input channel's scale ``sqrt(diag H)`` [K], the eigenvalues and eigenvectors of ``H`` scaled to a
    unit diagonal), ``H`` the damped ``X^T X``."""

    def compute(gram: np.ndarray) -> tuple[np.ndarray, ...]:
        h = damped_gram(gram, damping)
        scale = np.sqrt(np.diag(h))
        return (scale, *np.linalg.eigh(h / scale[:, None] / scale))

    return compute


def refit_kept(
    w: np.ndarray,
    gram: np.ndarray,
    keep: np.ndarray,
    start: np.ndarray,
    damping: float = FEEDBACK_DAMPING,
    iterations: int = REFIT_ITERATIONS,
) -> np.ndarray:
    """The kept weights of ``w`` ``[K, N]`` (``keep`` and ``start`` its shape, or broadcast to it) re-solved for
    the smallest output error, each output channel's ``min_v (w - v)^T H (w - v)`` over ``v`` zero where not kept,
    ``H`` ``gram`` damped as :func:`~lowbit.kernels.feedback.inverse_factor` damps it: the exact re-solve of a fixed
    mask, up to the steps taken (about 1 % from the exact objective on a 1024-channel layer). Conjugate gradients
    from ``start`` (e.g. the error feedback's values), all output channels at once, Jacobi-preconditioned: at most
    ``iterations`` products with ``H``, in float32 (SmolLM2's layers: the same output error to 1e-7 relative, 10 %
    less time; a rank-32 ``X^T X`` of 512 channels, the damping its floor: 2e-4), the values and residuals summed in
    float64."""
    w = np.asarray(w)
    rows = [np.ascontiguousarray(np.broadcast_to(a, w.shape).T) for a in (w, keep, start)]
    return np.ascontiguousarray(_refit_rows(rows[0], gram, rows[1], rows[2], damping, iterations).T)


def _refit_rows(
    w: np.ndarray, gram: np.ndarray, keep: np.ndarray, start: np.ndarray, damping: float, iterations: int
) -> np.ndarray:
    """:func:`refit_kept` on ``[N, K]`` arrays (a row per output channel)."""
    h = damped_gram(gram, damping)
    inverse_diagonal = 1.0 / np.diag(h)
    keep = np.ascontiguousarray(keep, dtype=np.bool_)
    values = np.where(keep, np.asarray(start, dtype=np.float64), 0.0)
    residual = np.where(keep, (np.asarray(w, dtype=np.float64) - values) @ h, 0.0)
    z = residual * inverse_diagonal
    direction, rz = z.copy(), np.einsum("nk,nk->n", residual, z)
    first = np.maximum(rz, np.finfo(np.float64).tiny)
    h32 = h.astype(np.float32)
    direction32, product = (np.empty(values.shape, np.float32) for _ in range(2))
    for _ in range(iterations):
        if (rz <= REFIT_TOLERANCE * first).all():
            break
        np.copyto(direction32, direction)
        np.matmul(direction32, h32, out=product)
        rz = _conjugate_step(keep, inverse_diagonal, rz, direction, product, values, residual)
    return values


@numba.njit(cache=True, nogil=True)
def _conjugate_step(
    keep: np.ndarray,
    inverse_diagonal: np.ndarray,
    rz: np.ndarray,
    direction: np.ndarray,
    product: np.ndarray,
    values: np.ndarray,
    residual: np.ndarray,
) -> np.ndarray:
    """One step of :func:`_refit_rows`'s conjugate gradients after the product ``direction @ H``, in place, row by
    row (each output channel's own): the product masked, the step along ``direction``, the residual, and the next
    direction; returns each row's new ``r . z``."""
    rows, k = values.shape
    updated = np.zeros(rows)
    for i in range(rows):
        curvature = 0.0
        for j in range(k):
            if not keep[i, j]:
                product[i, j] = 0.0
            curvature += direction[i, j] * product[i, j]
        step = rz[i] / curvature if curvature > 0 else 0.0
        dot = 0.0
        for j in range(k):
            values[i, j] += step * direction[i, j]
            residual[i, j] -= step * product[i, j]
            dot += residual[i, j] * residual[i, j] * inverse_diagonal[j]
        beta = dot / rz[i] if rz[i] > 0 else 0.0
        for j in range(k):
            direction[i, j] = residual[i, j] * inverse_diagonal[j] + beta * direction[i, j]
        updated[i] = dot
    return updated
