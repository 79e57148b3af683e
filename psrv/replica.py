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

import threading
from collections.abc import Callable
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


def _words(arr: np.ndarray) -> np.ndarray:
    """The float64 words of ``arr`` as uint64 (the digest and the comparisons read bit patterns)."""
    return np.ascontiguousarray(arr, dtype="<f8").view("<u8")


def state_digest(theta: np.ndarray, total: np.ndarray, opt_state: OptState | None = None) -> int:
    """Sum, modulo 2**64, of the float64 words of ``theta``, ``total`` and the server optimizer's
    state (its moments and ``(count, beta1^t, beta2^t)``; nothing for plain SGD) read as uint64:
    any single differing coordinate changes it, and it costs one pass over memory."""
    extra = () if opt_state is None else opt_state.digest_arrays()
    total_sum = 0
    for arr in (theta, total, *extra):
        total_sum += int(_words(arr).sum(dtype=np.uint64))
    return total_sum % (1 << 64)


def changed_indices(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Coordinates whose bits changed (NaN-safe: compares the float64 words)."""
    return np.flatnonzero(before.view("<u8") != after.view("<u8"))


def changed(before: np.ndarray, after: np.ndarray, limit: int) -> tuple[int, np.ndarray | None]:
    """How many coordinates changed their bits, and which: ``(n, changed_indices(before, after))``
    when ``n <= limit``, ``(n, None)`` when more changed. One pass, block by block (no d-sized
    temporary): a sparse change is counted and found in the same read of the two arrays, and a
    dense one stops collecting indices as soon as it passes ``limit`` (d of them would be 8d bytes
    written and read again)."""
    b, a = before.view("<u8"), after.view("<u8")
    n, parts, collecting = 0, [], True
    for i in range(0, b.size, BLOCK):
        mask = b[i : i + BLOCK] != a[i : i + BLOCK]
        count = int(np.count_nonzero(mask))
        if count and collecting:
            collecting = n + count <= limit
            if collecting:
                parts.append(np.flatnonzero(mask) + i)
        n += count
    if not collecting:
        return n, None
    return n, np.concatenate(parts) if parts else np.empty(0, dtype=np.intp)


@dataclass
class Replica:
    """A worker's copy of the server's state at ``round``: theta^round, the aggregate after the
    close of round - 1, the step history and the server optimizer's state.

    :meth:`advance` and :meth:`move` change it in place (a worker alone with its replica);
    :meth:`advanced` and :meth:`moved` leave it as it is and return the next round's (the replicas
    a host's workers share, :class:`ReplicaShare`). Both run the same operations on the same
    values, so they give the same bits. The digest is computed once per state."""

    round: int
    theta: np.ndarray
    total: np.ndarray
    history: StepHistory = field(default_factory=lambda: StepHistory(0))
    opt_state: OptState = field(default_factory=OptState)
    _digest: int | None = field(default=None, repr=False, compare=False)

    def advance(self, change: AggregateChange, opt: ServerOpt) -> None:
        """From round k to k + 1: the server's close of round k, replayed."""
        apply_change(self.total, change)
        step_sq, self.opt_state = take_step(self.theta, self.total, opt, self.opt_state)
        self.history.push(step_sq)
        self.round += 1
        self._digest = None

    def move(self, down: DownCompressor, step: Payload) -> None:
        """From round k to k + 1 under EF21-P's compressed downlink: ``w`` moves by the decoded step
        (the aggregate and the history are not replicated there)."""
        down.apply(self.theta, step)
        self.round += 1
        self._digest = None

    def copy(self) -> Replica:
        """A replica of the same state that shares no array it may change."""
        return Replica(
            self.round, self.theta.copy(), self.total.copy(), self.history.copy(), self.opt_state, self._digest
        )

    def advanced(self, change: AggregateChange, opt: ServerOpt) -> Replica:
        """:meth:`advance` on a copy (the server optimizer's state is never changed in place: shared)."""
        nxt = self.copy()
        nxt.advance(change, opt)
        return nxt

    def moved(self, down: DownCompressor, step: Payload) -> Replica:
        """:meth:`move` on a new replica; only ``theta`` changes, so only it is copied."""
        nxt = Replica(self.round, self.theta.copy(), self.total, self.history, self.opt_state)
        nxt.move(down, step)
        return nxt

    def corrupt(self) -> None:
        """Fault injection: flip the lowest bit of ``theta[0]`` (the next digest check must see it)."""
        self.theta.view(np.uint64)[0] ^= np.uint64(1)
        self._digest = None

    def digest(self) -> int:
        if self._digest is None:
            self._digest = state_digest(self.theta, self.total, self.opt_state)
        return self._digest


class ReplicaShare:
    """The replicas of the logical workers of one host (:mod:`worker.host`) that talk to one server,
    kept once instead of once per worker (``d`` x 16 bytes each, and a step and a digest each per
    round). Every worker still checks the server's digest for itself and heals by its own snapshot.

    Shared replicas are never changed: a round's close makes a new one (:meth:`Replica.advanced`),
    once per host, for the first worker that needs it; the others with the same replica of the
    round before, and the same digest to reach, take that one (:meth:`child`). A replica that
    matched the server's digest is held by (round, digest), and a snapshot equal to the one held,
    bit for bit, is dropped for it (:meth:`canonical`). A worker whose replica is its own (a
    fault-injected copy; a snapshot of a round no one else holds) makes its own next replica, which
    is shared from then on. Replicas of rounds before the newest but :data:`KEEP` are let go (a
    worker still holding one keeps it alive); a round far below the newest (a restarted or
    resumed server) starts the window again there.

    Thread-safe: a host's lanes run workers' rounds in parallel; a replica is made under the lock,
    so the others that need it wait for it rather than make it again."""

    #: rounds kept before the newest: a host's workers are at most one round apart (the server serves
    #: a host's next round once every worker has answered the last)
    KEEP = 1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: dict[int, tuple[Replica, Replica]] = {}  # id(base) -> (base, the round after it)
        self._held: dict[tuple[int, int], Replica] = {}  # (round, digest) -> a replica that matched the server's
        self._newest = -1
        self.made = 0  # replicas made here (a round's close replayed): once a round for the whole host

    def child(self, base: Replica, make: Callable[[Replica], Replica], digest: int) -> Replica:
        """The replica after ``base`` that the server's ``digest`` says it should be: made by
        ``make(base)`` (and digested) by the first worker to ask, the same object for the others.
        One made for another digest (the same state closed otherwise: a server that resumed from a
        checkpoint, or restarted) is made again."""
        with self._lock:
            known = self._children.get(id(base))
            if known is not None and known[0] is base and known[1].digest() == digest:
                return known[1]
            nxt = make(base)
            nxt.digest()
            self.made += 1
            self._children[id(base)] = (base, nxt)
            self._prune(nxt.round)
            return nxt

    def canonical(self, replica: Replica) -> Replica:
        """The host's replica of ``replica``'s round and digest (``replica`` has matched the server's
        digest for that round): the one held already where it is ``replica`` or equal to it bit for
        bit (a snapshot; the digest alone could miss errors that cancel), else ``replica``, held
        from now on."""
        key = (replica.round, replica.digest())
        with self._lock:
            held = self._held.get(key)
            if held is not None and (held is replica or _same_state(held, replica)):
                return held
            self._held[key] = replica
            self._prune(replica.round)
            return replica

    def _prune(self, round_: int) -> None:
        if self._newest - self.KEEP <= round_ <= self._newest:
            return
        self._newest, oldest = round_, round_ - self.KEEP  # further on, or a new start further back
        self._held = {k: r for k, r in self._held.items() if oldest <= k[0] <= round_}
        self._children = {k: pair for k, pair in self._children.items() if oldest <= pair[0].round < round_}


def _same_state(a: Replica, b: Replica) -> bool:
    """The two replicas hold the same state, bit for bit (NaN-safe: the float64 words compared)."""
    arrays = [(a.theta, b.theta), (a.total, b.total)]
    arrays += list(zip(a.opt_state.digest_arrays(), b.opt_state.digest_arrays(), strict=False))
    return (
        a.round == b.round
        and a.history.recent() == b.history.recent()
        and len(a.opt_state.digest_arrays()) == len(b.opt_state.digest_arrays())
        and all(x.shape == y.shape and np.array_equal(_words(x), _words(y)) for x, y in arrays)
    )


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
