"""Fixtures of the kernel tests."""

import os
import subprocess
import sys
from collections.abc import Callable

import pytest


@pytest.fixture
def bounds_checked(tmp_path) -> Callable[[str], None]:
    """Run Python ``code`` in a child process whose numba kernels check every index (``NUMBA_BOUNDSCHECK``, compiled
    afresh in a cache of their own): an out-of-range read or write there is an ``IndexError``, a failed test."""

    def run(code: str) -> None:
        env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
        child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert child.returncode == 0, child.stderr[-2000:]

    return run
