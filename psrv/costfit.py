"""Fit a communication cost model to measured transmission times (``psrv fit-cost``).

Khirirat, Aytekin, Magnússon and Johansson, "A flexible framework for communication-efficient
machine learning: from HPC to IoT" (AAAI 2021, arXiv:2003.06377) tune the compression level against
a cost C of the payload P: the *affine* model ``C = c1 * P + c0`` and the *packet* model
``C = c1 * ceil(P / P_max) + c0`` (their eq. 6), and fit such a model to end-to-end transmission
times measured on their link (their Appendix H, Figure 3). This module does the same for psrv's own
link: it sends ``Probe`` calls of increasing size to a running server (:meth:`psrv.server.Servicer.Probe`),
times each call at the client, takes the median of the repeats per size, and fits both models.

* P is the *wire bytes* of a message: the serialized gRPC message (what psrv counts as bytes up),
  the quantity psrv's compressors produce. Time is seconds of wall clock per call (unit "s").
* Least absolute *relative* residuals ((fit - t) / t, by iteratively reweighted least squares), each
  size weighted by the stretch of log(size) it stands for: a 100-byte probe and a 4 MB one count
  alike (plain least squares would fit only the big ones and leave c0 to chance), each decade of
  sizes counts alike, and a disturbed time moves the fit little; c0 is kept >= 0 (the line goes
  through the origin if it would come out negative).
* Per size, the median of the repeats (``stat="min"``: the fastest, for a loaded machine where
  interference only ever adds time).
* P_max of the packet model is not fitted freely (for sizes well above it the model is affine with
  slope c1 / P_max, so it is weakly determined): each candidate (default :data:`P_MAX_CANDIDATES`,
  or ``--p-max``) is fitted and the one with the smallest residuals is kept.
* The affine model is the top-level one of the saved fit unless the packet model's relative RMS
  residual is clearly smaller (:data:`PACKET_MARGIN`); both fits are kept under ``fits``.

The saved JSON is ``{"model": "affine"|"packet", "c0", "c1", "p_max_bytes" (packet), "unit": "s",
"size": "wire_bytes", "fits": {...}, "measurements": [...], ...}``: what CAT's cost model loads.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: TCP payload of one Ethernet frame: MTU 1500 - IPv4 20 - TCP 20 - timestamps 12.
TCP_MSS = 1448
#: P_max tried by default: TCP's MSS with and without timestamps, HTTP/2's default frame
#: (16 KiB), and loopback's MSS (MTU 65536).
P_MAX_CANDIDATES = (1448, 1460, 16384, 65483)
#: The packet model is preferred only when it fits this much better than the affine one.
PACKET_MARGIN = 0.95
#: Overhead of a ProbeRequest around its payload (field tags and lengths), at most.
PROBE_OVERHEAD = 16


class FitError(ValueError):
    """The measurements cannot be fitted (too few sizes, non-positive times)."""


@dataclass(frozen=True)
class Fit:
    """A fitted cost model: ``seconds = c1 * x + c0`` with x the wire bytes (affine) or the
    packets ``ceil(bytes / p_max)`` (packet)."""

    model: str
    c0: float
    c1: float
    p_max: int | None = None
    r2: float = float("nan")
    rms_rel: float = float("nan")  # RMS of the relative residuals over the fitted sizes

    def predict(self, wire_bytes: Any) -> Any:
        x = np.asarray(wire_bytes, dtype=float)
        if self.model == "packet":
            assert self.p_max is not None
            x = np.ceil(x / self.p_max)
        return self.c1 * x + self.c0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "c0": self.c0, "c1": self.c1}
        if self.model == "packet":
            out["p_max_bytes"] = int(self.p_max or 0)
        out.update(unit="s", size="wire_bytes", r2=self.r2, rms_rel=self.rms_rel)
        return out


def _wls(x: np.ndarray, t: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(c0, c1) minimizing sum(w * ((c1 x + c0 - t) / t)^2), with c0 >= 0."""
    r = np.sqrt(w) / t
    a = np.stack([x * r, r], axis=1)
    (c1, c0), *_ = np.linalg.lstsq(a, np.sqrt(w), rcond=None)
    if c0 < 0:  # an overhead below zero is noise: through the origin instead
        xr = x * r
        c1, c0 = float(np.sum(xr * np.sqrt(w)) / np.sum(xr**2)), 0.0
    return float(c0), float(c1)


def log_density_weights(sizes: np.ndarray) -> np.ndarray:
    """A weight per size proportional to the stretch of log(size) it stands for (mean 1), so each
    decade of sizes counts alike however densely it was probed (e.g. the sizes around packet
    boundaries)."""
    order = np.argsort(sizes)
    lx = np.log(np.maximum(sizes[order], 1.0))
    w = np.gradient(lx) if len(lx) > 2 else np.ones_like(lx)
    w = np.maximum(w, 1e-3 * max(float(w.max()), 1e-12))
    out = np.empty_like(w)
    out[order] = w / w.mean()
    return out


def _fit_rel(x: np.ndarray, t: np.ndarray, iterations: int = 30) -> tuple[float, float]:
    """(c0, c1) minimizing the sum of |relative residuals| weighted by :func:`log_density_weights`
    (least absolute deviations, by iteratively reweighted least squares), with c0 >= 0: a size
    whose time was disturbed (another process) moves the fit less than under squares."""
    base = log_density_weights(x)
    c0, c1 = _wls(x, t, base)
    for _ in range(iterations):
        rel = np.abs((c1 * x + c0 - t) / t)
        c0, c1 = _wls(x, t, base / np.maximum(rel, 1e-4))
    return c0, c1


def _checked(sizes: Sequence[float], seconds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, t = np.asarray(sizes, dtype=float), np.asarray(seconds, dtype=float)
    if x.shape != t.shape or x.ndim != 1:
        raise FitError("need one time per size")
    if len(np.unique(x)) < 2:
        raise FitError(f"need at least 2 different sizes to fit a cost model, got {len(np.unique(x))}")
    if not np.all(t > 0) or not np.all(np.isfinite(t)):
        raise FitError("transmission times must be positive and finite")
    return x, t


def _scored(model: str, c0: float, c1: float, p_max: int | None, x: np.ndarray, t: np.ndarray) -> Fit:
    fit = Fit(model, c0, c1, p_max)
    pred = fit.predict(x)
    ss_res, ss_tot = float(np.sum((pred - t) ** 2)), float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    rms = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    return Fit(model, c0, c1, p_max, r2, rms)


def fit_affine(sizes: Sequence[float], seconds: Sequence[float]) -> Fit:
    """The affine model ``c1 * P + c0`` (Khirirat et al. 2021, Section 2.2) by relative least squares."""
    x, t = _checked(sizes, seconds)
    return _scored("affine", *_fit_rel(x, t), None, x, t)


def fit_packet(sizes: Sequence[float], seconds: Sequence[float], p_max: int | Sequence[int] = P_MAX_CANDIDATES) -> Fit:
    """The packet model ``c1 * ceil(P / P_max) + c0`` (eq. 6): for each candidate ``p_max``, c0
    and c1 by relative least squares; the candidate with the smallest residuals."""
    x, t = _checked(sizes, seconds)
    candidates = [p_max] if isinstance(p_max, int) else list(p_max)
    if not candidates or min(candidates) < 1:
        raise FitError("P_max candidates must be >= 1 byte")
    fits = []
    for p in candidates:
        packets = np.ceil(x / p)
        if len(np.unique(packets)) < 2:
            continue  # every size is one packet: c1 is not determined
        fits.append(_scored("packet", *_fit_rel(packets, t), int(p), x, t))
    if not fits:
        raise FitError(f"every size fits in one packet of {max(candidates)} bytes: probe bigger sizes")
    return min(fits, key=lambda f: f.rms_rel)


def fit_both(
    sizes: Sequence[float], seconds: Sequence[float], p_max: int | Sequence[int] = P_MAX_CANDIDATES
) -> tuple[Fit, dict[str, Fit]]:
    """Both models, and the better one: the packet model only when its relative RMS residual is
    below :data:`PACKET_MARGIN` times the affine one's (it has one more parameter, P_max)."""
    fits = {"affine": fit_affine(sizes, seconds)}
    try:
        fits["packet"] = fit_packet(sizes, seconds, p_max)
    except FitError:
        pass
    best = fits["affine"]
    if "packet" in fits and fits["packet"].rms_rel < PACKET_MARGIN * best.rms_rel:
        best = fits["packet"]
    return best, fits


def predict(fit: dict[str, Any], wire_bytes: Any) -> Any:
    """Seconds a saved fit (the JSON of :func:`fit_json`) predicts for ``wire_bytes``."""
    return Fit(fit["model"], fit["c0"], fit["c1"], fit.get("p_max_bytes")).predict(wire_bytes)


# ------------------------------------------------------------------------------------ measuring
def default_sizes(max_bytes: int, min_bytes: int = 64, points: int = 14, mss: int = TCP_MSS) -> list[int]:
    """Probe payload sizes: ``points`` log-spaced from ``min_bytes`` to ``max_bytes``, plus sizes
    just below and above 1..4 packets of ``mss`` bytes (where a packet model steps)."""
    if max_bytes < min_bytes:
        raise ValueError(f"max_bytes ({max_bytes}) must be >= {min_bytes}")
    logs = np.geomspace(min_bytes, max_bytes, points)
    near = [k * mss + d for k in range(1, 5) for d in (-2 * PROBE_OVERHEAD, PROBE_OVERHEAD)]
    return sorted({int(round(v)) for v in logs} | {n for n in near if min_bytes <= n <= max_bytes})


@dataclass
class Row:
    """One size's measurements: payload bytes asked for, wire bytes sent, every call's seconds."""

    payload_bytes: int
    wire_bytes: int
    seconds: list[float]
    iface_bytes: list[int]  # per call, bytes the interface sent (empty without an interface)
    iface_packets: list[int]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def value(self, stat: str = "median") -> float:
        """The row's time: the ``median`` or the ``min`` of its calls."""
        return min(self.seconds) if stat == "min" else self.median

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "payload_bytes": self.payload_bytes,
            "wire_bytes": self.wire_bytes,
            "seconds_median": self.median,
            "seconds_min": min(self.seconds),
            "seconds": self.seconds,
        }
        if self.iface_bytes:
            out["iface_tx_bytes_median"] = statistics.median(self.iface_bytes)
            out["iface_tx_packets_median"] = statistics.median(self.iface_packets)
        return out


def iface_counter(dev: str) -> Callable[[], tuple[int, int]]:
    """Reads (tx bytes, tx packets) of ``dev`` in this process's network namespace."""
    from psrv.cluster import counters

    def read() -> tuple[int, int]:
        tx = counters.link_count(dev)["tx"]
        return tx.bytes, tx.packets

    read()  # fails now (CounterError) for a device that is not there
    return read


def measure(
    probe: Callable[[int], tuple[int, float]],
    sizes: Sequence[int],
    repeat: int = 5,
    warmup: int = 3,
    seed: int = 0,
    counter: Callable[[], tuple[int, int]] | None = None,
) -> list[Row]:
    """Call ``probe(payload_bytes)`` (which returns the wire bytes it sent and the seconds the call
    took) ``repeat`` times per size: each repeat goes through the sizes in a fresh random order (so
    drift spreads over all sizes), after ``warmup`` calls (the first of the largest size: connection, TCP
    and HTTP/2 windows). ``counter``: read around each call, the interface bytes and packets it cost."""
    if repeat < 1 or not sizes:
        raise ValueError("need repeat >= 1 and at least one size")
    for i in range(warmup):
        probe(max(sizes) if i == 0 else min(sizes))
    rows = {n: Row(n, 0, [], [], []) for n in sizes}
    rng = random.Random(seed)
    for _ in range(repeat):
        order = list(sizes)
        rng.shuffle(order)
        for n in order:
            before = counter() if counter else None
            wire, seconds = probe(n)
            row = rows[n]
            row.wire_bytes = wire
            row.seconds.append(seconds)
            if counter and before:
                after = counter()
                row.iface_bytes.append(after[0] - before[0])
                row.iface_packets.append(after[1] - before[1])
    return [rows[n] for n in sorted(rows)]


def fit_rows(
    rows: Sequence[Row], p_max: int | Sequence[int] = P_MAX_CANDIDATES, stat: str = "median"
) -> tuple[Fit, dict[str, Fit]]:
    return fit_both([r.wire_bytes for r in rows], [r.value(stat) for r in rows], p_max)


def fit_json(best: Fit, fits: dict[str, Fit], rows: Sequence[Row], **extra: Any) -> dict[str, Any]:
    """The file ``psrv fit-cost --out`` writes (see the module docstring)."""
    out = best.to_json()
    out["fits"] = {name: f.to_json() for name, f in fits.items()}
    out["fit_method"] = (
        "least absolute relative residuals (IRLS), weighted per log-size, c0 >= 0; packet P_max: best of the candidates"
    )
    out["measurements"] = [r.to_json() for r in rows]
    out.update(extra)
    return out


def residual_table(rows: Sequence[Row], fits: dict[str, Fit], stat: str = "median") -> str:
    """Measured times (``stat`` of the repeats) next to each fit's prediction and relative residual."""
    names = list(fits)
    head = f"{'payload':>9} {'wire B':>9} {stat + ' s':>10}" + "".join(f" {n + ' s':>10} {'resid':>7}" for n in names)
    lines = [head]
    for r in rows:
        t = r.value(stat)
        line = f"{r.payload_bytes:>9} {r.wire_bytes:>9} {t:>10.6f}"
        for n in names:
            p = float(fits[n].predict(r.wire_bytes))
            line += f" {p:>10.6f} {100 * (p - t) / t:>6.1f}%"
        lines.append(line)
    return "\n".join(lines)


def describe(fit: Fit) -> str:
    if fit.model == "affine":
        form = f"{fit.c1:.4g} s/B * P + {fit.c0:.4g} s"
        rate = f" (~{8 / fit.c1 / 1e6:.4g} Mbit/s)" if fit.c1 > 0 else ""
    else:
        form = f"{fit.c1:.4g} s/packet * ceil(P / {fit.p_max}) + {fit.c0:.4g} s"
        rate = ""
    return f"{fit.model}: {form}{rate}; r2 {fit.r2:.4f}, RMS relative residual {100 * fit.rms_rel:.1f}%"


def plot(rows: Sequence[Row], fits: dict[str, Fit], path: str, title: str = "", stat: str = "median") -> None:
    """Measured vs fitted, like Khirirat et al. (2021), Figure 3: time per message against its
    wire bytes (left, log-log, with each fit), and the bytes counted per message (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wire = np.array([r.wire_bytes for r in rows], dtype=float)
    med = np.array([r.value(stat) for r in rows])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        ax.scatter([r.wire_bytes] * len(r.seconds), r.seconds, s=6, color="0.75", zorder=1)
    ax.scatter(wire, med, s=18, color="C0", label=f"measured ({stat})", zorder=3)
    grid = np.unique(np.concatenate([np.geomspace(wire.min(), wire.max(), 400), wire]))
    for i, f in enumerate(fits.values()):
        ax.plot(grid, f.predict(grid), color=f"C{i + 1}", label=describe(f).split(";")[0], zorder=2)
    ax.set(xscale="log", yscale="log", xlabel="message size P (wire bytes)", ylabel="transmission time (s)")
    ax.legend(fontsize=7)
    payload = np.array([r.payload_bytes for r in rows], dtype=float)
    bx.plot(payload, wire, "o-", ms=3, label="gRPC message bytes")
    if all(r.iface_bytes for r in rows):
        bx.plot(payload, [statistics.median(r.iface_bytes) for r in rows], "s-", ms=3, label="interface tx bytes")
    bx.set(xscale="log", yscale="log", xlabel="payload bytes", ylabel="bytes per message")
    bx.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def holdout_sizes(max_bytes: int, min_bytes: int = 64, points: int = 6) -> list[int]:
    """Sizes between those of :func:`default_sizes` (geometric midpoints), for checking a fit."""
    logs = np.geomspace(min_bytes, max_bytes, 14)
    mids = np.sqrt(logs[:-1] * logs[1:])
    pick = np.unique(np.linspace(0, len(mids) - 1, points).round().astype(int))
    return sorted({int(mids[i]) for i in pick})


class Prober:
    """Probe calls to a psrv server at ``address`` (``security``: a :class:`psrv.tls.ClientSecurity`,
    None: plaintext). Calls refused over the server's rate limit are retried after a pause (and not
    timed: :meth:`__call__` times only the call that went through)."""

    def __init__(self, address: str, security: Any = None, worker_id: str = "", timeout: float = 60.0) -> None:
        from psrv import rpc
        from psrv.tls import ClientSecurity

        self.security = security or ClientSecurity()
        self.channel = self.security.channel(address, rpc.channel_options())
        self.stub = rpc.CountingStub(self.channel)
        self.worker_id, self.timeout = worker_id, timeout
        self._requests: dict[int, Any] = {}
        self.max_message_bytes = int(self._call(self._request(0)).max_message_bytes)

    def _request(self, n: int) -> Any:
        from psrv.v1 import psrv_pb2 as pb

        if n not in self._requests:
            self._requests[n] = pb.ProbeRequest(worker_id=self.worker_id, payload=bytes(n))
        return self._requests[n]

    def _call(self, req: Any) -> Any:
        return self._timed(req)[0]

    def _timed(self, req: Any) -> tuple[Any, float]:
        """The reply and the seconds of the call that went through (refusals over the server's
        rate limit are waited out and not timed)."""
        import grpc

        from psrv import rpc

        for attempt in range(20):
            t0 = time.perf_counter()
            try:
                reply = self.stub.Probe(req, timeout=self.timeout)
                return reply, time.perf_counter() - t0
            except grpc.RpcError as exc:
                wait = rpc.retry_after(exc)  # over a limit that passes (the server's call rate)
                if wait is None or attempt == 19:
                    raise
                time.sleep(max(wait, 0.05))
        raise AssertionError("unreachable")

    def __call__(self, payload_bytes: int) -> tuple[int, float]:
        """Send one probe of ``payload_bytes``: the wire bytes it took (the serialized request, as
        the server counted it) and the seconds the call took at this end."""
        reply, seconds = self._timed(self._request(payload_bytes))
        return int(reply.received_bytes), seconds

    def close(self) -> None:
        self.channel.close()
