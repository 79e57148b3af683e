"""Fixtures shared by several test modules. Plain helper functions live in ``tests/helpers``
(``from tests.helpers.threaded import run_in_threads``); the markers (slow, process, root) are
registered in pyproject.toml."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread, as in a worker process: two spinning threads crawl when the
    2 cores are busy. Use it per module: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
