"""Local updates: every round a participating worker takes ``K`` local steps from the broadcast
model and uploads its (normalised) model change; the server steps along the average change.

Notation: M workers, worker m holds ``n_m`` of the N samples and ``share_m = n_m / N``; psrv's
objective is ``f = sum_m f_m`` (each ``f_m`` already weighted by its data share, see
:mod:`psrv.tasks`), so worker m's local objective, the mean loss over its own data, is
``F_m = f_m / share_m`` and ``f = sum_m share_m F_m``. ``eta`` is the local step size
(``-o local_lr``; 0, the default, means ``--lr / K``), ``gamma`` the global one (``--lr``, the
server optimizer's step), S the round's sampled workers and ``s = |S|``.

- ``local-sgd`` (FedAvg: H. B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Agüera y Arcas,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017;
  local SGD: S. U. Stich, "Local SGD Converges Fast and Communicates Little", ICLR 2019)::

      y_m^0 = x^r,   y_m^{k+1} = y_m^k - eta grad F_m(y_m^k; xi_m^k),   k = 0..K-1
      upload  u_m = (M/s) share_m (x^r - y_m^K) / (eta K)
      x^{r+1} = x^r - gamma sum_{m in S} u_m

  i.e. the data-share-weighted average of the normalised deltas ``(x - y_m)/(eta K)`` (Cheng et al.'s
  normalisation, below): with ``gamma = eta K`` and full participation ``x^{r+1} = sum_m share_m
  y_m^K``, McMahan et al.'s model averaging, which is the default (``local_lr`` = ``--lr / K``).
  The factor ``M/s`` makes the sampled sum an unbiased estimate of the full one. With K = 1 the
  upload is the minibatch gradient itself, bit for bit, so ``local-sgd`` with ``local_steps=1`` is
  ``sgd``. Each local step draws a fresh minibatch of ``batch`` rows (0 = the full local gradient).
  The upload is computed as ``(M/s) (1/K) sum_k share_m grad F_m(y^k)`` in the gradient's own
  scale, which equals the formula above and makes the K = 1 case exact.
- ``fedavg-m`` (Z. Cheng, X. Huang, P. Wu, K. Yuan, "Momentum Benefits Non-IID Federated Learning
  Simply and Provably", ICLR 2024, Algorithm 1): the local direction is
  ``beta grad F_m(y; xi) + (1 - beta) g^r``, where ``g^r`` is the previous round's aggregate
  ``g^r = sum_{m in S} u_m`` (``g^0 = 0``), and ``x^{r+1} = x^r - gamma g^{r+1}``. ``beta = 1`` is
  ``local-sgd`` bit for bit.
- ``scaffold`` (S. P. Karimireddy, S. Kale, M. Mohri, S. J. Reddi, S. U. Stich, A. T. Suresh,
  "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020, Algorithm 1), in
  the paper's unweighted form: ``f = (1/M) sum_m F_m`` with ``F_m = M f_m`` (the data weights stay
  inside f_m) and ``u_m = (1/s) (x^r - y_m^K) / (eta K)`` (``share_m`` of the formulas above becomes
  1/M). Local direction ``grad F_m(y; xi) - c_m + c``; the worker's control variate is updated with the
  paper's **option II**, ``c_m <- c_m - c + (x - y_m^K)/(K eta)``, using the delta the server
  actually received (decoded, so a compressed upload keeps the invariant below). The server's
  ``c <- c + (1/M) sum_{m in S} (c_m^+ - c_m)`` (the paper's ``|S|/N`` scaling of the mean).

  What travels: with option II the change ``c_m^+ - c_m = s u_m - c`` is a function of the uploaded
  delta and of ``c``, both of which the server (and every worker's replica) has, so psrv uploads the
  delta alone and derives c: ``c^{r+1} = c^r + (1/M) sum_{m in S} (s u_m - c^r) = (1 - s/M) c^r +
  (s/M) g^{r+1}``, where ``g^{r+1} = sum_{m in S} u_m`` is the round's aggregate (the model step).
  Each worker computes this from the aggregate its replica receives every round (the ``replica``
  downlink is forced), so ``c = (1/M) sum_m c_m`` holds exactly, with or without sampling, whatever
  the shard sizes (up to rounding; a worker that rejoins restarts with ``c_m = 0``, which the
  invariant then no longer includes). SCAFFOLD's upload costs FedAvg's, not twice it.

Client sampling (``-o sample=s``, 0 = every worker): the server draws s of the M workers uniformly
without replacement each round from its seeded rng (``--seed``; :class:`psrv.algorithms.selection`'s
mechanism); the others are told so, compute nothing and upload nothing, and their previous
contribution is dropped from the aggregate (``round_only``: the aggregate is this round's uploads
alone). ``sample=M`` is full participation, bit for bit.

Compression: ``--compressor NAME`` compresses the upload ``u_m``; ``ef=1`` adds error feedback
(Stich, Cordonnier, Jaggi, NeurIPS 2018), default on for biased compressors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from psrv.algorithms import AlgorithmBase, Decision, RoundInfo, SelectionView, register, split_options
from psrv.compress import Compressor, make_compressor
from psrv.compress.feedback import ef_step, init_memory
from psrv.payload import to_dense


@dataclass(frozen=True)
class _Local(AlgorithmBase):
    compressor: Compressor
    lr: float = 0.02  # gamma, the server's (global) step size
    local_lr: float = 0.0  # eta; 0 = lr / local_steps (McMahan et al.'s model averaging)
    local_steps: int = 5  # K
    sample: int = 0  # workers per round; 0 = all
    batch: int = 10  # minibatch rows per local step; 0 = full local gradient
    ef: bool = False
    name: str = ""

    absorb = "replace"
    history_depth = 0
    round_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.local_lr >= 0 and self.local_steps >= 1 and self.sample >= 0 and self.batch >= 0):
            raise ValueError(
                f"{self.name}: need lr > 0, local_lr >= 0, local_steps >= 1, sample >= 0, batch >= 0; got "
                f"{self.lr}, {self.local_lr}, {self.local_steps}, {self.sample}, {self.batch}"
            )

    @property
    def eta(self) -> float:
        return self.local_lr if self.local_lr > 0 else self.lr / self.local_steps

    @property
    def selects(self) -> bool:  # type: ignore[override]
        return self.sample > 0

    @property
    def payload_kinds(self) -> tuple[str, ...]:
        return (self.compressor.payload_kind,)

    def select(self, view: SelectionView, rng: np.random.Generator) -> frozenset[int]:
        num = len(view.staleness)
        if self.sample >= num:
            return frozenset(range(num))
        return frozenset(int(i) for i in rng.choice(num, self.sample, replace=False))

    def sampled(self, num_workers: int) -> int:
        return num_workers if self.sample == 0 else min(self.sample, num_workers)

    def _memory(self, state: Any) -> Any:
        return state

    def init(self, dim: int) -> Any:
        return init_memory(dim) if self.ef else None

    def _direction(self, state: Any, grad: np.ndarray, info: RoundInfo, ctx: Any) -> np.ndarray:
        """The local direction in the gradient's scale (share_m times the paper's)."""
        return grad

    def _context(self, state: Any, info: RoundInfo) -> Any:
        return None

    def weight(self, info: RoundInfo) -> float:
        """The weight of worker m in the average: its data share n_m / N (McMahan et al.)."""
        return info.share

    def _local(self, state: Any, grad: np.ndarray, info: RoundInfo, ctx: Any) -> np.ndarray:
        """K local steps from theta; the upload ``(M/s) (1/K) sum_k direction_k`` (float64)."""
        if info.theta is None or info.local_grad_at is None or not self.weight(info) > 0:
            raise ValueError(f"{self.name} needs the model, a local gradient oracle and the data share")
        theta = info.theta
        y = np.asarray(theta, dtype=np.float64).copy()
        step = self.eta / self.weight(info)  # eta grad F_m = (eta / w_m) grad f_m
        total = None
        for k in range(self.local_steps):
            g = grad if k == 0 else info.local_grad_at(y)  # float64: local steps lose nothing
            d = self._direction(state, np.asarray(g, dtype=np.float64).reshape(-1), info, ctx)
            total = d.copy() if total is None else total + d
            if k + 1 < self.local_steps:
                y -= step * d
        scale = info.num_workers / self.sampled(info.num_workers) / self.local_steps
        return total if scale == 1.0 else total * scale

    def _send(self, memory: Any, upload: np.ndarray, rng: np.random.Generator) -> tuple[Any, Any, dict[str, float]]:
        if self.ef:
            sent, memory = ef_step(self.compressor, memory, upload, rng)
            return sent, memory, {"memory_sq": float(memory @ memory)}
        return self.compressor.compress(upload, rng), memory, {}

    def step(self, state: Any, grad: np.ndarray, info: RoundInfo, rng: np.random.Generator) -> Decision:
        ctx = self._context(state, info)
        upload = self._local(state, grad, info, ctx)
        sent, memory, stats = self._send(self._memory(state), upload, rng)
        return Decision(sent, self._after(state, memory, sent, info, ctx), stats)

    def _after(self, state: Any, memory: Any, sent: Any, info: RoundInfo, ctx: Any) -> Any:
        return memory


@dataclass(frozen=True)
class LocalSGD(_Local):
    name: str = "local-sgd"


@dataclass(frozen=True)
class FedAvgM(_Local):
    beta: float = 0.5  # weight of the local gradient; 1 = FedAvg
    name: str = "fedavg-m"

    needs_aggregate: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"fedavg-m: beta must be in [0, 1], got {self.beta}")

    def _context(self, state: Any, info: RoundInfo) -> Any:
        if info.aggregate is None:
            raise ValueError("fedavg-m needs the previous round's aggregate g^r (the replica downlink)")
        return (1.0 - self.beta) * info.share * np.asarray(info.aggregate, dtype=np.float64)

    def _direction(self, state: Any, grad: np.ndarray, info: RoundInfo, ctx: Any) -> np.ndarray:
        return self.beta * grad + ctx  # share_m (beta grad F_m + (1 - beta) g^r)


@dataclass(frozen=True)
class ScaffoldState:
    """A SCAFFOLD worker's state: its control variate ``c_m``, the server's ``c`` as of round
    ``c_round`` (derived from the aggregates, see the module doc), and the error-feedback memory."""

    c_m: np.ndarray
    c: np.ndarray
    c_round: int = -1
    memory: np.ndarray | None = None


@dataclass(frozen=True)
class Scaffold(_Local):
    name: str = "scaffold"

    needs_aggregate: ClassVar[bool] = True

    def init(self, dim: int) -> ScaffoldState:
        zero = np.zeros(dim, dtype=np.float64)
        return ScaffoldState(zero, zero.copy(), -1, init_memory(dim) if self.ef else None)

    def _memory(self, state: ScaffoldState) -> Any:
        return state.memory

    def server_c(self, state: ScaffoldState, info: RoundInfo) -> np.ndarray:
        """``c^r`` at round ``info.round`` from ``c^{r-1}`` and the aggregate ``g^r`` the replica holds:
        ``c^r = (1 - q) c^{r-1} + q g^r`` with ``q = s/M`` (``c^0 = 0``). A worker that missed rounds
        (it was away) applies one update from its last c: exact with full participation (q = 1)."""
        if info.round == 0:
            return np.zeros_like(state.c)
        if state.c_round == info.round:
            return state.c
        if info.aggregate is None:
            raise ValueError("scaffold needs the previous round's aggregate (the replica downlink)")
        q = self.sampled(info.num_workers) / info.num_workers
        agg = np.asarray(info.aggregate, dtype=np.float64)
        return agg.copy() if q == 1.0 else (1.0 - q) * state.c + q * agg

    def observe(self, state: ScaffoldState, info: RoundInfo) -> ScaffoldState:
        """An unsampled round: bring ``c`` up to date, compute nothing else."""
        return ScaffoldState(state.c_m, self.server_c(state, info), info.round, state.memory)

    def weight(self, info: RoundInfo) -> float:
        """1/M: the paper's unweighted average of F_m = M f_m (exact c under sampling, see the module doc)."""
        return 1.0 / info.num_workers

    def _context(self, state: ScaffoldState, info: RoundInfo) -> Any:
        c = self.server_c(state, info)
        return c, (c - state.c_m) / info.num_workers

    def _direction(self, state: ScaffoldState, grad: np.ndarray, info: RoundInfo, ctx: Any) -> np.ndarray:
        return grad + ctx[1]  # (grad F_m - c_m + c) / M

    def _after(self, state: ScaffoldState, memory: Any, sent: Any, info: RoundInfo, ctx: Any) -> ScaffoldState:
        c = ctx[0]
        weight = 1.0 / self.sampled(info.num_workers)
        received = to_dense(sent) / weight  # (x - y_m^K) / (K eta) as the server got it
        return ScaffoldState(state.c_m - c + received, c, info.round, memory)


def _factory(cls: type[_Local]):
    def build(options: Mapping[str, float], compressor: str) -> _Local:
        own, rest = split_options(cls, options)
        comp = make_compressor(compressor or "dense", **rest)
        if "ef" not in own:
            own["ef"] = comp.compressor_class(1 << 10).kind in ("contractive", "biased")  # biased: error feedback
        return cls(comp, **own)

    return build


register("local-sgd", _factory(LocalSGD))
register("fedavg-m", _factory(FedAvgM))
register("scaffold", _factory(Scaffold))
