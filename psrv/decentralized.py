"""Decentralized SGD (DSGD): no central aggregation; every node takes a local SGD step and averages
with its neighbours (Lopes & Sayed, "Diffusion Least-Mean Squares over Adaptive Networks", ICASSP
2007; Nedić & Ozdaglar, "Distributed Subgradient Methods for Multi-Agent Optimization", IEEE TAC
2009; Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms?", NeurIPS 2017).

psrv implements the **adapt-then-combine** (ATC) form, Lopes & Sayed's diffusion update, in the
formulation of the lecture notes on distributed optimization (K. Yuan):

    x_i^{k+1/2} = x_i^k - gamma * g_i(x_i^k)                (local step, "adapt")
    x_i^{k+1}   = sum_{j in N_i u {i}} w_ij x_j^{k+1/2}      (partial averaging, "combine")

Nedić & Ozdaglar's form is combine-then-adapt (x_i^{k+1} = sum_j w_ij x_j^k - gamma g_i(x_i^k));
ATC is chosen because a node sends one vector per round either way and ATC averages the fresh
half-steps, so with W = 11^T/n (fully connected, Metropolis-Hastings) it *is* parallel SGD:
x^{k+1} = mean_i(x^k - gamma g_i) = x^k - (gamma/n) sum_i g_i when all nodes start equal.

Topologies (undirected graphs on n nodes): ``ring``; ``torus`` (2-D, r x c with r the largest
divisor of n at most sqrt(n); a ring when n is prime); ``exponential`` (i ~ i +- 2^t mod n for
2^t < n: the static exponential graph of Assran et al., ICML 2019, and Ying et al., NeurIPS 2021,
made undirected so that Metropolis-Hastings weights apply); ``full``.

Weights: Metropolis-Hastings (Xiao & Boyd, "Fast linear iterations for distributed averaging",
Systems & Control Letters 2004): w_ij = 1 / (1 + max(d_i, d_j)) on each edge, w_ii = 1 - sum_j w_ij.
W is symmetric and doubly stochastic for any undirected graph; on the complete graph it is 11^T/n.
How fast gossip mixes is set by the spectral gap 1 - max(|lambda_2|, |lambda_n|) of W: consensus
error contracts by at most (1 - gap) per averaging step.

Pure numpy; no gRPC (the networked form is :mod:`worker.gossip` with :mod:`psrv.mesh`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: topology names, in the order their spectral gap grows (for the same n); ``-o topology=`` takes the
#: name or its index here (psrv.keyvalue.NAMED_VALUES holds the same list)
TOPOLOGIES = ("ring", "torus", "exponential", "full")


def topology_name(value: float | int | str) -> str:
    """The topology named by ``value`` (a name of :data:`TOPOLOGIES` or its index); ``ValueError`` else."""
    if isinstance(value, str):
        if value in TOPOLOGIES:
            return value
    elif float(value) == int(value) and 0 <= int(value) < len(TOPOLOGIES):
        return TOPOLOGIES[int(value)]
    raise ValueError(f"unknown topology {value!r}; known: {', '.join(TOPOLOGIES)} (or 0..{len(TOPOLOGIES) - 1})")


def torus_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the 2-D torus on n nodes: rows the largest divisor of n with rows^2 <= n."""
    rows = max(r for r in range(1, int(np.sqrt(n)) + 1) if n % r == 0)
    return rows, n // rows


def neighbours(topology: str, n: int) -> list[list[int]]:
    """Sorted neighbour lists (self excluded) of the undirected graph ``topology`` on n nodes."""
    topology = topology_name(topology)
    if n < 1:
        raise ValueError(f"a topology needs n >= 1 nodes, got {n}")
    adj: list[set[int]] = [set() for _ in range(n)]

    def link(i: int, j: int) -> None:
        if i != j:
            adj[i].add(j)
            adj[j].add(i)

    if topology == "ring":
        for i in range(n):
            link(i, (i + 1) % n)
    elif topology == "torus":
        rows, cols = torus_shape(n)
        for i in range(n):
            r, c = divmod(i, cols)
            link(i, r * cols + (c + 1) % cols)
            link(i, ((r + 1) % rows) * cols + c)
    elif topology == "exponential":
        hop = 1
        while hop < n:
            for i in range(n):
                link(i, (i + hop) % n)
            hop *= 2
    else:  # full
        for i in range(n):
            for j in range(i + 1, n):
                link(i, j)
    return [sorted(a) for a in adj]


def metropolis_hastings(adj: list[list[int]]) -> np.ndarray:
    """The n x n Metropolis-Hastings weight matrix of an undirected graph (Xiao & Boyd 2004)."""
    n = len(adj)
    deg = [len(a) for a in adj]
    W = np.zeros((n, n))
    for i, a in enumerate(adj):
        for j in a:
            if i not in adj[j]:
                raise ValueError(f"the graph is not undirected: {j} ~ {i} missing")
            W[i, j] = 1.0 / (1 + max(deg[i], deg[j]))
    W[np.diag_indices(n)] = 1.0 - W.sum(axis=1)
    return W


def mixing_matrix(topology: str, n: int) -> np.ndarray:
    """Metropolis-Hastings weights of ``topology`` on n nodes."""
    return metropolis_hastings(neighbours(topology, n))


def spectral_gap(W: np.ndarray) -> float:
    """1 - max(|lambda_2|, |lambda_n|) of a symmetric doubly stochastic W (1 for n = 1)."""
    lam = np.sort(np.abs(np.linalg.eigvalsh(W)))[::-1]
    return float(1.0 - lam[1]) if len(lam) > 1 else 1.0


def consensus_distance(X: np.ndarray) -> float:
    """(1/n) sum_i ||x_i - x_bar||^2 of the n x d iterates X (rows: nodes)."""
    return float(np.mean(np.sum((X - X.mean(axis=0)) ** 2, axis=1)))


def combine(W: np.ndarray, half: np.ndarray) -> np.ndarray:
    """The combine step: x_i = sum_j w_ij half_j for all nodes (rows of ``half``)."""
    return W @ half


def dsgd_step(W: np.ndarray, X: np.ndarray, grads: np.ndarray, lr: float) -> np.ndarray:
    """One ATC round for every node: ``W @ (X - lr * grads)`` (rows: nodes)."""
    return combine(W, X - lr * grads)


def simulate(
    W: np.ndarray,
    x0: np.ndarray,
    grad: Callable[[int, np.ndarray, np.random.Generator], np.ndarray],
    lr: float,
    rounds: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[float]]:
    """``rounds`` ATC rounds from x_i = x0 for all i; ``grad(i, x_i, rng)`` is node i's stochastic
    gradient (nodes drawn in order 0..n-1 each round, from one generator). Returns the final n x d
    iterates and the consensus distance after every round."""
    n = W.shape[0]
    X = np.repeat(np.asarray(x0, dtype=np.float64)[None, :], n, axis=0)
    dist = []
    for _ in range(rounds):
        G = np.stack([grad(i, X[i], rng) for i in range(n)])
        X = dsgd_step(W, X, G, lr)
        dist.append(consensus_distance(X))
    return X, dist
