"""The exact 1-D k-means solver alone, per group: where its time goes, against ``kmeans1d`` (exact, O(k n)).

    .venv-bench/bin/python benchmarks/kmeans1d_solve.py    (or .venv/bin/python: no kmeans1d column)

One pinned core, k = 16. Columns:
- "solve ns/value": one penalized solve at the group's final penalty, per distinct value, each group solved once per
  pass over all of them (so the branch predictor has not learned the group: a second solve of the same group right
  after the first runs ~25 % faster, which is not what palettization sees);
- "floor ns/value": the same arithmetic with no queue and no branches (``b`` from the known split points plus the
  four comparisons a push makes at least): what the solve would cost if its branches were free;
- "group us": the whole exact solve of a group from its histogram (prefix sums, Lloyd estimate, penalty search on
  the coarse copy and the full problem, centroids), warm starts chained as in palettization;
- "kmeans1d us": ``kmeans1d.cluster`` on the group's raw values (it takes no weights), the same optimum.
"""

from __future__ import annotations

import time

from _common import gaussian_fp16, one_core, speedup, student_t_fp16, table

one_core()

import numba  # noqa: E402
import numpy as np  # noqa: E402

from lowbit.kernels import kmeans1d as solver  # noqa: E402
from lowbit.kernels.histogram import distinct_values  # noqa: E402

K = 16
PROBLEMS = {  # name: (weight, rows per group, groups measured)
    "gauss fp16 4096^2 grouped(16)": (lambda: gaussian_fp16(4096), 16, 32),
    "student-t fp16 4096^2 grouped(16)": (lambda: student_t_fp16(4096), 16, 32),
    "gauss fp16 1024^2 per-channel": (lambda: gaussian_fp16(1024), 1, 512),
}


@numba.njit(cache=False)
def _arithmetic_floor(sums, m, lam, b, arg):
    """``b`` along the known split points ``arg`` plus four comparisons per value, no queue, no branches."""
    b[0] = 0.0
    wins = 0
    for j in range(1, m + 1):
        solver._close(arg[j], j, lam, b, arg, sums)
        if j < m:
            probe = min(j + 300, m)
            wins += solver._wins(j, arg[j], probe, b, sums) + solver._losing(j, arg[j], probe, m, b, sums)
    return wins


def _groups(make, rows: int, count: int) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    w = make()
    raw = w.reshape(-1, rows * w.shape[1])[:count]
    h = distinct_values(raw.view(np.uint16), w.dtype)
    runs = [(h.values[a:b].copy(), h.weights[a:b].copy()) for a, b in zip(h.offsets[:-1], h.offsets[1:], strict=True)]
    return [r.astype(np.float64) for r in raw], runs


def _measure(raw: list[np.ndarray], runs: list[tuple[np.ndarray, np.ndarray]]) -> list[str]:
    solved = []
    warm = np.zeros(2)
    group_seconds = 0.0
    for g, (x, w) in enumerate(runs):
        if g % solver.WARM_SPAN == 0:  # as optimal_centroids does
            warm[:] = 0.0
        sums, _ = solver._prefix_sums(x, w)
        centroids = np.empty(K)
        start = time.perf_counter()
        solver._solve_group(x, w, K, centroids, warm)
        group_seconds += time.perf_counter() - start
        solved.append((sums, len(x), warm[0]))
    scratch = max(m for _, m, _ in solved) + 2
    b = np.empty(scratch)
    arg, qi, qs = (np.empty(scratch, np.int32) for _ in range(3))
    solver._penalized(*solved[0], b, arg, qi, qs)
    _arithmetic_floor(solved[0][0], solved[0][1], solved[0][2], b, arg)
    values = sum(m for _, m, _ in solved)
    solve = floor = 0.0
    for _ in range(3):
        for sums, m, lam in solved:
            sums.sum()  # in cache, as after the prefix sums
            start = time.perf_counter()
            solver._penalized(sums, m, lam, b, arg, qi, qs)
            solve += time.perf_counter() - start
            start = time.perf_counter()
            _arithmetic_floor(sums, m, lam, b, arg)
            floor += time.perf_counter() - start
    try:
        import kmeans1d

        kmeans1d.cluster(raw[0][:1000], K)
        start = time.perf_counter()
        for r in raw[:8]:
            kmeans1d.cluster(r, K)
        baseline = (time.perf_counter() - start) / min(8, len(raw)) * 1e6
    except ImportError:
        baseline = float("nan")
    group = group_seconds / len(runs) * 1e6
    return [
        str(len(runs)),
        f"{values / len(runs):.0f}",
        f"{solve / 3 / values * 1e9:.1f}",
        f"{floor / 3 / values * 1e9:.1f}",
        f"{group:.0f}",
        f"{baseline:.0f}",
        speedup(baseline, group),
    ]


def main() -> None:
    make, rows, _ = next(iter(PROBLEMS.values()))
    _measure(*_groups(make, rows, 2))  # compile / load every kernel first
    rows_out = [[name, *_measure(*_groups(make, rows, count))] for name, (make, rows, count) in PROBLEMS.items()]
    headers = ["problem", "groups", "distinct/group", "solve ns/value", "floor ns/value", "group us", "kmeans1d us"]
    print(table([*headers, "speedup"], rows_out))


if __name__ == "__main__":
    main()
