"""Virtual workers (worker.host, psrv.hostrounds): many logical workers in one process, each its own
participant on the wire, give the run that separate workers give for the same seed."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner

from psrv import runner as rn
from psrv.options import DataConfig, host_argv, host_blocks
from psrv.server import ParameterServer, ServerConfig, create_server
from tests.helpers.timeouts import PATIENT
from worker.client import WorkerConfig, load_worker_data, run_worker
from worker.host import host_configs, load_host_data, parse_shard_range, run_host

DIGITS = DataConfig(data="digits", test_fraction=0.2, seed=0)


def _serve(config: ServerConfig) -> tuple[ParameterServer, Any, int, threading.Thread, dict[str, Any]]:
    ps = ParameterServer(config)
    server, port = create_server(ps)
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(ps.run()), daemon=True)
    thread.start()
    return ps, server, port, thread, out


def _config(m: int, **kw: Any) -> ServerConfig:
    kw.setdefault("algorithm", "laq")
    return ServerConfig(
        num_workers=m, rounds=kw.pop("rounds", 4), round_timeout=kw.pop("round_timeout", 60.0), start_timeout=30.0,
        register_timeout=60.0,
        worker_ids=tuple(f"w{i}" for i in range(m)), **kw,
    )  # fmt: skip


def _run(m: int, mode: str, **kw: Any) -> dict[str, Any]:
    """One in-process run of ``m`` workers on digits: ``host`` (one host, one HostRounds stream),
    ``streams`` (one host, a Rounds stream per worker on the shared channel) or ``separate``
    (each worker as its own process would run it: its own channel, stream and data load)."""
    ps, server, port, thread, summary = _serve(_config(m, **kw))
    try:
        base = WorkerConfig(server=f"127.0.0.1:{port}", worker_id="", data="digits", seed=0)
        cfgs = host_configs(base, range(m), m, [f"w{i}" for i in range(m)])
        if mode == "separate":
            results: list[Any] = [None] * m

            def one(i: int) -> None:
                results[i] = run_worker(cfgs[i], load_worker_data(cfgs[i]))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(m)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            errors: dict[str, str] = {}
        else:
            hosted = run_host(cfgs, multiplex=mode == "host")
            results, errors = hosted.results, hosted.errors
        thread.join(120)
    finally:
        server.stop(None)
    assert not errors and summary, (errors, ps.error)
    return {
        "theta": hashlib.sha256(ps.theta.tobytes()).hexdigest(),
        "uploads": [r.uploads for r in results],
        "skips": [r.skips for r in results],
        "grad_evals": [r.grad_evals for r in results],
        "summary": summary,
        "counter": ps.counter,
        "records": list(ps.records),
    }


def test_a_host_of_logical_workers_matches_separate_workers() -> None:
    """6 workers: one HostRounds stream, a Rounds stream each on one channel, and each worker on
    its own channel -- the same model bit for bit, the same uploads and skips per worker; the
    host's stream carries each round's broadcast once, not once per worker."""
    runs = {mode: _run(6, mode, rounds=3) for mode in ("host", "streams", "separate")}
    host, streams, separate = runs["host"], runs["streams"], runs["separate"]
    for other in (streams, separate):
        assert host["theta"] == other["theta"]
        assert host["uploads"] == other["uploads"] and host["skips"] == other["skips"]
        assert host["summary"]["uploads"] == other["summary"]["uploads"]
        assert host["summary"]["last_round_loss"] == other["summary"]["last_round_loss"]
    assert sum(host["uploads"]) + sum(host["skips"]) == 6 * 3
    # every report travels per worker; the broadcasts once per host instead of 12 times
    down_host = host["counter"].total("down")
    down_streams = streams["counter"].total("down")
    assert down_host < down_streams / 3, (down_host, down_streams)
    # and a round's 6 reports go up together: the open, then one message a round (not 6)
    assert host["counter"].messages["up", "HostRounds"] == 1 + 3, dict(host["counter"].messages)
    per_worker = [[w["status"] for w in r["workers"]] for r in host["records"]]
    assert all(len(statuses) == 6 for statuses in per_worker)  # the records' per-worker lists stay per worker


def test_unsampled_logical_workers_compute_nothing() -> None:
    """local-sgd with client sampling (-o sample=3 of 10): over 4 rounds only the sampled workers'
    gradients are evaluated (3 x 4 rounds x 2 local steps); the others skip as not selected."""
    run = _run(10, "host", algorithm="local-sgd", options={"sample": 3.0, "local_steps": 2.0, "lr": 0.1})
    assert sum(run["grad_evals"]) == 3 * 4 * 2
    assert sum(run["uploads"]) == 3 * 4 and sum(run["skips"]) == 7 * 4
    statuses = [w["status"] for r in run["records"] for w in r["workers"]]
    assert statuses.count("not_selected") == 7 * 4


@pytest.mark.slow
def test_200_logical_workers_match_200_separate_workers() -> None:
    """200 workers (digits, 3 rounds): one host vs 200 workers each on its own channel, stream and
    data load, in threads of this process -- not 200 processes (one is ~300 MB and seconds of
    torch start-up: 60 GB here; the process test below compares real processes at M = 6)."""
    host, separate = _run(200, "host", rounds=3), _run(200, "separate", rounds=3)
    assert host["theta"] == separate["theta"] and host["uploads"] == separate["uploads"]
    assert host["skips"] == separate["skips"]


@pytest.mark.slow
@pytest.mark.process
def test_virtual_worker_processes_match_one_process_per_worker(tmp_path: Path) -> None:
    """``run_local`` with 6 worker processes and with 2 processes of 3 virtual workers: the same
    model, loss and per-worker statuses. 6 processes: what fits about a minute on 2 shared cores
    (each is ~300 MB and imports torch and loads the data; 200 would need ~60 GB)."""
    cfg = replace(rn.owned_config(_config(6, rounds=4), 64, 10), **PATIENT)
    separate = rn.run_local(cfg, DIGITS, tmp_path / "separate", eval_every=0)
    hosted = rn.run_local(cfg, DIGITS, tmp_path / "hosted", eval_every=0, processes=2)
    assert separate["worker_exit_codes"] == [0] * 6 and hosted["worker_exit_codes"] == [0, 0]
    assert np.array_equal(np.load(tmp_path / "separate/model.npy"), np.load(tmp_path / "hosted/model.npy"))
    assert separate["final_loss"] == hosted["final_loss"] and separate["uploads"] == hosted["uploads"]

    def statuses(folder: str) -> list[list[str]]:
        lines = (tmp_path / folder / "metrics.jsonl").read_text().splitlines()
        return [[w["status"] for w in json.loads(x)["workers"]] for x in lines]

    assert statuses("separate") == statuses("hosted")
    assert sorted(p.name for p in (tmp_path / "hosted").glob("worker*.log")) == ["workers0-2.log", "workers3-5.log"]


@pytest.mark.slow
@pytest.mark.process
def test_psrv_run_with_1000_workers(tmp_path: Path) -> None:
    """The default task (logreg on mnist) with ``--workers 1000`` on this machine: 2 rounds complete,
    every worker registered and reported in each round."""
    from psrv.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["run", "--algorithm", "laq", "--workers", "1000", "--rounds", "2", "--out", str(out)],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1000 worker(s) in" in result.output
    records = [json.loads(x) for x in (out / "laq" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["workers"]) == 1000 for r in records)
    assert all(w["status"] in ("upload", "lazy_rule") for r in records for w in r["workers"])


# ------------------------------------------------------------------ plans and options, no server
def test_host_blocks_and_argv() -> None:
    assert host_blocks(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert host_blocks(3, None) == [range(0, 1), range(1, 2), range(2, 3)]
    assert host_blocks(2, 5) == [range(0, 1), range(1, 2)]
    argv = host_argv("127.0.0.1:1", range(4, 7), 10, DIGITS)
    assert argv[argv.index("--shard") + 1] == "4-6/10" and "--worker-id" not in argv
    one = host_argv("127.0.0.1:1", range(4, 5), 10, DIGITS)
    assert one[one.index("--shard") + 1] == "4/10" and one[one.index("--worker-id") + 1] == "w4"


def test_parse_shard_range() -> None:
    assert parse_shard_range("3/8") == (range(3, 4), 8)
    assert parse_shard_range("0-99/1000") == (range(0, 100), 1000)
    for bad in ("5/5", "3-2/8", "0-8/8", "x/2", "1-2"):
        with pytest.raises(ValueError, match="A-B/M"):
            parse_shard_range(bad)


def test_host_configs_fill_each_workers_credentials() -> None:
    from psrv.tls import ClientSecurity

    base = WorkerConfig(server="127.0.0.1:1", worker_id="", security=ClientSecurity(ca="ca.crt",
                        cert="pki/{id}.crt", key="pki/{id}.key", token_file="pki/{id}.token"))  # fmt: skip
    a, b = host_configs(base, range(2, 4), 10, ["w2", "w3"])
    assert (a.worker_id, a.shard, a.num_shards, a.security.cert, a.security.token_file) == (
        "w2", 2, 10, "pki/w2.crt", "pki/w2.token")  # fmt: skip
    assert b.security.key == "pki/w3.key" and b.security.ca == "ca.crt"


def test_host_data_is_the_separate_workers_shards() -> None:
    base = WorkerConfig(server="127.0.0.1:1", worker_id="", data="digits", seed=3, split="noniid")
    cfgs = host_configs(base, range(0, 3), 3, [f"w{i}" for i in range(3)])
    for cfg, ds in zip(cfgs, load_host_data(cfgs), strict=True):
        alone = load_worker_data(cfg)
        assert np.array_equal(ds.X, alone.X) and np.array_equal(ds.y, alone.y)


def test_capacity_counts_hosts_not_workers() -> None:
    per_process = rn.worker_memory(200 * 2**20, 7850)
    with pytest.raises(rn.CapacityError, match="--workers 1000 would need"):
        rn.check_capacity(1000, 48000, per_process, 24 * 2**30)  # 1000 processes: refused
    per_host = rn.host_memory(200 * 2**20, 7850, 500)
    assert per_host < 3 * 2**30
    rn.check_capacity(1000, 48000, per_process, 24 * 2**30, processes=2, per_host=per_host)  # 2 hosts fit
    with pytest.raises(rn.CapacityError, match="in 2 processes"):
        rn.check_capacity(1000, 48000, per_process, 2**30, processes=2, per_host=per_host)
    assert rn.default_processes(1000, cores=2) == 1 and rn.default_processes(3, cores=8) == 3
    assert rn.default_processes(2, cores=2) == 2 and rn.default_processes(100, cores=16) == 15


def test_start_worker_host_options_are_checked() -> None:
    from psrv.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["start-worker", "--server", "127.0.0.1:1", "--shard", "0-3/2"])
    assert r.exit_code == 2 and "A-B/M" in r.output
    r = runner.invoke(main, ["start-worker", "--server", "127.0.0.1:1", "--shard", "0-3/8", "--worker-id", "a,b"])
    assert r.exit_code == 2 and "4 distinct ids" in r.output
    r = runner.invoke(main, ["start-worker", "--server", "127.0.0.1:1", "--shard", "1/8"])
    assert r.exit_code == 2 and "--worker-id" in r.output
    assert isinstance(main, click.Group)


def test_a_host_over_mutual_tls_gives_each_worker_its_credentials(tmp_path: Path) -> None:
    """With per-worker certificates and tokens (``{id}`` in the paths) each logical worker runs on
    its own channel and Rounds stream and is authorized as itself; HostRounds, one caller's
    credentials for several workers, is refused by a server that checks credentials."""
    import grpc

    from psrv import rpc
    from psrv.certs import make_test_pki
    from psrv.tls import ClientSecurity
    from psrv.v1 import psrv_pb2 as pb

    ids = ["w0", "w1", "w2"]
    pki = make_test_pki(tmp_path / "pki", ids)
    ps = ParameterServer(_config(3, rounds=3))
    server, port = create_server(ps, security=pki.server_security())
    summary: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: summary.update(ps.run()), daemon=True)
    thread.start()
    try:
        security = ClientSecurity(ca=str(pki.ca), cert=str(pki.worker_cert("{id}")), key=str(pki.worker_key("{id}")),
                                  token_file=str(pki.worker_token("{id}")))  # fmt: skip
        with pki.client_security("w0").channel(f"127.0.0.1:{port}") as channel:
            call = rpc.CountingStub(channel).HostRounds(iter([pb.HostRoundsRequest(open=pb.HostRoundsOpen(
                workers=[pb.RoundsOpen(worker_id="w0")])).SerializeToString()]))  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                next(iter(call))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "Rounds stream" in err.value.details()
        base = WorkerConfig(server=f"127.0.0.1:{port}", worker_id="", data="digits", security=security)
        out = run_host(host_configs(base, range(3), 3, ids))
        thread.join(60)
    finally:
        server.stop(None)
    assert not out.errors and summary["rounds"] == 3
    assert [r.rounds for r in out.results] == [3, 3, 3]


def test_host_rounds_refuses_malformed_streams() -> None:
    """HostRounds: the first message must be `open`; unknown or repeated workers are refused."""
    import grpc

    from psrv import rpc
    from psrv.v1 import psrv_pb2 as pb

    ps = ParameterServer(_config(2, rounds=1))
    server, port = create_server(ps)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rpc.CountingStub(channel)

            def status(*msgs: Any) -> tuple[grpc.StatusCode, str]:
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.HostRounds(iter([m.SerializeToString() for m in msgs])))
                return err.value.code(), err.value.details()

            report = pb.HostRoundsRequest(report=pb.HostRoundsReport(worker_id="w0"))
            code, why = status(report)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "must be `open`" in why
            twice = pb.HostRoundsOpen(workers=[pb.RoundsOpen(worker_id="w0"), pb.RoundsOpen(worker_id="w0")])
            code, why = status(pb.HostRoundsRequest(open=twice))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "twice" in why
            code, _ = status(pb.HostRoundsRequest(open=pb.HostRoundsOpen(workers=[pb.RoundsOpen(worker_id="w0")])))
            assert code == grpc.StatusCode.NOT_FOUND  # not registered
    finally:
        server.stop(None)


def _hosted(m: int, per_worker: dict[int, dict[str, Any]], **kw: Any) -> tuple[ParameterServer, Any, dict]:
    """One host of ``m`` logical workers on digits against an in-process server; ``per_worker``:
    worker index -> WorkerConfig fields (fault injection)."""
    ps, server, port, thread, summary = _serve(_config(m, **kw))
    try:
        base = WorkerConfig(server=f"127.0.0.1:{port}", worker_id="", data="digits", seed=0, rpc_timeout=20)
        cfgs = host_configs(base, range(m), m, [f"w{i}" for i in range(m)])
        for i, extra in per_worker.items():
            cfgs[i] = replace(cfgs[i], **extra)
        out = run_host(cfgs)
        thread.join(120)
    finally:
        server.stop(None)
    return ps, out, summary


def test_a_hosted_workers_corrupted_replica_is_detected_and_healed() -> None:
    """A logical worker whose replica is corrupted (one bit) finds the mismatch in the next
    broadcast's digest, gets a snapshot through the host's lane and stream, and every worker
    ends on the server's model bit for bit. The host's workers share one replica: each of the 25
    rounds' closes is replayed once for all three, plus once by the corrupted worker on its own
    copy (the others' replica is not touched by the fault)."""
    ps, out, summary = _hosted(3, {1: {"corrupt_replica_at": 12}}, rounds=25, downlink="replica")
    assert not out.errors and summary["rounds"] == 25
    assert [(r.digest_mismatches, r.snapshots) for r in out.results] == [(0, 1), (1, 2), (0, 1)]
    assert all(r.final_params.tobytes() == ps.theta.tobytes() for r in out.results)
    assert out.replicas_made == 25 + 1


def test_a_hosted_worker_that_leaves_does_not_stop_the_others() -> None:
    """LAQ, w1 leaves after 3 rounds: it leaves the host's stream (`leave`), the server stops
    waiting for it, and the others go on on the same stream -- no reconnect (for LAQ a reconnect
    would fail: an accumulating rule's worker rejoins only where the server keeps its row of the
    sum) -- to the end of the run, on the server's final model bit for bit."""
    ps, out, summary = _hosted(3, {1: {"leave_after": 3}}, rounds=10, round_timeout=30.0, downlink="replica")
    assert not out.errors, out.errors
    gone, stayed = out.results[1], [out.results[0], out.results[2]]
    assert gone.rounds == 3 and gone.final_params is None
    assert summary["rounds"] == 10
    for r in stayed:
        assert r.final_params.tobytes() == ps.theta.tobytes() and r.reconnects == 0 and r.rounds == 10
    # not waited for: the server took its leave at once (as a closed stream), not after deadlines
    assert ps.engine.state.workers["w1"].gone == "it left its host's HostRounds stream"
    assert [w["status"] for w in ps.records[-1]["workers"]][1] == "deadline"  # its missing reports


def test_host_rounds_refuses_reports_and_leaves_it_cannot_take() -> None:
    """A hand-made HostRounds client: a `reports` message naming a worker that owes no report, or a
    worker's second `leave`, ends the stream INVALID_ARGUMENT with one line naming the worker;
    nothing of the run is lost (the server goes on serving a well-behaved stream afterwards)."""
    import grpc

    from psrv import rpc
    from psrv.v1 import psrv_pb2 as pb

    ps = ParameterServer(_config(2, rounds=2, algorithm="gd", quorum_wait=0.5))
    server, port = create_server(ps)
    failure: list[str] = []

    def run() -> None:
        try:
            ps.run()
        except RuntimeError as exc:
            failure.append(str(exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rpc.CountingStub(channel)
            for w in ("w0", "w1"):
                stub.Register(pb.RegisterRequest(worker_id=w, num_samples=10, n_features=4, n_classes=3), timeout=10)
            opened = pb.HostRoundsRequest(open=pb.HostRoundsOpen(workers=[pb.RoundsOpen(worker_id="w0"),
                                                                          pb.RoundsOpen(worker_id="w1")]))  # fmt: skip
            stranger = pb.HostRoundsReport(worker_id="w9", report=pb.RoundsRequest(skip=pb.RoundsSkip()))
            leave = pb.HostRoundsRequest(leave=pb.HostRoundsLeave(worker_id="w1"))
            bad = {
                "reports": pb.HostRoundsRequest(reports=pb.HostRoundsReports(reports=[stranger])),
                "leave twice": leave,
            }
            for name, msg in bad.items():
                msgs = [opened, msg] if name == "reports" else [opened, leave, msg]
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.HostRounds(iter([m.SerializeToString() for m in msgs])))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                assert ("'w9'" if name == "reports" else "'w1'") in err.value.details(), err.value.details()
        thread.join(30)
        assert not thread.is_alive() and len(failure) == 1
        assert "below --min-workers" in failure[0] and "w0" in failure[0] and "w1" in failure[0], failure
    finally:
        server.stop(None)
