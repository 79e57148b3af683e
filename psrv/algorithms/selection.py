"""Server-side worker selection: only the workers the server picks compute and upload.
The others answer NOT_SELECTED, compute nothing, and keep contributing what the server
stored for them.

- ``riag``: Randomized Incremental Aggregated Gradient (the randomized counterpart of IAG, as
  in SAG: Schmidt, Le Roux, Bach, Math. Programming 2017; ``I^k = {i_k}`` with i_k random).
  Round k selects ``s`` workers uniformly at random without replacement from the server's rng.
- ``ciag``: Cyclic IAG (Blatt, Hero, Gauchman, SIAM J. Optim. 2007, ``i_k = k mod n``; linear
  convergence for a small enough constant step under smoothness and strong convexity:
  Gürbüzbalaban, Ozdaglar, Parrilo, SIAM J. Optim. 2017).
  Round k selects workers ``(k*s + j) mod M`` for ``j = 0..s-1`` (with ``s = 1``: ``k mod M``).

  Both run the generic IAG update
  ``x^{k+1} = x^k - alpha sum_{i in I^k} grad F_i(x^k) - alpha sum_{i not in I^k} grad F_i(x_i^k)``
  without the server's d x M table of stored gradients, by the running-sum trick (as in SAG's
  implementation): the server stores ``nabla_k = sum_i grad F_i(x_i^k)`` and a
  selected worker uploads only the change ``grad F_i(x^k) - grad F_i(x_i^k)``, which the
  server adds (``absorb = "accumulate"``: ``nabla_{k+1} = nabla_k + nabla_k^i``).

  Worker state: ``g_m``, the sum of everything it uploaded (initially 0, so its first upload is
  its gradient itself). It sends ``c = C(grad - g_m)`` and sets ``g_m <- g_m + to_dense(c)``,
  the same float64 sum the server forms, so the two copies agree bit for bit and the float32
  rounding of the wire never accumulates (``g_m`` is always within one rounding of the
  gradient at the iterate of its last upload). ``C`` is dense float32 by default; with any
  other compressor (``compressor=``, its options passed through) this is EF21 restricted to
  the selected workers (Richtárik et al., NeurIPS 2021), and ``g_m`` tracks the gradient only
  approximately.
  ``s`` larger than M selects everyone. ``batch > 0`` makes the gradients minibatch ones.

- ``lag-ps``: LAG, server-side rule LAG-PS (Chen, Giannakis, Sun, Yin, "LAG: Lazily Aggregated
  Gradient", NeurIPS 2018). Round k asks worker m for a fresh gradient iff

      L_m^2 ||theta^k - theta_hat_m||^2 > 1/(alpha^2 M^2) sum_{d=1..D} xi_d ||theta^{k+1-d} - theta^{k-d}||^2

  or its staleness reached ``t_bar`` (:func:`psrv.triggers.lag_ps_upload`; the D-step history of
  the LAG paper and the LAG authors' code, as in LAQ's eq. 7a). The selected workers upload
  their full gradient, which replaces the stored one
  (``absorb = "replace"``); ``theta_hat_m`` is the iterate of worker m's last upload, which the
  server tracks (``tracks_theta_hat``).

  ``L_m`` is the server's secant estimate ``||g_m(theta^k) - g_m(theta_hat_m)|| / ||theta^k -
  theta_hat_m||`` (largest seen; ``ParameterServer._estimate_smoothness``), which exists only
  once worker m has uploaded twice: so EVERY worker is forced to upload in rounds 0 and 1
  (round 0 fills the table, round 1 gives each worker its first estimate). Without that, L_m = 0
  would keep a worker silent until ``t_bar`` forces it.

  Defaults: D = 10 and xi_d = 10/D (the LAG authors' code for LAG-PS:
  github.com/chentianyi1991/LAG-code, nips2018synlinear.m); ``xi`` < 0 means that default,
  ``xi = 0`` selects every worker whose iterate moved (every round, i.e. plain GD);
  ``t_bar = 100`` maximum staleness (as LAQ): a
  worker is never left more than ``t_bar`` consecutive rounds without an upload. Dense float32
  uploads of the full local gradient only (no compressor, no ``batch``): the secant estimate
  of L_m needs exact gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from psrv.algorithms import AlgorithmBase, Decision, LazyHistory, RoundInfo, SelectionView, register, split_options
from psrv.compress import Compressor, make_compressor
from psrv.payload import to_dense
from psrv.triggers import lag_ps_upload, lag_threshold


def _indices(selected: Iterable[int]) -> frozenset[int]:
    return frozenset(int(i) for i in selected)


@dataclass(frozen=True)
class _Incremental(AlgorithmBase):
    """RIAG / CIAG: ``s`` selected workers upload the change of their gradient (the running-sum
    form of IAG, see the module doc); subclasses choose the workers."""

    compressor: Compressor
    lr: float = 0.02
    s: int = 1  # workers selected per round
    batch: int = 0  # minibatch rows per worker and round; 0 = full local gradient
    name: str = ""

    absorb = "accumulate"
    history_depth = 0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.s >= 1 and self.batch >= 0):
            raise ValueError(f"{self.name}: need lr > 0, s >= 1, batch >= 0; got {self.lr}, {self.s}, {self.batch}")

    @property
    def payload_kinds(self) -> tuple[str, ...]:
        return (self.compressor.payload_kind,)

    def init(self, dim: int) -> np.ndarray:
        return np.zeros(dim, dtype=np.float64)  # the last uploaded gradient: nothing yet

    def rejoin(self, dim: int, contribution: np.ndarray | None) -> np.ndarray:
        """A rejoining worker: its estimate ``g_m`` is exactly its row of the server's sum (the sum of
        the compressed differences the server added for it), so it goes on as if it never left."""
        self.init(dim)  # the same checks as a first start
        if contribution is None or contribution.shape != (dim,):
            raise ValueError(f"{self.name}: a rejoining worker needs its row of the server's sum ({dim} values)")
        return np.array(contribution, dtype=np.float64)

    def step(self, state: np.ndarray, grad: np.ndarray, info: RoundInfo, rng: np.random.Generator) -> Decision:
        grad = np.asarray(grad, dtype=np.float64).reshape(-1)
        sent = self.compressor.compress(grad - state, rng)
        g_new = state + to_dense(sent)  # exactly what the server adds to its copy
        err = grad - g_new
        return Decision(sent, g_new, {"distortion_sq": float(err @ err)})


@dataclass(frozen=True)
class RIAG(_Incremental):
    name: str = "riag"
    selects = True

    def select(self, view: SelectionView, rng: np.random.Generator) -> frozenset[int]:
        num = len(view.staleness)
        return _indices(rng.choice(num, min(self.s, num), replace=False))


@dataclass(frozen=True)
class CIAG(_Incremental):
    name: str = "ciag"
    selects = True

    def select(self, view: SelectionView, rng: np.random.Generator) -> frozenset[int]:
        num = len(view.staleness)
        return _indices((view.round * self.s + j) % num for j in range(min(self.s, num)))


@dataclass(frozen=True)
class LagPS(LazyHistory):
    """LAG-PS, the server-side rule of LAG (Chen et al., NeurIPS 2018)."""

    compressor: Compressor
    lr: float = 0.02
    D: int = 10
    xi: float = -1.0  # per-d weight xi_d; negative means the LAG-PS default 10 / D
    t_bar: int = 100
    name: str = "lag-ps"

    absorb = "replace"
    selects = True
    tracks_theta_hat = True
    xi_default_total = 10.0  # LAG-PS: xi_d = 10 / D (the LAG authors' code)
    FORCED_ROUNDS = 2  # rounds 0 and 1: the secant estimate of L_m needs two uploads

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.D >= 0 and self.t_bar >= 0):
            raise ValueError(f"bad lag-ps parameters: lr={self.lr} D={self.D} t_bar={self.t_bar}")

    @property
    def payload_kinds(self) -> tuple[str, ...]:
        return (self.compressor.payload_kind,)

    def init(self, dim: int) -> None:
        return None

    def step(self, state: None, grad: np.ndarray, info: RoundInfo, rng: np.random.Generator) -> Decision:
        return Decision(self.compressor.compress(grad, rng), None)

    def select(self, view: SelectionView, rng: np.random.Generator) -> frozenset[int]:
        num = len(view.staleness)
        if view.round < self.FORCED_ROUNDS or view.theta_hat is None:
            return frozenset(range(num))
        threshold = lag_threshold(self.xis, view.recent_step_sq, self.lr, num)
        drift = view.theta_hat - view.theta[None, :]
        drift_sq = np.einsum("md,md->m", drift, drift)
        return _indices(
            m
            for m in range(num)
            if lag_ps_upload(view.smoothness[m], float(drift_sq[m]), threshold, view.staleness[m], self.t_bar)
        )


def _incremental(cls: type[_Incremental]):
    def build(options: Mapping[str, float], compressor: str) -> _Incremental:
        own, rest = split_options(cls, options)
        return cls(make_compressor(compressor or "dense", **rest), **own)

    return build


def _lag_ps(options: Mapping[str, float], compressor: str) -> LagPS:
    if compressor not in ("", "dense"):
        raise ValueError(f"lag-ps uploads dense gradients (its L_m estimate needs them), not {compressor!r}")
    own, rest = split_options(LagPS, options)
    if rest:
        raise ValueError(f"unknown lag-ps options: {', '.join(sorted(rest))}")
    return LagPS(make_compressor("dense"), **own)


register("riag", _incremental(RIAG))
register("ciag", _incremental(CIAG))
register("lag-ps", _lag_ps)
