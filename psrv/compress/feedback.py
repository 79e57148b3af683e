"""Error feedback (memory), one mechanism wrapping any compressor.

Stich, Cordonnier, Jaggi, "Sparsified SGD with memory", NeurIPS 2018 (top-k with memory); the
same memory turns threshold sparsification into its residual form (Strom, Interspeech 2015).
One step: compensate ``p = e + x``; compress ``Q(p)``; absorb ``e' = p - Q(p)``;
send ``Q(p)``. Nothing is lost: the sum of everything sent plus the final memory
equals the sum of all inputs. Why it is needed: a biased (contractive) compressor
such as top-k otherwise drops the same small coordinates every round forever.
"""

from __future__ import annotations

import numpy as np

from psrv.compress import Compressor
from psrv.payload import Payload, to_dense, values_of


def init_memory(dim: int) -> np.ndarray:
    return np.zeros(dim, dtype=np.float64)


def ef_step(
    compressor: Compressor, memory: np.ndarray, x: np.ndarray, rng: np.random.Generator
) -> tuple[Payload, np.ndarray]:
    """Return the payload to send and the new memory; the inputs are not modified.

    A sparse payload (top-k, threshold) is absorbed in place: only its coordinates change, so
    ``p[idx] -= values`` gives ``p - Q(p)`` bit for bit without building the dense Q(p) (at
    d = 1e7 that saves two passes over 80 MB and a fresh array)."""
    compensated = memory + x
    sent = compressor.compress(compensated, rng)
    if sent.kind == "sparse" and not np.shares_memory(sent.values, compensated):
        compensated[sent.indices] -= values_of(sent)  # unique indices: each coordinate once
        return sent, compensated
    return sent, compensated - to_dense(sent)
