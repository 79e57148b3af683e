"""Algorithms: what a worker does with its gradient each round, and how the server
absorbs what arrives. One module per algorithm, registered by name.

An algorithm is a frozen dataclass of hyperparameters with optax-style pure
functions: ``init(dim) -> state`` and ``step(state, grad, info, rng) -> Decision``.
The worker keeps the old state until the server acknowledges the message, then
commits ``Decision.state``; a rejected message (e.g. a round that closed) leaves
the worker exactly as it was, so worker and server never disagree.

Server side: ``absorb`` says whether an upload replaces the worker's stored
contribution ("replace": plain GD, top-k) or adds to it ("accumulate": LAQ's
innovation, Sun et al., NeurIPS 2019, eq. 4). Skipping workers keep contributing what is stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from psrv.payload import Payload


@dataclass(frozen=True)
class RoundInfo:
    """What a worker knows at round k besides its gradient.

    ``theta`` is the broadcast model; ``grad_at(x)`` evaluates the worker's gradient at
    another point on the SAME minibatch (and counts as a gradient evaluation), which the
    stochastic lazy rule needs (SASG/LASG eq. 6). The local-update methods (:mod:`psrv.algorithms.local`)
    use ``local_grad_at(x)`` (the gradient at x on a FRESH minibatch, counted), ``share`` (n_m / N)
    and ``aggregate`` (the previous round's aggregate, from the worker's replica; None without one)."""

    round: int
    num_workers: int
    recent_step_sq: tuple[float, ...] = ()
    theta: np.ndarray | None = None
    grad_at: Callable[[np.ndarray], np.ndarray] | None = None
    local_grad_at: Callable[[np.ndarray], np.ndarray] | None = None
    share: float = 0.0
    aggregate: np.ndarray | None = None


@dataclass(frozen=True)
class SelectionView:
    """What the server knows when it selects workers (``Algorithm.select``)."""

    round: int
    theta: np.ndarray
    theta_hat: np.ndarray | None  # (M, d) iterate of each worker's last upload, if tracked
    smoothness: tuple[float, ...]  # L_m: largest of the bounds sent with uploads and the secant estimates
    staleness: tuple[int, ...]  # rounds since each worker's last upload
    recent_step_sq: tuple[float, ...]


@dataclass(frozen=True)
class Decision:
    """Upload ``payload`` (or skip when it is None); commit ``state`` once acknowledged."""

    payload: Payload | None
    state: Any
    stats: Mapping[str, float] = field(default_factory=dict)


class Algorithm(Protocol):
    """What the engine and the worker use of an algorithm. Concrete algorithms subclass
    :class:`AlgorithmBase`, which declares the optional capabilities with their defaults."""

    name: str
    lr: float
    batch: int
    tracks_theta_hat: bool
    selects: bool

    @property
    def absorb(self) -> str: ...

    @property
    def history_depth(self) -> int: ...

    @property
    def payload_kinds(self) -> tuple[str, ...]:
        """Payload kinds the server accepts for this algorithm."""
        ...

    @property
    def compressor_name(self) -> str: ...

    def init(self, dim: int) -> Any: ...

    def rejoin(self, dim: int, contribution: np.ndarray | None) -> Any:
        """The state of a worker that registers again while training (it restarted, or the server
        resumed from a checkpoint), from what the server handed back (see :class:`AlgorithmBase`)."""
        ...

    def step(self, state: Any, grad: np.ndarray, info: RoundInfo, rng: np.random.Generator) -> Decision: ...

    def select(self, view: SelectionView, rng: np.random.Generator) -> frozenset[int] | None: ...


class AlgorithmBase:
    """Optional capabilities, declared once with their defaults (a subclass overrides a default
    with a dataclass field or a class attribute; nothing is probed with ``getattr``):

    - ``batch``: minibatch rows per worker and round; 0 = the full local gradient.
    - ``selects``: the server chooses who computes each round through :meth:`select`.
    - ``tracks_theta_hat``: the server keeps each worker's last-upload iterate (for ``select``),
      and workers report their smoothness bound L_m with their first upload.
    - ``compressor``: the uplink compressor, if the algorithm has one (named in summaries).
    - ``ef``: uploads carry error feedback (the worker keeps what the server did not apply).
    - ``round_only``: the aggregate is this round's uploads alone: at the close the server drops the
      stored contribution of every worker that did not upload (client sampling in FedAvg).
    - ``needs_aggregate``: workers need the previous round's aggregate (FedAvg-M's g^r, SCAFFOLD's c),
      so the server keeps the exact replica downlink (no dense or compressed broadcasts).
    - :meth:`observe`: what a worker that is not selected does with its state (nothing, by default).
    """

    name: str = ""
    batch: int = 0
    selects: ClassVar[bool] = False
    tracks_theta_hat: ClassVar[bool] = False
    compressor: Any = None
    ef: bool = False
    round_only: ClassVar[bool] = False
    needs_aggregate: ClassVar[bool] = False

    def observe(self, state: Any, info: RoundInfo) -> Any:
        """The state of a worker the server did not select this round (it computes nothing)."""
        return state

    @property
    def compressor_name(self) -> str:
        return self.compressor.name if self.compressor is not None else self.name

    def select(self, view: SelectionView, rng: np.random.Generator) -> frozenset[int] | None:
        """The worker indices that compute this round (only called when ``selects``)."""
        return None

    def rejoin(self, dim: int, contribution: np.ndarray | None) -> Any:
        """A rejoining worker's state. ``contribution``: the worker's row of the server's running sum
        (accumulating rules; None for the others, whose uploads replace what the server stored).

        Default (the "replace" rules: gd, sgd, topk-ef, lag-wk, lasg, sasg, lag-ps): a fresh
        :meth:`init`. Sound because the server replaces the stored value with the worker's next
        upload, so nothing the worker lost is part of the server's state. Error-feedback memories
        (topk-ef, sasg) restart at zero: the residual not yet sent is dropped once, and the
        analyses of error feedback (Stich et al., NeurIPS 2018; Deng et al., arXiv:2112.04088)
        hold from any bounded starting memory, zero included, so the method goes on from the
        rejoin round as if it started there. Lazy clocks and reference gradients restart too
        (``lag-wk``'s reference is zero, so its first round back uploads).
        Accumulating rules override this and rebuild their reference from ``contribution``."""
        return self.init(dim)


ALGORITHMS: dict[str, Callable[[Mapping[str, float], str], Algorithm]] = {}


def register(name: str, factory: Callable[[Mapping[str, float], str], Algorithm]) -> None:
    ALGORITHMS[name] = factory


def make_algorithm(name: str, options: Mapping[str, float] | None = None, compressor: str = "") -> Algorithm:
    """Build a registered algorithm; unknown names or options raise ``ValueError`` naming the valid ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}")
    options = dict(options or {})
    if options:
        valid = option_defaults(name, compressor)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            with_c = f" with compressor {compressor!r}" if compressor else ""
            raise ValueError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for {name}{with_c}; "
                f"valid: {', '.join(sorted(valid)) or '(none)'}"
            )
    return ALGORITHMS[name](options, compressor)


_SIMPLE = {"int", "float", "bool"}


def _simple_fields(obj: Any) -> dict[str, Any]:
    """The numeric init fields of a dataclass instance (the options it takes), with their values."""
    if not dataclasses.is_dataclass(obj):
        return {}
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init and f.type in _SIMPLE}


def option_defaults(name: str, compressor: str = "") -> dict[str, Any]:
    """Every option algorithm ``name`` takes (with ``compressor``), and its default (None where the
    compressor requires a value, e.g. ``threshold``)."""
    from psrv.compress import COMPRESSORS

    base = ALGORITHMS[name]({}, "")  # the default build: its fields are the algorithm's options
    out = _simple_fields(base)
    if base.compressor is not None and any(f.name == "compressor" for f in dataclasses.fields(base)):
        cls = COMPRESSORS.get(compressor or base.compressor.name)
        if cls is not None and dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if f.init and f.type in _SIMPLE:
                    out[f.name] = None if f.default is dataclasses.MISSING else f.default
    return out


def resolved_options(algo: Algorithm) -> dict[str, Any]:
    """Every option of a built algorithm with the value actually used (defaults included)."""
    out = _simple_fields(algo)
    if algo.compressor is not None:
        out.update(_simple_fields(algo.compressor))
    return out


def distribute_options(
    names: Sequence[str], compressor: str, options: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """Options per algorithm of a comparison. ``ALGO.KEY`` goes to ``ALGO`` only; a plain ``KEY`` to
    every listed algorithm that takes it, and it must fit at least one (else ``ValueError``)."""
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    valid = {n: option_defaults(n, compressor) for n in names}
    for key, value in options.items():
        target, dot, k = key.rpartition(".")
        if dot:
            if target not in out:
                raise ValueError(f"option {key!r} names {target!r}, which is not among {', '.join(names)}")
            out[target][k] = value
            continue
        takers = [n for n in names if key in valid[n]]
        if not takers:
            listed = "; ".join(f"{n}: {', '.join(sorted(valid[n])) or '(none)'}" for n in names)
            raise ValueError(f"unknown option {key!r}; valid options are {listed}")
        for n in takers:
            out[n][key] = value
    return out


def split_options(cls: type, options: Mapping[str, float]) -> tuple[dict[str, Any], dict[str, float]]:
    """Options naming a field of dataclass ``cls`` (cast to the field's type), and the rest."""
    types = {f.name: f.type for f in dataclasses.fields(cls) if f.init}
    own, rest = {}, {}
    for key, value in options.items():
        if key in types and types[key] in ("int", "float", "bool"):
            cast = {"int": int, "float": float, "bool": bool}[types[key]]
            if cast is int and float(value) != int(value):
                raise ValueError(f"option {key!r} must be an integer, got {value}")
            own[key] = cast(value)
        else:
            rest[key] = value
    return own, rest


class LazyHistory(AlgorithmBase):
    """Mixin for the lazy rules (dataclasses with fields ``D`` and ``xi``): the server keeps the
    last ``D`` step norms, weighted by D equal ``xi_d = xi``; ``xi`` < 0 means
    ``xi_default_total / D`` (a class attribute, not an option; 1 unless the class overrides it)."""

    D: int
    xi: float
    xi_default_total = 1.0

    @property
    def history_depth(self) -> int:
        return self.D

    @property
    def xis(self) -> tuple[float, ...]:
        xi = self.xi_default_total / self.D if self.xi < 0 and self.D else max(self.xi, 0.0)
        return (xi,) * self.D


def _load_builtin() -> None:
    """Import every module of this package once: each registers its algorithms."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_load_builtin()
