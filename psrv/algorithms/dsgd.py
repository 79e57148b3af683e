"""``dsgd``: decentralized SGD, adapt-then-combine (Lopes & Sayed, ICASSP 2007; Nedić & Ozdaglar,
IEEE TAC 2009; the math is :mod:`psrv.decentralized`). Each worker steps on its own gradient and
averages with its neighbours' half-steps, weighted by Metropolis-Hastings weights of the topology;
there is no server aggregate. The networked run is :mod:`psrv.mesh` (coordinator) with
:mod:`worker.gossip` (each worker's loop and its gossip service); this class holds the options.

Options: ``lr`` (gamma; each worker steps by ``lr * num_workers * grad f_i`` so that the average
step is ``lr * grad f``, as ``gd``'s), ``batch`` (minibatch rows per worker and round, 0 = all),
``topology`` (``ring``, ``torus``, ``exponential``, ``full`` or 0..3). Tuning: a sparser topology
(smaller spectral gap) needs a smaller ``lr`` on heterogeneous (non-IID) data to keep the models
close (Lian et al., NeurIPS 2017, Theorem 1); ``full`` is parallel SGD.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from psrv.algorithms import AlgorithmBase, Decision, RoundInfo, register, split_options
from psrv.decentralized import topology_name


@dataclass(frozen=True)
class DSGD(AlgorithmBase):
    lr: float = 0.02
    batch: int = 0
    topology: int = 0  # index into psrv.decentralized.TOPOLOGIES
    name: str = "dsgd"

    absorb = "replace"
    history_depth = 0
    payload_kinds = ("dense",)
    #: runs on the gossip mesh (psrv.mesh), never on the parameter server's rounds
    decentralized = True

    def __post_init__(self) -> None:
        if self.batch < 0:
            raise ValueError(f"dsgd: batch must be >= 0 (0 = full gradient), got {self.batch}")
        topology_name(self.topology)  # ValueError naming the known ones

    @property
    def topology_name(self) -> str:
        return topology_name(self.topology)

    def init(self, dim: int) -> Any:
        return None

    def step(self, state: Any, grad: np.ndarray, info: RoundInfo, rng: np.random.Generator) -> Decision:
        raise RuntimeError("dsgd has no server rounds: it runs on the gossip mesh (psrv.mesh, worker.gossip)")


def _build(options: Mapping[str, float], compressor: str) -> DSGD:
    if compressor and compressor != "dense":
        raise ValueError(f"dsgd sends dense models to its neighbours; --compressor {compressor} is not supported")
    own, rest = split_options(DSGD, options)
    if rest:
        raise ValueError(f"unknown option{'s' if len(rest) > 1 else ''} {', '.join(sorted(rest))} for dsgd")
    return DSGD(**own)


register("dsgd", _build)
