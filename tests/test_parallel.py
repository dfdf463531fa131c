"""BLAS shares the cores with lowbit's own threads (:mod:`lowbit.parallel`)."""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits

from lowbit.parallel import blas_shared_by


def _blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_blas_runs_one_thread_while_lowbit_runs_several_and_is_restored_after():
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        assert before and all(n == 2 for n in before)
        with blas_shared_by(4):
            assert all(n == 1 for n in _blas_threads())
        assert _blas_threads() == before
        with blas_shared_by(1):  # one worker: BLAS keeps its threads
            assert _blas_threads() == before
