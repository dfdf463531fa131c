"""Vector k-means (``cluster_dim > 1``): k-means++ seeding and Lloyd iterations, per group, deterministic."""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["nearest_centers", "vector_kmeans"]

MAX_ITERATIONS = 100


@numba.njit(cache=True, nogil=True)
def _nearest(points: np.ndarray, centers: np.ndarray, labels: np.ndarray) -> bool:
    changed = False
    for p in range(points.shape[0]):
        best, best_c = np.inf, 0
        for c in range(centers.shape[0]):
            d = 0.0
            for t in range(points.shape[1]):
                diff = points[p, t] - centers[c, t]
                d += diff * diff
            if d < best:
                best, best_c = d, c
        if labels[p] != best_c:
            labels[p] = best_c
            changed = True
    return changed


@numba.njit(cache=True, nogil=True)
def _seed(points: np.ndarray, weights: np.ndarray, k: int, draws: np.ndarray) -> np.ndarray:
    """k-means++: each next center drawn with probability proportional to weight x squared distance."""
    n, dim = points.shape
    centers = np.empty((k, dim))
    total = weights.sum()
    cumulative = np.cumsum(weights)
    first = min(np.searchsorted(cumulative, draws[0] * total), n - 1)
    centers[0] = points[first]
    dist = np.empty(n)
    for p in range(n):
        d = 0.0
        for t in range(dim):
            diff = points[p, t] - centers[0, t]
            d += diff * diff
        dist[p] = d
    for c in range(1, k):
        scores = np.cumsum(dist * weights)
        if scores[-1] <= 0.0:
            centers[c] = centers[c - 1]
            continue
        pick = min(np.searchsorted(scores, draws[c] * scores[-1], side="right"), n - 1)
        centers[c] = points[pick]
        for p in range(n):
            d = 0.0
            for t in range(dim):
                diff = points[p, t] - centers[c, t]
                d += diff * diff
            dist[p] = min(dist[p], d)
    return centers


@numba.njit(cache=True, nogil=True)
def _lloyd(points: np.ndarray, weights: np.ndarray, centers: np.ndarray, labels: np.ndarray) -> None:
    k, dim = centers.shape
    for _ in range(MAX_ITERATIONS):
        if not _nearest(points, centers, labels):
            break
        sums = np.zeros((k, dim))
        mass = np.zeros(k)
        for p in range(points.shape[0]):
            mass[labels[p]] += weights[p]
            for t in range(dim):
                sums[labels[p], t] += weights[p] * points[p, t]
        for c in range(k):
            if mass[c] > 0.0:
                centers[c] = sums[c] / mass[c]


def vector_kmeans(points: np.ndarray, k: int, seed: int, weights: np.ndarray | None = None) -> np.ndarray:
    """``k`` centers ``(k, dim)`` for ``points`` ``(n, dim)``: exact when there are at most ``k`` distinct
    vectors (the LUT is those vectors, the last repeated), else k-means++ + Lloyd with a fixed ``seed``."""
    unique, inverse = np.unique(points, axis=0, return_inverse=True)
    mass = np.bincount(inverse.reshape(-1), weights=weights, minlength=len(unique)).astype(np.float64)
    if len(unique) <= k:
        return np.concatenate([unique, np.repeat(unique[-1:], k - len(unique), axis=0)]).astype(np.float64)
    draws = np.random.default_rng(seed).random(k)
    pts = np.ascontiguousarray(unique, np.float64)
    centers = _seed(pts, mass, k, draws)
    labels = np.full(len(pts), -1, np.int64)
    _lloyd(pts, mass, centers, labels)
    return centers


def nearest_centers(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest of ``centers`` (``(k, dim)``) for each of ``points`` (``(n, dim)``); ties: the lower."""
    labels = np.full(len(points), -1, np.int64)
    _nearest(np.ascontiguousarray(points, np.float64), np.ascontiguousarray(centers, np.float64), labels)
    return labels
