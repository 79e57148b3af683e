"""The replicated broadcast state, kept bit-identical on the server and every worker.

For the lazy and accumulating algorithms the model is a deterministic function of what the server
accepted: ``theta^{k+1} = theta^k - alpha * nabla^k`` with the aggregate ``nabla^k`` (the sum the
server steps along; Chen et al., NeurIPS 2018; Sun et al., NeurIPS 2019, eq. 4), or, with a server
optimizer (:mod:`psrv.server_opt`; Reddi et al., ICLR 2021), ``theta^{k+1} = theta^k + step`` with
``(step, s^{k+1}) = update(nabla^k, s^k, theta^k)``. A worker that holds ``(theta, nabla, optimizer
state s, step history)`` of round k-1 needs only how ``nabla`` changed at the close of
round k-1 to compute round k itself: nothing when nobody uploaded, the round's accepted payloads
(accumulating rules add them), or the new values of the coordinates that changed. Both sides run
the functions of this module -- the same float64 operations in the same order -- so the replica
stays bit-identical; :func:`state_digest` checks it every round.

Pure: numpy and core types only (the engine and the worker both import it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from psrv.aggregate import BLOCK, add_payload
from psrv.keyvalue import parse_spec
from psrv.payload import Payload, to_dense
from psrv.server_opt import OptState, ServerOpt
from psrv.triggers import StepHistory

#: the forms of :class:`AggregateChange`
CHANGE_KINDS = ("none", "relay", "values", "aggregate")


@dataclass(frozen=True)
class AggregateChange:
    """How the aggregate changed when a round closed.

    ``none``: unchanged. ``relay``: add ``to_dense(p)`` of each payload, in order (accumulating
    rules only: their aggregate is the running sum of everything accepted). ``values``: the
    coordinates ``indices`` now hold ``values``. ``aggregate``: ``values`` is the whole aggregate."""

    kind: str = "none"
    dim: int = 0
    payloads: tuple[Payload, ...] = ()
    workers: tuple[int, ...] = ()  # worker index of each relayed payload (informative)
    indices: np.ndarray | None = None
    values: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in CHANGE_KINDS:
            raise ValueError(f"change kind must be one of {', '.join(CHANGE_KINDS)}, got {self.kind!r}")


def absorb_relay(total: np.ndarray, payloads: tuple[Payload, ...] | list[Payload]) -> None:
    """``total += to_dense(p)`` for each payload in order, by the server's own absorb
    (:func:`psrv.aggregate.add_payload`), so the sums agree bit for bit."""
    for p in payloads:
        add_payload(total, p)


def apply_change(total: np.ndarray, change: AggregateChange) -> None:
    """Apply ``change`` to the aggregate in place."""
    if change.kind == "relay":
        absorb_relay(total, change.payloads)
    elif change.kind == "values":
        total[change.indices] = change.values
    elif change.kind == "aggregate":
        total[:] = change.values


def take_step(theta: np.ndarray, total: np.ndarray, opt: ServerOpt, state: OptState) -> tuple[float, OptState]:
    """The server optimizer's step along the aggregate, ``theta += step`` in place (plain SGD:
    ``step = -lr * total``); returns ``||step||^2`` for the lazy rules' history (the step actually
    taken, whatever the optimizer) and the optimizer's new state."""
    step, state = opt.update(total, state, theta)
    theta += step
    return float(step @ step), state


def state_digest(theta: np.ndarray, total: np.ndarray, opt_state: OptState | None = None) -> int:
    """Sum, modulo 2**64, of the float64 words of ``theta``, ``total`` and the server optimizer's
    state (its moments and ``(count, beta1^t, beta2^t)``; nothing for plain SGD) read as uint64:
    any single differing coordinate changes it, and it costs one pass over memory."""
    extra = () if opt_state is None else opt_state.digest_arrays()
    total_sum = 0
    for arr in (theta, total, *extra):
        total_sum += int(np.ascontiguousarray(arr, dtype="<f8").view("<u8").sum(dtype=np.uint64))
    return total_sum % (1 << 64)


def changed_indices(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Coordinates whose bits changed (NaN-safe: compares the float64 words)."""
    return np.flatnonzero(before.view("<u8") != after.view("<u8"))


def changed_count(before: np.ndarray, after: np.ndarray) -> int:
    """``len(changed_indices(before, after))`` without making the index array (a dense change has
    d of them: 8d bytes written and read again), block by block: no d-sized temporary."""
    b, a = before.view("<u8"), after.view("<u8")
    return sum(int(np.count_nonzero(b[i : i + BLOCK] != a[i : i + BLOCK])) for i in range(0, b.size, BLOCK))


@dataclass
class Replica:
    """A worker's copy of the server's state at ``round``: theta^round, the aggregate after the
    close of round - 1, the step history and the server optimizer's state."""

    round: int
    theta: np.ndarray
    total: np.ndarray
    history: StepHistory = field(default_factory=lambda: StepHistory(0))
    opt_state: OptState = field(default_factory=OptState)

    def advance(self, change: AggregateChange, opt: ServerOpt) -> None:
        """From round k to k + 1: the server's close of round k, replayed."""
        apply_change(self.total, change)
        step_sq, self.opt_state = take_step(self.theta, self.total, opt, self.opt_state)
        self.history.push(step_sq)
        self.round += 1

    def digest(self) -> int:
        return state_digest(self.theta, self.total, self.opt_state)


# ------------------------------------------------------------------------------ compressed downlink
def parse_compressor_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``"topk:ratio=0.01,k=0"`` -> ``("topk", {"ratio": 0.01, "k": 0.0})`` (``ValueError`` if malformed)."""
    try:
        return parse_spec(spec)
    except ValueError as exc:
        raise ValueError(f"down-compressor: {exc}") from None


class DownCompressor:
    """The primal (model) compression of EF21-P (Gruntkowska, Tyurin, Richtárik, ICML 2023, Alg. 1):
    the workers compute at a shared model ``w`` that the server moves towards its own ``theta`` by
    a compressed step, ``w^{k} = w^{k-1} + C(theta^k - w^{k-1})``; the server keeps the error
    ``theta - w`` implicitly, so nothing is lost, only delayed. Server and workers apply the same
    decoded step to their copy of ``w`` (bit-identical; the broadcast's digest checks it).

    EF21-P's analysis takes a contractive C. An unbiased compressor with variance factor omega is
    made contractive by scaling its output by ``1 / (1 + omega)`` (both sides scale); low-precision
    floats (fp16, bf16) are contractive as they are; the other biased ones (threshold, sq, laq) are
    refused: without contraction the error theta - w can grow (S+Q's sign step diverged in a test)."""

    def __init__(self, spec: str) -> None:
        from psrv.compress import make_compressor

        self.spec = spec
        self.name, options = parse_compressor_spec(spec)
        self.compressor = make_compressor(self.name, **options)
        kind = self.compressor.compressor_class(1 << 20).kind
        if kind == "biased" and self.compressor.payload_kind != "dense":  # low-precision floats are contractive
            raise ValueError(
                f"down-compressor {self.name!r} is biased and not contractive; EF21-P's downlink needs a "
                "contractive compressor (topk, dense, fp16, bf16) or an unbiased one (randk, stochastic, qsgd; "
                "scaled by 1/(1+omega))"
            )

    def scale(self, dim: int) -> float:
        cls = self.compressor.compressor_class(dim)
        return 1.0 / (1.0 + cls.constant) if cls.kind == "unbiased" else 1.0

    def compress(self, w: np.ndarray, theta: np.ndarray, rng: np.random.Generator) -> Payload:
        """The payload that moves ``w`` towards ``theta``."""
        return self.compressor.compress(theta - w, rng)

    def apply(self, w: np.ndarray, p: Payload) -> None:
        """``w += scale * decoded(p)`` in place: the same on the server and every worker."""
        step = to_dense(p)
        scale = self.scale(w.size)
        if scale != 1.0:
            step *= scale
        w += step
