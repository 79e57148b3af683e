"""Cost-model fitting (psrv.costfit, ``psrv fit-cost``) and the Probe RPC it measures with: the fitter
on synthetic timings, the command against an in-process server on loopback, Probe's byte counting,
credentials and rate limits, and -- as root -- a fit on a shaped 10 Mbit/s namespace link checked on
sizes it was not fitted on."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

from psrv import costfit
from psrv.cli import main
from psrv.limits import TransportLimits
from psrv.server import ParameterServer, ServerConfig, create_server
from psrv.tls import ClientSecurity, ServerSecurity
from psrv.v1 import psrv_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- the fitter
def _noisy(t: np.ndarray, rel: float, seed: int = 0) -> np.ndarray:
    return t * (1 + np.random.default_rng(seed).normal(0, rel, t.shape))


def test_fit_recovers_affine_constants_from_noisy_timings() -> None:
    c0, c1 = 2e-3, 8.4e-7  # 2 ms per call, 10 Mbit/s with headers
    x = np.array(costfit.default_sizes(4 << 20), dtype=float)
    t = _noisy(c1 * x + c0, 0.03)
    t[5] *= 3  # one disturbed median: least absolute deviations shrug it off
    best, fits = costfit.fit_both(x, t)
    a = fits["affine"]
    assert best is a
    assert a.c0 == pytest.approx(c0, rel=0.05) and a.c1 == pytest.approx(c1, rel=0.05)
    held = np.geomspace(100, 3e6, 7)
    assert np.allclose(a.predict(held), c1 * held + c0, rtol=0.05)


def test_fit_recovers_packet_constants_and_packet_capacity() -> None:
    c0, c1, p_max = 1e-3, 1.2e-3, 1448  # 1 ms per call, a packet of 1448 bytes per 1.2 ms
    x = np.array(costfit.default_sizes(200_000, mss=p_max), dtype=float)
    t = _noisy(c1 * np.ceil(x / p_max) + c0, 0.01, seed=1)
    best, fits = costfit.fit_both(x, t)
    assert best is fits["packet"] and best.p_max == p_max
    assert best.c0 == pytest.approx(c0, rel=0.1) and best.c1 == pytest.approx(c1, rel=0.03)
    assert fits["packet"].rms_rel < fits["affine"].rms_rel
    # the saved form predicts the same
    saved = best.to_json()
    assert saved["model"] == "packet" and saved["p_max_bytes"] == p_max
    assert costfit.predict(saved, 5000) == pytest.approx(best.predict(5000))


def test_fit_keeps_the_overhead_non_negative() -> None:
    x = np.array([1e3, 1e4, 1e5, 1e6])
    best, _ = costfit.fit_both(x, 1e-6 * x - 1e-4 * np.array([0.9, 1.0, 1.1, 1.0]) + 2e-4)
    assert best.c0 >= 0 and best.c1 > 0


def test_fit_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(costfit.FitError, match="2 different sizes"):
        costfit.fit_affine([100, 100], [1.0, 1.1])
    with pytest.raises(costfit.FitError, match="positive"):
        costfit.fit_affine([100, 200], [1.0, 0.0])
    with pytest.raises(costfit.FitError, match="one packet"):
        costfit.fit_packet([100, 200], [1.0, 1.1], 1448)


def test_default_sizes_span_the_range_and_straddle_packets() -> None:
    sizes = costfit.default_sizes(1_000_000)
    assert sizes[0] == 64 and sizes[-1] == 1_000_000 and sizes == sorted(set(sizes))
    for k in (1, 2, 3, 4):  # a size just below and just above k packets
        assert any(k * 1448 - 40 < n < k * 1448 for n in sizes) and any(k * 1448 < n < k * 1448 + 40 for n in sizes)
    held = costfit.holdout_sizes(1_000_000)
    assert not set(held) & set(sizes) and 64 < held[0] and held[-1] < 1_000_000


def test_measure_takes_medians_in_shuffled_order() -> None:
    calls: list[int] = []

    def probe(n: int) -> tuple[int, float]:
        calls.append(n)
        return n + 3, 1.0 + n + (100.0 if len(calls) == 7 else 0.0)  # one slow call

    rows = costfit.measure(probe, [10, 20, 30], repeat=3, warmup=2)
    assert calls[:2] == [30, 10]  # warmup: the largest, then the smallest
    assert all(sorted(calls[i : i + 3]) == [10, 20, 30] for i in (2, 5, 8))  # each repeat: every size once
    assert [(r.payload_bytes, r.wire_bytes, r.median) for r in rows] == [(10, 13, 11.0), (20, 23, 21.0), (30, 33, 31.0)]


# ---------------------------------------------------------------------------------- the Probe RPC
@pytest.fixture
def servers() -> Iterator[Callable[..., tuple[ParameterServer, int]]]:
    made: list[grpc.Server] = []

    def make(security: ServerSecurity | None = None, limits: TransportLimits | None = None, **kw: Any) -> Any:
        ps = ParameterServer(ServerConfig(num_workers=1, rounds=1, register_timeout=30.0, **kw), limits=limits)
        server, port = create_server(ps, "127.0.0.1:0", security=security)
        made.append(server)
        return ps, port

    yield make
    for s in made:
        s.stop(grace=None)


def test_probe_is_counted_and_answered_before_any_worker(servers: Callable[..., Any]) -> None:
    ps, port = servers()
    prober = costfit.Prober(f"127.0.0.1:{port}")
    try:
        wire, seconds = prober(1000)
    finally:
        prober.close()
    assert wire == len(pb.ProbeRequest(payload=bytes(1000)).SerializeToString()) and seconds > 0
    assert prober.max_message_bytes == ps.max_message_bytes > 0
    assert ps.counter.bytes["up", "Probe"] == wire + len(pb.ProbeRequest().SerializeToString())  # and the first, empty
    assert ps.counter.messages["up", "Probe"] == 2 and ps.phase == "registering" and ps.engine.state.workers == {}


def test_probe_is_authorized_like_any_call(servers: Callable[..., Any], tmp_path: Path) -> None:
    from psrv.certs import make_test_pki

    pki = make_test_pki(tmp_path / "pki", ["w0", "w1"])
    _, port = servers(ServerSecurity(tokens=str(pki.tokens)))
    token = ClientSecurity(token_file=str(pki.worker_token("w0")))
    with pytest.raises(grpc.RpcError) as no_token:
        costfit.Prober(f"127.0.0.1:{port}")
    assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as other:
        costfit.Prober(f"127.0.0.1:{port}", token, worker_id="w1")
    assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
    prober = costfit.Prober(f"127.0.0.1:{port}", token, worker_id="w0")
    assert prober(10)[0] > 10
    prober.close()


def test_probe_is_rate_limited_and_the_prober_waits(servers: Callable[..., Any]) -> None:
    limits = TransportLimits(anonymous_call_rate=4.0, call_burst=2)
    ps, port = servers(limits=limits)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{'psrv.v1.ParameterServerService'}/Probe")
        codes = []
        for _ in range(4):
            try:
                call(pb.ProbeRequest(payload=b"x").SerializeToString(), timeout=5)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                assert "--max-anonymous-call-rate" in (exc.details() or "")
    assert "RESOURCE_EXHAUSTED" in codes
    prober = costfit.Prober(f"127.0.0.1:{port}")  # waits out the refusals
    rows = costfit.measure(prober, [10, 20], repeat=2, warmup=0)
    prober.close()
    assert all(len(r.seconds) == 2 and max(r.seconds) < 0.4 for r in rows)  # the waits are not timed


# ---------------------------------------------------------------------------------- psrv fit-cost
def test_fit_cost_on_loopback_writes_a_fit_and_a_plot(servers: Callable[..., Any], tmp_path: Path) -> None:
    ps, port = servers()
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    # --stat min: the suite runs beside other tests, whose load only adds time to a probe
    argv = ["fit-cost", "--server", f"127.0.0.1:{port}", "--out", str(out), "--plot", str(png),
            "--sizes", "64,2000,50000,400000", "--repeat", "2", "--stat", "min",
            "--link", "loopback"]  # fmt: skip
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, r.output
    fit = json.loads(out.read_text())
    assert fit["model"] in ("affine", "packet") and fit["unit"] == "s" and fit["size"] == "wire_bytes"
    assert isinstance(fit["c0"], float) and fit["c0"] >= 0 and fit["c1"] > 0
    assert (fit["model"] == "packet") == ("p_max_bytes" in fit)
    assert set(fit["fits"]) == {"affine", "packet"} and fit["fits"][fit["model"]]["c1"] == fit["c1"]
    rows = fit["measurements"]
    assert [m["payload_bytes"] for m in rows] == [64, 2000, 50000, 400000]
    assert all(m["payload_bytes"] < m["wire_bytes"] <= m["payload_bytes"] + 16 and len(m["seconds"]) == 2 for m in rows)
    assert ps.counter.messages["up", "Probe"] == 1 + 3 + 4 * 2  # the first, the warmup, the probes
    assert ps.counter.bytes["up", "Probe"] >= sum(2 * m["wire_bytes"] for m in rows)
    assert costfit.predict(fit, 400_000) > costfit.predict(fit, 64) > 0
    assert png.stat().st_size > 10_000
    assert "affine:" in r.output and "packet:" in r.output


def test_fit_cost_says_what_is_wrong(servers: Callable[..., Any], tmp_path: Path) -> None:
    _, port = servers(max_dim=1000)  # a server that takes messages of 16 * 1000 + 1 MiB bytes
    out = str(tmp_path / "fit.json")
    r = CliRunner().invoke(main, ["fit-cost", "--server", f"127.0.0.1:{port}", "--out", out, "--sizes", "5000000"])
    assert r.exit_code == 2 and "above the server's message limit" in r.output
    r = CliRunner().invoke(main, ["fit-cost", "--server", "localhost", "--out", out])
    assert r.exit_code == 2 and "not HOST:PORT" in r.output
    r = CliRunner().invoke(main, ["fit-cost", "--server", f"127.0.0.1:{port}", "--out", out, "--sizes", "100"])
    assert r.exit_code == 1 and "cannot fit" in r.output and "2 different sizes" in r.output


# ---------------------------------------------------------------------------------- shaped link (root)
def _netns_works() -> str | None:
    if os.geteuid() != 0:
        return "needs root (creates network namespaces)"
    probe = f"psrv-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None if made.returncode == 0 else f"`ip netns add` fails here: {made.stderr.strip()}"


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.skipif(_netns_works() is not None, reason=_netns_works() or "")
def test_fit_on_a_shaped_10mbit_link_predicts_other_sizes(tmp_path: Path) -> None:
    """Fit on a tbf 10 Mbit/s link between two namespaces; the fit predicts the measured time of
    held-out sizes of 10 packets and more within 10% (below, a call's ~1 ms of overhead and the
    packet steps dominate; docs/results.md has the figures)."""
    spec = importlib.util.spec_from_file_location("fit_cost_link", ROOT / "scripts" / "fit_cost_link.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    check = script.fit_and_check(10_000_000, tmp_path, max_bytes=1_000_000, repeat=5, timeout=120.0)
    assert check["fit"]["c1"] > 0
    big = [r for r in check["holdout"]["best"] if r["wire_bytes"] >= 10 * costfit.TCP_MSS]
    assert len(big) >= 3
    assert all(abs(r["rel_error"]) < 0.10 for r in big), big
    slope = check["fits"]["affine"]["c1"]  # about 8 bits per byte at 10 Mbit/s, plus headers
    assert 0.75e-6 < slope < 0.95e-6
