"""Fixtures shared by several test modules. Plain helper functions live in ``tests/helpers``
(``from tests.helpers.threaded import run_in_threads``); the markers (slow, process, root) are
registered in pyproject.toml."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread in the test process, as in a worker process (``torch_threads=1``):
    two spinning threads crawl when the 2 cores are busy (50 full-batch logreg steps on digits:
    1.7 s with 2 threads, 0.04 s with 1). Worker threads set their own count (``run_worker``).
    Only where the collected modules imported torch: a run of, say, test_codec.py does not pay
    for importing it."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
