"""Exact weighted 1-D k-means (optimal scalar palettization), batched over groups.

The optimal k-means partition of sorted values is contiguous, so it is a dynamic program over prefix sums:
``D[c][j] = min_i D[c-1][i] + cost(i, j)``, where ``cost(i, j)`` is the weighted squared error of values ``i..j-1``
around their mean (O(1) from prefix sums of ``w``, ``w*x``, ``w*x^2``). The optimal split points are monotone in
``j``, so each layer is solved by divide and conquer in O(m log m) (Wang & Song 2011; Grønlund et al. 2017).

Weights enter as their distinct values with multiplicities (histograms), so the cost depends on the number of
distinct values, not on the weight count.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

__all__ = ["optimal_centroids"]


@numba.njit(cache=True, nogil=True)
def _cost(i: int, j: int, cw: np.ndarray, cx: np.ndarray, cxx: np.ndarray) -> float:
    w = cw[j] - cw[i]
    if w <= 0.0:
        return 0.0
    s = cx[j] - cx[i]
    c = cxx[j] - cxx[i] - s * s / w
    return c if c > 0.0 else 0.0


@numba.njit(cache=True, nogil=True)
def _layer(prev: np.ndarray, cur: np.ndarray, arg: np.ndarray, floor: np.ndarray, c: int, m: int, cw, cx, cxx):
    """Fill ``cur[j]`` (j = c..m) from ``prev`` by divide and conquer over monotone split points.

    Split points grow with ``j`` (within a layer) and with the cluster count (``floor``: the previous layer's),
    so the candidates of ``j`` are bounded by its neighbours' and by ``floor[j]``.
    """
    # pending right halves (j_lo, j_hi, i_lo, i_hi); left halves are taken at once
    sj_lo = np.empty(64, np.int64)
    sj_hi = np.empty(64, np.int64)
    si_lo = np.empty(64, np.int64)
    si_hi = np.empty(64, np.int64)
    top = 0
    jl, jh, il, ih = c, m, c - 1, m - 1
    while True:
        if jl > jh:
            if top == 0:
                return
            top -= 1
            jl, jh, il, ih = sj_lo[top], sj_hi[top], si_lo[top], si_hi[top]
            continue
        mid = (jl + jh) >> 1
        lo = max(il, floor[mid])
        hi = min(ih, mid - 1)
        wj, xj, xxj = cw[mid], cx[mid], cxx[mid]
        best_i = lo
        best = np.inf
        for i in range(lo, hi + 1):
            s = xj - cx[i]
            v = prev[i] + (xxj - cxx[i]) - s * s / (wj - cw[i])
            if v < best:
                best = v
                best_i = i
        cur[mid] = best
        arg[mid] = best_i
        if mid < jh:
            sj_lo[top], sj_hi[top], si_lo[top], si_hi[top] = mid + 1, jh, best_i, ih
            top += 1
        jh, ih = mid - 1, best_i


@numba.njit(cache=True, nogil=True)
def _solve_group(x: np.ndarray, w: np.ndarray, k: int, centroids: np.ndarray) -> None:
    """Optimal ``k`` centroids of sorted distinct values ``x`` with weights ``w``; writes ``centroids`` (sorted)."""
    m = x.shape[0]
    if m <= k:
        for c in range(k):
            centroids[c] = x[min(c, m - 1)]
        return
    shift = 0.0
    total = 0.0
    for i in range(m):
        shift += w[i] * x[i]
        total += w[i]
    shift /= total
    cw = np.zeros(m + 1)
    cx = np.zeros(m + 1)
    cxx = np.zeros(m + 1)
    for i in range(m):
        d = x[i] - shift
        cw[i + 1] = cw[i] + w[i]
        cx[i + 1] = cx[i] + w[i] * d
        cxx[i + 1] = cxx[i] + w[i] * d * d
    prev = np.empty(m + 1)
    cur = np.empty(m + 1)
    args = np.zeros((k + 1, m + 1), np.int64)
    for j in range(m + 1):
        prev[j] = _cost(0, j, cw, cx, cxx)
    for c in range(2, k + 1):
        cur[:] = np.inf
        _layer(prev, cur, args[c], args[c - 1], c, m, cw, cx, cxx)
        prev, cur = cur, prev
    j = m
    for c in range(k, 0, -1):
        i = args[c, j] if c > 1 else 0
        centroids[c - 1] = (cx[j] - cx[i]) / (cw[j] - cw[i]) + shift
        j = i


@numba.njit(cache=True, nogil=True)
def _solve_groups(x: np.ndarray, w: np.ndarray, offsets: np.ndarray, k: int) -> np.ndarray:
    groups = offsets.shape[0] - 1
    out = np.empty((groups, k))
    for g in range(groups):
        a, b = offsets[g], offsets[g + 1]
        _solve_group(x[a:b], w[a:b], k, out[g])
    return out


def optimal_centroids(
    values: np.ndarray, weights: np.ndarray, offsets: np.ndarray, k: int, threads: int = 1
) -> np.ndarray:
    """Optimal ``k`` centroids (ascending) per group, in float64.

    Parameters
    ----------
    values : concatenated distinct values of all groups, each group's run sorted ascending (float64).
    weights : multiplicity (or importance) of each value, > 0.
    offsets : ``G + 1`` run boundaries into ``values``; every group is non-empty.
    k : number of centroids. A group with ``m <= k`` distinct values gets them exactly, the last one repeated.
    threads : split the groups over this many threads (the compiled solver releases the GIL); the result does
        not depend on it.
    """
    values = np.ascontiguousarray(values, np.float64)
    weights = np.ascontiguousarray(weights, np.float64)
    offsets = np.ascontiguousarray(offsets, np.int64)
    groups = len(offsets) - 1
    chunks = min(int(threads), groups)
    if chunks <= 1:
        return _solve_groups(values, weights, offsets, int(k))
    bounds = np.linspace(0, groups, chunks + 1).astype(int)

    def solve(a: int, b: int) -> np.ndarray:
        lo, hi = offsets[a], offsets[b]
        return _solve_groups(values[lo:hi], weights[lo:hi], offsets[a : b + 1] - lo, int(k))

    with ThreadPoolExecutor(chunks) as pool:
        return np.concatenate(list(pool.map(solve, bounds[:-1], bounds[1:])))
