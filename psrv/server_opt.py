"""Server optimizers: how the server turns the round's aggregate into a model step.

The aggregate ``nabla^k`` (the sum of the workers' stored, possibly stale and compressed
contributions: the lazily aggregated gradient of LAG/LAQ, the compressed gradient of top-k or
SASG) is treated as a pseudo-gradient and handed to an optimizer, as in adaptive federated
optimization (S. J. Reddi, Z. Charles, M. Zaheer, Z. Garrett, K. Rush, J. Konečný, S. Kumar,
H. B. McMahan, "Adaptive Federated Optimization", ICLR 2021, Algorithm 1 with a server optimizer
ServerOpt, and Algorithm 2). Their ``Delta_t`` is the clients' model change, a descent direction
(``x_{t+1} = x_t + eta * ...``); psrv's aggregate is a gradient, so ``Delta_t = -nabla^k`` and every
step below carries the minus sign. With ``g = nabla^k``, ``eta = --lr``, t = k + 1:

- ``sgd`` (default): ``theta^{k+1} = theta^k - eta g``. psrv's step as it always was (same bits).
- ``momentum`` (heavy ball: server momentum, the FedAvgM baseline of Reddi et al.):
  ``u^k = beta u^{k-1} + g``, ``theta^{k+1} = theta^k - eta u^k``, ``u^{-1} = 0``. This is
  torch.optim.SGD(momentum=beta, dampening=0, nesterov=False) exactly (torch's first buffer is g,
  here ``beta * 0 + g``: the same).
- ``adam`` (FedAdam; D. P. Kingma, J. Ba, "Adam", ICLR 2015):
  ``m^k = beta1 m^{k-1} + (1 - beta1) g``, ``v^k = beta2 v^{k-1} + (1 - beta2) g*g``,
  ``theta^{k+1} = theta^k - eta / (1 - beta1^t) * m^k / (sqrt(v^k) / sqrt(1 - beta2^t) + eps)``,
  ``m^{-1} = v^{-1} = 0`` -- torch.optim.Adam's form of the bias correction (eps added after
  correcting v). ``bias_correction=0`` drops both corrections:
  ``theta^{k+1} = theta^k - eta m^k / (sqrt(v^k) + eps)``, which is FedAdam as Reddi et al.'s
  Algorithm 2 states it (their tau is eps; they start from ``v_{-1} >= tau^2``, psrv from 0).
- ``adamw`` (I. Loshchilov, F. Hutter, "Decoupled Weight Decay Regularization", ICLR 2019):
  ``adam`` plus the decoupled decay ``- eta * weight_decay * theta^k`` in the same step, as
  torch.optim.AdamW (which multiplies theta by ``1 - eta * weight_decay`` first: the same step,
  rounded differently). ``adam`` and ``momentum`` take no ``weight_decay``: an L2 term belongs in
  the objective (``--l2``), where every algorithm sees it.

Defaults are torch's (beta1 0.9, beta2 0.999, eps 1e-8, momentum 0.9, AdamW weight_decay 0.01).
Reddi et al. tune eta and tau per task (their grids: tau in 1e-7 .. 1e-1, beta1 0.9, beta2 0.99).

Exactness: the server and every worker replica (:mod:`psrv.replica`) call the same ``update`` on
the same float64 arrays, with a fixed sequence of numpy operations (no fused or reordered
arithmetic), so their models stay bit-identical. ``beta^t`` is carried in the state as a product
of t factors rather than computed with ``pow``, whose last bit may differ between C libraries.

What changes for the lazy rules: their history stays ``||theta^{k+1} - theta^k||^2`` of the step
actually taken (LAQ eq. 7a, Sun et al., NeurIPS 2019) and the threshold is still
``1/(alpha^2 M^2) sum_d xi_d ||dtheta_d||^2`` with alpha = ``--lr``. With sgd that is
``xi/M^2 sum_d ||nabla^{k-d}||^2``, the quantity the rules' analysis uses. With momentum it is
``||u||^2``: in steady state up to ``1/(1-beta)^2`` (100x for beta 0.9) larger, so workers skip
more. With adam the step is scale-free (about eta per coordinate), so the threshold is about
``xi/M^2`` times the number of coordinates moving, whatever the gradients' size: tune ``xi`` to
the gradient scale (LAG/LAQ's convergence proofs assume the GD step; none covers these).

Pure: numpy only. ``init(dim) -> state`` and ``update(aggregate, state, theta) -> (step, state)``:
state goes in and comes back out (optax's shape), so it is easy to test, checkpoint and replicate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from psrv.keyvalue import parse_spec


@dataclass(frozen=True)
class OptState:
    """An optimizer's state after ``count`` steps. ``m``: momentum's buffer ``u`` or Adam's first
    moment; ``v``: Adam's second moment; ``beta1_power``/``beta2_power``: ``beta^count`` (Adam's
    bias correction). Plain SGD keeps none of it: ``OptState()``."""

    count: int = 0
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    beta1_power: float = 1.0
    beta2_power: float = 1.0

    @property
    def empty(self) -> bool:
        return self.m is None and self.v is None and self.count == 0

    def digest_arrays(self) -> tuple[np.ndarray, ...]:
        """The float64 arrays a replica digest covers: none for an empty state (plain SGD's digest
        is what it always was), else the moments and ``(count, beta1^t, beta2^t)``."""
        if self.empty:
            return ()
        vectors = tuple(a for a in (self.m, self.v) if a is not None)
        return (*vectors, np.array([self.count, self.beta1_power, self.beta2_power], dtype=np.float64))


class ServerOpt(Protocol):
    name: str
    lr: float

    def init(self, dim: int) -> OptState: ...

    def update(self, aggregate: np.ndarray, state: OptState, theta: np.ndarray) -> tuple[np.ndarray, OptState]:
        """The step to add to ``theta`` (not changed here) and the new state; ``state`` is not changed."""
        ...

    def check_state(self, state: OptState, dim: int) -> None: ...


def _check_unit(name: str, key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"server optimizer {name}: {key} must be in [0, 1), got {value:g}")


class _Base:
    name: ClassVar[str] = ""
    lr: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server optimizer {self.name}: the step size (--lr) must be > 0, got {self.lr}")

    def _moments(self) -> tuple[bool, bool]:
        return False, False

    def check_state(self, state: OptState, dim: int) -> None:
        """``ValueError`` unless ``state`` has this optimizer's vectors, of length ``dim``."""
        for key, needed in zip(("m", "v"), self._moments(), strict=True):
            arr = getattr(state, key)
            if needed and (arr is None or arr.shape != (dim,) or arr.dtype != np.float64):
                raise ValueError(f"server optimizer {self.name}: state needs {key} as {dim} float64 values")


@dataclass(frozen=True)
class SGD(_Base):
    lr: float
    name: ClassVar[str] = "sgd"

    def init(self, dim: int) -> OptState:
        return OptState()

    def update(self, aggregate: np.ndarray, state: OptState, theta: np.ndarray) -> tuple[np.ndarray, OptState]:
        return -self.lr * aggregate, state


@dataclass(frozen=True)
class Momentum(_Base):
    lr: float
    momentum: float = 0.9
    name: ClassVar[str] = "momentum"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit(self.name, "momentum", self.momentum)

    def _moments(self) -> tuple[bool, bool]:
        return True, False

    def init(self, dim: int) -> OptState:
        return OptState(m=np.zeros(dim))

    def update(self, aggregate: np.ndarray, state: OptState, theta: np.ndarray) -> tuple[np.ndarray, OptState]:
        u = self.momentum * state.m + aggregate
        return -self.lr * u, OptState(state.count + 1, m=u)


@dataclass(frozen=True)
class Adam(_Base):
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    bias_correction: bool = True
    name: ClassVar[str] = "adam"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_unit(self.name, "beta1", self.beta1)
        _check_unit(self.name, "beta2", self.beta2)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"server optimizer {self.name}: eps must be > 0, got {self.eps:g}")

    def _moments(self) -> tuple[bool, bool]:
        return True, True

    def init(self, dim: int) -> OptState:
        return OptState(m=np.zeros(dim), v=np.zeros(dim))

    def update(self, aggregate: np.ndarray, state: OptState, theta: np.ndarray) -> tuple[np.ndarray, OptState]:
        g = aggregate
        m = self.beta1 * state.m + (1.0 - self.beta1) * g
        v = self.beta2 * state.v + (1.0 - self.beta2) * (g * g)
        b1, b2 = state.beta1_power * self.beta1, state.beta2_power * self.beta2
        if self.bias_correction:
            denom = np.sqrt(v) / math.sqrt(1.0 - b2) + self.eps
            step = (-self.lr / (1.0 - b1)) * (m / denom)
        else:
            step = -self.lr * (m / (np.sqrt(v) + self.eps))
        self._decay(step, theta)
        return step, OptState(state.count + 1, m, v, b1, b2)

    def _decay(self, step: np.ndarray, theta: np.ndarray) -> None:
        pass


@dataclass(frozen=True)
class AdamW(Adam):
    weight_decay: float = 0.01
    name: ClassVar[str] = "adamw"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"server optimizer {self.name}: weight_decay must be >= 0, got {self.weight_decay:g}")

    def _decay(self, step: np.ndarray, theta: np.ndarray) -> None:
        if self.weight_decay:
            step -= (self.lr * self.weight_decay) * theta


SERVER_OPTS: dict[str, type[_Base]] = {cls.name: cls for cls in (SGD, Momentum, Adam, AdamW)}
DEFAULT = "sgd"


def option_names(name: str) -> tuple[str, ...]:
    """The ``KEY``s of ``--server-opt NAME:KEY=VALUE,...`` (the step size is ``--lr``)."""
    return tuple(f.name for f in dataclasses.fields(SERVER_OPTS[name]) if f.init and f.name != "lr")


def make_server_opt(spec: str, lr: float) -> ServerOpt:
    """``"adam:beta2=0.99,eps=1e-6"`` with step size ``lr`` -> the optimizer; a bad name, key or
    value is a ``ValueError`` that says what is valid."""
    try:
        name, options = parse_spec(spec or DEFAULT)
    except ValueError as exc:
        raise ValueError(f"server optimizer: {exc}") from None
    cls = SERVER_OPTS.get(name)
    if cls is None:
        raise ValueError(f"unknown server optimizer {name!r}; known: {', '.join(SERVER_OPTS)}")
    valid = option_names(name)
    if "lr" in options:
        raise ValueError(
            "server optimizer: the step size is --lr (the one step size of a run), not a server-opt option"
        )
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"server optimizer {name}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"valid: {', '.join(valid) or '(none)'}"
        )
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in options:
            value = options[f.name]
            if f.type == "bool":
                if value not in (0.0, 1.0):
                    raise ValueError(f"server optimizer {name}: {f.name} must be 0 or 1, got {value:g}")
                value = bool(value)
            kwargs[f.name] = value
    return cls(lr=lr, **kwargs)


def is_plain(spec: str) -> bool:
    """Whether ``spec`` is plain SGD (what a run without ``--server-opt`` does)."""
    return (spec or DEFAULT).strip() in (DEFAULT, f"{DEFAULT}:")
