"""DSGD over the network (psrv.mesh coordinator, worker.gossip workers in threads, loopback gRPC):
the networked rounds are the math of psrv.decentralized, the coordinator carries no model during
training, and every link's counter shows exactly its neighbour traffic."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from click.testing import CliRunner

from psrv import data, decentralized, meshrpc
from psrv.cli import main
from psrv.engine import ServerConfig
from psrv.mesh import MeshCoordinator, create_mesh_server
from psrv.tasks import make_task
from psrv.v1 import mesh_pb2 as mpb
from worker.client import WorkerConfig
from worker.gossip import run_gossip_worker

SEED = 3


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    train, _ = data.load_split("digits", 0.2, SEED)
    return train


def run_mesh(
    train: data.Dataset, n: int, topology: str, rounds: int, lr: float = 0.05, split: str = "noniid", **config: Any
) -> tuple[dict[str, Any], MeshCoordinator, list[Any], list[data.Dataset]]:
    shards = [data.shard(train, i, n, split, SEED) for i in range(n)]
    cfg = ServerConfig(
        algorithm="dsgd",
        options={"lr": lr, "topology": float(decentralized.TOPOLOGIES.index(topology))},
        num_workers=n,
        rounds=rounds,
        seed=SEED,
        task_shape=(train.n_features, train.n_classes),
        round_timeout=60.0,
        **config,
    )
    coord = MeshCoordinator(cfg)
    server, port = create_mesh_server(coord)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def work(i: int) -> None:
        wc = WorkerConfig(server=f"127.0.0.1:{port}", worker_id=f"w{i}", shard=i, num_shards=n, seed=SEED)
        try:
            results[i] = run_gossip_worker(wc, "127.0.0.1:0", shards[i])
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            errors.append(exc)
            coord.fail(str(exc))

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    try:
        for t in threads:
            t.start()
        summary = coord.run()
    finally:
        for t in threads:
            t.join(timeout=60)
        server.stop(grace=None)
    assert not errors, errors
    return summary, coord, results, shards


def reference(train: data.Dataset, shards: list[data.Dataset], W: np.ndarray, lr: float, rounds: int) -> np.ndarray:
    """The same run in numpy: psrv.decentralized's ATC step on the task's full local gradients."""
    n = len(shards)
    task = make_task("logreg", train.n_features, train.n_classes)
    total = sum(len(s) for s in shards)
    x0 = task.init_params(np.random.default_rng(SEED)).astype(np.float64)

    def grad(i: int, x: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
        return n * task.local_loss_grad(x, shards[i].X, shards[i].y, total, n)[1]

    X, _ = decentralized.simulate(W, x0, grad, lr, rounds, np.random.default_rng(0))
    return X


@pytest.mark.parametrize("topology", ["ring", "full"])
def test_networked_rounds_are_the_math(digits: data.Dataset, topology: str) -> None:
    """With float64 on the wire the networked run is psrv.decentralized's step exactly; with the full
    topology that is parallel (full-batch) gradient descent, x - lr * sum_i grad f_i."""
    n, rounds, lr = 4, 8, 0.05
    summary, coord, results, shards = run_mesh(digits, n, topology, rounds, lr, broadcast_dtype="float64")
    X = np.stack([r.final_params for r in results])
    ref = reference(digits, shards, decentralized.mixing_matrix(topology, n), lr, rounds)
    np.testing.assert_allclose(X, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(coord.theta, ref.mean(axis=0), rtol=0, atol=1e-12)
    if topology == "full":  # parallel GD: every node holds the same model
        task = make_task("logreg", digits.n_features, digits.n_classes)
        x = task.init_params(np.random.default_rng(SEED)).astype(np.float64)
        total = sum(len(s) for s in shards)
        for _ in range(rounds):
            x = x - lr * sum(task.local_loss_grad(x, s.X, s.y, total, n)[1] for s in shards)
        np.testing.assert_allclose(X, np.repeat(x[None], n, axis=0), rtol=0, atol=1e-12)
    else:
        assert summary["consensus_distance"] > 1e-12  # non-IID shards on a ring disagree


def test_no_model_through_coordinator_and_per_link_bytes(digits: data.Dataset) -> None:
    n, rounds = 6, 25
    summary, coord, results, _ = run_mesh(digits, n, "ring", rounds, lr=1.0, split="iid")
    d = summary["dim"]
    records = coord.records
    assert len(records) == rounds
    # converges: the (sum of local) loss falls well below its start
    assert records[-1]["loss"] < 0.4 * records[0]["loss"]
    edges = {(i, j) for i, adj in enumerate(decentralized.neighbours("ring", n)) for j in adj}
    for r in records:
        # the coordinator: ~50 bytes of barrier per worker and round; all of them together carry
        # less than an eighth of ONE model (4 d bytes), where a parameter server carries 2 n models
        assert r["coordinator_bytes_up"] + r["coordinator_bytes_down"] < 4 * d / 8
        assert r["bytes_up"] == r["gossip_bytes"] + r["coordinator_bytes_up"]  # the workers' totals
        # every directed edge of the ring, and nothing else, carried one model of d float32 values
        assert {(s, t) for s, t, _ in r["links"]} == edges
        assert all(4 * d < b < 4 * d + 64 for _, _, b in r["links"])
        assert sorted(r["links"]) == sorted(r["links_received"])  # what i sent j is what j received from i
        assert r["gossip_bytes"] == sum(b for _, _, b in r["links"])
    # all the coordinator ever carried: Join, Barrier and the final models (once, after training)
    assert summary["coordinator_bytes_up"] - summary["final_bytes"] < rounds * 4 * d / 8 + 4096
    assert summary["bytes_up"] == summary["gossip_bytes"] + summary["coordinator_bytes_up"]
    assert summary["final_bytes"] >= n * 8 * d  # the final models, float64
    assert summary["gossip_bytes"] > 2 * n * rounds * 4 * d
    for r in results:  # each worker's own count: its gossip (2 neighbours, a model each per round) ...
        gossip_sent = sum(b for s, _, b in summary["link_bytes"] if s == r.index)
        gossip_received = sum(b for _, t, b in summary["link_bytes"] if t == r.index)
        assert gossip_sent == gossip_received
        assert 2 * rounds * 4 * d < gossip_sent < 2 * rounds * (4 * d + 32)  # float32 values, a small header
        # ... and its coordinator messages: Join, a Barrier a round (tens of bytes), the final model
        assert 8 * d < r.bytes_up - gossip_sent < 8 * d + 100 * rounds + 500
        assert 0 < r.bytes_down - gossip_received < 100 * rounds + 500
    assert sum(r.bytes_up for r in results) == summary["bytes_up"]
    assert sum(r.bytes_down for r in results) == summary["bytes_down"]


def test_join_refuses_strangers_and_bad_shapes(digits: data.Dataset) -> None:
    cfg = ServerConfig(algorithm="dsgd", num_workers=2, rounds=1, worker_ids=("w0", "w1"),
                       task_shape=(digits.n_features, digits.n_classes))  # fmt: skip
    coord = MeshCoordinator(cfg)
    server, port = create_mesh_server(coord)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = meshrpc.Caller(ch, meshrpc.MESH_SERVICE)
            with pytest.raises(grpc.RpcError) as err:
                call.call("Join", mpb.JoinRequest(worker_id="x", address="a:1", num_samples=1, n_features=64,
                                                  n_classes=10), timeout=5)  # fmt: skip
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as err:
                call.call("Join", mpb.JoinRequest(worker_id="w0", address="a:1", num_samples=1, n_features=3,
                                                  n_classes=10), timeout=5)  # fmt: skip
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "features" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:  # the other one never comes: the long poll ends
                call.call("Join", mpb.JoinRequest(worker_id="w0", address="a:1", num_samples=1, n_features=64,
                                                  n_classes=10), timeout=1)  # fmt: skip
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        server.stop(grace=None)


def test_missing_worker_fails_the_run_naming_it(digits: data.Dataset) -> None:
    cfg = ServerConfig(algorithm="dsgd", num_workers=2, rounds=1, register_timeout=0.5,
                       task_shape=(digits.n_features, digits.n_classes))  # fmt: skip
    with pytest.raises(RuntimeError, match="only 0 of 2 workers joined"):
        MeshCoordinator(cfg).run()


def test_coordinator_only_runs_dsgd() -> None:
    with pytest.raises(ValueError, match="not a decentralized"):
        MeshCoordinator(ServerConfig(algorithm="gd", num_workers=2))


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--algorithm", "dsgd", "-o", "topology=star"], "topology=ring|torus|exponential|full"),
        (["--algorithm", "dsgd", "-o", "topology=7"], "unknown topology 7"),
        (["--algorithm", "gd", "-o", "topology=ring"], "unknown option 'topology'"),
        (["--algorithm", "dsgd", "--compressor", "topk"], "not supported"),
    ],
)
def test_bad_dsgd_options_are_one_line(tmp_path: Path, args: list[str], said: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--data", "digits", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert said in line


@pytest.mark.slow
@pytest.mark.process
def test_psrv_run_dsgd_on_a_ring(tmp_path: Path) -> None:
    """`psrv run --algorithm dsgd -o topology=ring`: worker processes gossip on loopback; the summary
    counts the coordinator's bytes apart from every link's."""
    out = tmp_path / "out"
    args = ["run", "--algorithm", "dsgd", "-o", "topology=ring", "--lr", "1", "--data", "digits", "--workers", "3"]
    result = CliRunner().invoke(main, [*args, "--rounds", "20", "--round-timeout", "60", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["topology"] == "ring" and summary["worker_exit_codes"] == [0] * 3
    assert summary["accuracy"] > 0.8
    d = summary["dim"]
    assert {(s, t) for s, t, _ in summary["link_bytes"]} == {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)}
    assert all(b > 20 * 4 * d for _, _, b in summary["link_bytes"])  # a model per link and round
    assert summary["barrier_bytes"] < 20 * 4 * d / 8  # the coordinator: no model during training
    records = [json.loads(x) for x in (out / "dsgd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(20)) and "accuracy" in records[-1]
    assert (out / "dsgd" / "model.npy").exists()


def test_cluster_workers_gossip_on_their_namespace_address() -> None:
    from psrv.cluster.config import ClusterConfig
    from psrv.cluster.run import worker_argv
    from psrv.options import JobConfig

    dsgd = ClusterConfig(job=JobConfig(algorithm="dsgd", workers=3, options={"topology": 0.0}))
    argv = worker_argv(dsgd, 1, "10.0.0.1:50051", "10.0.0.12")
    assert argv[argv.index("--gossip-listen") + 1] == f"10.0.0.12:{dsgd.port}"
    gd = ClusterConfig(job=JobConfig(algorithm="gd", workers=3))
    assert "--gossip-listen" not in worker_argv(gd, 1, "10.0.0.1:50051", "10.0.0.12")


@pytest.mark.parametrize("name", ["mesh_pb2.py", "mesh_pb2.pyi"])
def test_generated_mesh_code_is_fresh(tmp_path: Path, name: str) -> None:
    """psrv/v1/mesh_pb2* is what the pinned grpcio-tools makes of protos/psrv/v1/mesh.proto:
    python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. protos/psrv/v1/mesh.proto"""
    from grpc_tools import protoc

    root = Path(__file__).resolve().parents[1]
    proto = root / "protos" / "psrv" / "v1" / "mesh.proto"
    assert protoc.main(["protoc", f"-I{root / 'protos'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                        str(proto)]) == 0  # fmt: skip
    assert (tmp_path / "psrv" / "v1" / name).read_text() == (root / "psrv" / "v1" / name).read_text()
