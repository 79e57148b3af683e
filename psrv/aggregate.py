"""The server's memory of every worker's latest contribution, and their running sum.

Lazy algorithms need the server to keep, per worker, the last thing it received
so a skipping worker still contributes its (stale) value (Sun et al., NeurIPS 2019, eq. 4). The
aggregate ``total = sum_m stored_m`` is kept as a running sum so a round costs
O(uploads * d), not O(M * d).
"""

from __future__ import annotations

import numpy as np


class Aggregator:
    def __init__(self, num_workers: int, dim: int, absorb: str) -> None:
        if absorb not in ("replace", "accumulate"):
            raise ValueError(f"absorb must be 'replace' or 'accumulate', got {absorb!r}")
        self.absorb = absorb
        self.stored = np.zeros((num_workers, dim), dtype=np.float64)
        self.total = np.zeros(dim, dtype=np.float64)

    def add(self, worker: int, vector: np.ndarray) -> None:
        """Absorb one upload from ``worker``."""
        if self.absorb == "replace":
            self.total += vector - self.stored[worker]
            self.stored[worker] = vector
        else:
            self.total += vector
            self.stored[worker] += vector
