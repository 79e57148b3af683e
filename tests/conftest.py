"""Fixtures shared by several test modules. Plain helper functions live in ``tests/helpers``
(``from tests.helpers.threaded import run_in_threads``); the markers (slow, process, root) are
registered in pyproject.toml."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

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


@pytest.fixture
def make_harness() -> Iterator[Callable[..., Any]]:
    """``make(**ServerConfig options)``: a real server on port 0 and a raw client whose rounds the
    test drives by hand (:class:`tests.test_server.Harness`); every one made is closed at the end.
    Defaults: 3 rounds, no deadline passing while a loaded machine runs the test's calls (the
    deadline tests set their own round_timeout), round 0 at once, the dense downlink (these tests
    read theta from plain broadcasts; replicas: test_replica, test_rounds_stream)."""
    from psrv import rpc
    from psrv.server import ServerConfig
    from tests.test_server import Harness

    made: list[Harness] = []

    def make(max_message_bytes: int = rpc.MAX_MESSAGE_BYTES, **config: Any) -> Harness:
        config.setdefault("rounds", 3)
        config.setdefault("round_timeout", 30.0)
        config.setdefault("register_timeout", 10.0)
        config.setdefault("start_timeout", 0.0)
        config.setdefault("downlink", "dense")
        h = Harness(ServerConfig(**config), max_message_bytes)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
