"""Exact weighted 1-D k-means (optimal scalar palettization), batched over groups.

The optimal k-means partition of sorted values is contiguous, so it is a dynamic program over prefix sums:
``D[c][j] = min_i D[c-1][i] + cost(i, j)``, where ``cost(i, j)`` is the weighted squared error of values ``i..j-1``
around their mean (O(1) from prefix sums of ``w``, ``w*x``, ``w*x^2``). The optimal split points are monotone in
``j``, so each layer is solved by divide and conquer in O(m log m) (Wang & Song 2011; Grønlund et al. 2017).

Weights enter as their distinct values with multiplicities (histograms), so the cost depends on the number of
distinct values, not on the weight count.

The fast path is a Lagrangian relaxation: ``D[j] = min_i D[i] + cost(i, j) + lam`` has no cluster count; since the
optimal cost is convex in the count, a ``lam`` whose optimum has exactly ``k`` clusters gives an optimal
``k``-partition. One penalized solve is a single pass with a monotone queue of candidate split points (by the
quadrangle inequality, a later candidate that beats an earlier one keeps beating it), O(m log m) whatever ``k``.
``lam`` starts from a Lloyd estimate of the k-cluster error and is then found by intersecting the lines of the two
tightest solves (the lower convex hull of cost against count). When no ``lam`` gives exactly ``k`` (``k`` on a flat
stretch of the hull), the layered divide-and-conquer dynamic program above answers.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

__all__ = ["optimal_centroids"]

_LAYERED_UP_TO = 4
WARM_SPAN = 16  # groups whose penalty search warm-starts from the previous group's (threads split at multiples)


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
def _prefix_sums(x: np.ndarray, w: np.ndarray):
    """(cw, cx, cxx, shift): prefix sums of w, w*d, w*d^2 with d = x - shift, shift the weighted mean."""
    m = x.shape[0]
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
    return cw, cx, cxx, shift


@numba.njit(cache=True, nogil=True)
def _layered(cw, cx, cxx, shift: float, m: int, k: int, centroids: np.ndarray) -> None:
    """The layered dynamic program: optimal ``k`` centroids in O(k m log m)."""
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
def _penalized(cw, cx, cxx, m: int, lam: float, d: np.ndarray, cnt: np.ndarray, arg: np.ndarray, qi, qs) -> None:
    """``d[j] = min_i d[i] + cost(i, j) + lam`` for j = 1..m with a monotone queue: ``qi[h:t]`` are the candidate
    split points still in play, ``qs`` the first ``j`` each one is best for; a new candidate's start is found by
    galloping, then binary search, against the last one. Ties go to the later candidate. ``cnt[j]``: clusters of
    ``d[j]``."""
    d[0] = 0.0
    cnt[0] = 0
    head, tail = 0, 1
    qi[0], qs[0] = 0, 1
    for j in range(1, m + 1):
        while tail - head > 1 and qs[head + 1] <= j:
            head += 1
        i = qi[head]
        d[j] = d[i] + _cost(i, j, cw, cx, cxx) + lam
        cnt[j] = cnt[i] + 1
        arg[j] = i
        if j == m:
            return
        start = j + 1
        while tail > head:  # drop the candidates the new one beats from where they would start
            last = qi[tail - 1]
            s = max(qs[tail - 1], start)
            if d[j] + _cost(j, s, cw, cx, cxx) <= d[last] + _cost(last, s, cw, cx, cxx):
                tail -= 1
            else:
                break
        if tail == head:
            qi[tail], qs[tail] = j, start
            tail += 1
            continue
        last = qi[tail - 1]
        # gallop from where ``last`` starts to the first p where the new candidate wins (crossovers lie close)
        base = max(qs[tail - 1], start)
        step = 1
        lo = base + 1
        while True:
            p = base + step
            if p >= m:
                p = m
            if d[j] + _cost(j, p, cw, cx, cxx) <= d[last] + _cost(last, p, cw, cx, cxx):
                hi = p
                break
            if p == m:
                hi = -1
                break
            lo = p + 1
            step *= 2
        if hi < 0:
            continue  # never better within the range
        while lo < hi:
            mid = (lo + hi) >> 1
            if d[j] + _cost(j, mid, cw, cx, cxx) <= d[last] + _cost(last, mid, cw, cx, cxx):
                hi = mid
            else:
                lo = mid + 1
        qi[tail], qs[tail] = j, lo
        tail += 1


@numba.njit(cache=True, nogil=True)
def _lloyd_error(x: np.ndarray, cw, cx, cxx, m: int, k: int) -> float:
    """The error of ``k`` clusters after a few Lloyd steps from weighted quantiles: an estimate of the optimum."""
    bounds = np.empty(k + 1, np.int64)
    total = cw[m]
    for c in range(k + 1):
        bounds[c] = np.searchsorted(cw, total * c / k)
    bounds[0], bounds[k] = 0, m
    centers = np.empty(k)
    error = 0.0
    for _ in range(4):
        error = 0.0
        for c in range(k):
            a, b = bounds[c], bounds[c + 1]
            if b > a and cw[b] > cw[a]:
                centers[c] = x[a] if b - a == 1 else (cx[b] - cx[a]) / (cw[b] - cw[a])
                error += _cost(a, b, cw, cx, cxx)
            else:
                centers[c] = x[min(a, m - 1)] if c == 0 else centers[c - 1]
        for c in range(1, k):
            bounds[c] = max(bounds[c - 1], np.searchsorted(x, (centers[c - 1] + centers[c]) / 2))
    return error


@numba.njit(cache=True, nogil=True)
def _lagrangian(
    x: np.ndarray, cw, cx, cxx, shift: float, m: int, k: int, centroids: np.ndarray, warm: np.ndarray
) -> bool:
    """Optimal ``k`` centroids by Lagrangian relaxation; False when no penalty gives exactly ``k`` clusters.

    ``warm``: (penalty, error estimate) of the previous group that found one (penalty 0: none yet); similar groups
    have penalties in proportion to their errors, so it starts the search (about half the solves of a cold
    start, measured), and is updated for the next group."""
    d = np.empty(m + 1)
    cnt = np.empty(m + 1, np.int64)
    arg = np.empty(m + 1, np.int64)
    qi = np.empty(m + 1, np.int64)
    qs = np.empty(m + 1, np.int64)
    # hull points (cost, count) bracketing k: m clusters cost 0, one cluster costs everything
    lo_cost, lo_count = 0.0, m
    hi_cost, hi_count = _cost(0, m, cw, cx, cxx), 1
    x_centered = x - shift
    estimate = _lloyd_error(x_centered, cw, cx, cxx, m, k)
    lam = warm[0] * estimate / warm[1] if warm[0] > 0.0 and warm[1] > 0.0 else 2.0 * estimate / k
    for _ in range(64):
        if not lam > 0.0:
            return False
        _penalized(cw, cx, cxx, m, lam, d, cnt, arg, qi, qs)
        count = cnt[m]
        cost = d[m] - lam * count
        if count == k:
            j = m
            for c in range(k, 0, -1):
                i = arg[j]
                centroids[c - 1] = (cx[j] - cx[i]) / (cw[j] - cw[i]) + shift
                j = i
            warm[0], warm[1] = lam, estimate
            return True
        bracketed = lo_count < m and hi_count > 1
        if count > k and count < lo_count:
            lo_cost, lo_count = cost, count
        elif count < k and count > hi_count:
            hi_cost, hi_count = cost, count
        elif bracketed:
            return False  # the line of lo and hi holds no other hull point: k sits on a flat stretch
        if lo_count < m and hi_count > 1:  # between two solves: where their lines meet
            lam = (hi_cost - lo_cost) / (lo_count - hi_count)
        else:  # one side is still a trivial end: jump by the error's ~count^-2 law (slope ~count^-3)
            lam *= (count / k) ** 3
    return False


@numba.njit(cache=True, nogil=True)
def _solve_group(x: np.ndarray, w: np.ndarray, k: int, centroids: np.ndarray, warm: np.ndarray) -> None:
    """Optimal ``k`` centroids of sorted distinct values ``x`` with weights ``w``; writes ``centroids`` (sorted).
    ``warm``: see :func:`_lagrangian`."""
    m = x.shape[0]
    if m <= k:
        for c in range(k):
            centroids[c] = x[min(c, m - 1)]
        return
    cw, cx, cxx, shift = _prefix_sums(x, w)
    # up to 4 clusters the layered program's k passes cost less than the penalized solves (measured: 0.9 vs 2 ms)
    if k <= _LAYERED_UP_TO or not _lagrangian(x, cw, cx, cxx, shift, m, k, centroids, warm):
        _layered(cw, cx, cxx, shift, m, k, centroids)


@numba.njit(cache=True, nogil=True)
def _solve_groups(x: np.ndarray, w: np.ndarray, offsets: np.ndarray, k: int) -> np.ndarray:
    groups = offsets.shape[0] - 1
    out = np.empty((groups, k))
    warm = np.zeros(2)
    for g in range(groups):
        if g % WARM_SPAN == 0:  # warm starts chain within fixed spans: the result cannot depend on threads
            warm[:] = 0.0
        a, b = offsets[g], offsets[g + 1]
        _solve_group(x[a:b], w[a:b], k, out[g], warm)
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
    spans = -(-groups // WARM_SPAN)
    bounds = np.unique(np.minimum(np.linspace(0, spans, min(chunks, spans) + 1).astype(int) * WARM_SPAN, groups))
    if len(bounds) <= 2:
        return _solve_groups(values, weights, offsets, int(k))

    def solve(a: int, b: int) -> np.ndarray:
        lo, hi = offsets[a], offsets[b]
        return _solve_groups(values[lo:hi], weights[lo:hi], offsets[a : b + 1] - lo, int(k))

    with ThreadPoolExecutor(len(bounds) - 1) as pool:
        return np.concatenate(list(pool.map(solve, bounds[:-1], bounds[1:])))
