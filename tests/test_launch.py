"""psrv.launch: the launcher of ``psrv run``'s worker processes (local subprocesses, or Ray actors).

The Ray tests share one local single-node Ray cluster (module scope: starting Ray takes ~10 s) and
skip without Ray (``pip install 'psrv[ray]'``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from psrv.cli import main
from psrv.launch import LauncherError, LocalLauncher, import_ray
from psrv.runner import DataConfig, RunFailed, run_local
from psrv.server import ServerConfig
from tests.helpers.timeouts import PATIENT

DIGITS = DataConfig(data="digits", test_fraction=0.2, seed=3)
#: what must be the same whoever launched the workers (wall times, addresses, logs differ)
SAME = ("rounds", "uploads", "skips", "payload_bits", "upload_bytes", "final_loss", "accuracy", "worker_exit_codes")


def _config(workers: int = 3, rounds: int = 20) -> ServerConfig:
    return ServerConfig(algorithm="laq", options={"lr": 0.05}, num_workers=workers, rounds=rounds, seed=3, **PATIENT)


def _per_worker(out: Path) -> list[list]:
    """Each round's per-worker statuses (who uploaded, who skipped) from a run's metrics."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [[(w["id"], w["status"], w["bits"]) for w in r.get("workers", [])] for r in records]


# ------------------------------------------------------------------------------- without Ray
def test_launcher_ray_without_ray_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(LauncherError, match=r"pip install 'psrv\[ray\]'"):
        import_ray()
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--launcher", "ray", "--rounds", "2", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "--launcher ray needs Ray, which is not installed; pip install 'psrv[ray]'" in result.output
    assert "Traceback" not in result.output and not out.exists()  # refused before anything was made


def test_ray_options_need_launcher_ray(tmp_path: Path) -> None:
    for extra in (["--ray-address", "10.0.0.1:6379"], ["--ray-cpus-per-worker", "0.5"]):
        result = CliRunner().invoke(main, ["run", "--rounds", "2", "--out", str(tmp_path / "o"), *extra])
        assert result.exit_code == 2 and f"{extra[0]} is for --launcher ray" in result.output


def test_files_on_the_command_line_are_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray node gets the files a worker's command names (certificates, tokens), not flags, not
    the interpreter, not a name that is no file here, not one past the size limit."""
    import psrv.launch as launch

    (tmp_path / "w0.token").write_text("secret")
    (tmp_path / "big.csv").write_bytes(b"x" * 100)
    monkeypatch.setattr(launch, "SHIP_LIMIT", 99)
    argv = [sys.executable, "-m", "psrv", "start-worker", "--token-file", str(tmp_path / "w0.token"), "--data"]
    argv += [str(tmp_path / "big.csv"), "--worker-id", "w0", "--tls-ca", str(tmp_path / "missing.crt")]
    assert launch._shipped_files(argv) == {5: ("w0.token", b"secret")}


# ------------------------------------------------------------------------------- on a local Ray cluster
RAY_START_TRIES = 3


def _kill_descendants() -> None:
    """SIGKILL every process below this one (Linux ``/proc``; nothing elsewhere)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    below, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - below
        below |= frontier
    for pid in below:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_cluster() -> str:
    """A local single-node Ray cluster for the module; its GCS address (for ``--ray-address``).

    Ray gives its raylet a fixed 30 s to register with the GCS (``ray/_private/node.py``); on a
    2-core CI machine that runs the rest of the suite beside this module that once ran out, for
    every test here. The cluster is Ray's, not psrv's: it gets three tries, and if none starts the
    module skips, saying why, rather than failing on a machine that could not start Ray at all."""
    ray = pytest.importorskip("ray")
    errors = []
    for _ in range(RAY_START_TRIES):
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            break
        except Exception as exc:  # "The current node timed out during startup", ...
            errors.append(f"{type(exc).__name__}: {exc}")
            ray.shutdown()
            _kill_descendants()  # the GCS and raylet the failed start left behind, which shutdown does not know
    else:
        pytest.skip(f"Ray could not start a local cluster in {RAY_START_TRIES} tries: {errors[-1]}")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.process
def test_ray_run_gives_the_local_summary(ray_cluster: str, tmp_path: Path) -> None:
    """The same job, workers as local subprocesses and as Ray actors (``psrv run --launcher ray
    --ray-address``, through the command line): the same rounds, uploads, bits, loss and per-worker
    decisions; the worker logs come back."""
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "psrv", "run", "--algorithm", "laq", "--lr", "0.05", "--workers", "2"]
    cmd += ["--rounds", "20", "--seed", "3", "--data", "digits", "--test-fraction", "0.2", "--out", str(out)]
    cmd += ["--register-timeout", "900", "--round-timeout", "120", "--launcher", "ray", "--ray-address", ray_cluster]
    # the two runs side by side (their own servers and ports): the test waits for the slower, not both
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as remote_run:
        try:
            local = run_local(_config(workers=2), DIGITS, tmp_path / "local")
            _, stderr = remote_run.communicate(timeout=600)
        finally:
            remote_run.kill()
    assert remote_run.returncode == 0, stderr[-2000:]
    remote = json.loads((out / "summary.json").read_text())
    assert remote["status"] == "done" and remote["rounds"] == 20
    assert {k: remote[k] for k in SAME} == {k: local[k] for k in SAME}
    assert 0 < remote["uploads"] < 40  # LAQ skipped some uploads: the comparison is not trivial
    assert _per_worker(out / "laq") == _per_worker(tmp_path / "local")
    for i in range(2):
        assert '"rounds": 20' in (out / "laq" / f"worker{i}.log").read_text()  # the worker's own last line


@pytest.mark.slow
@pytest.mark.process
def test_ray_worker_that_dies_fails_the_run_in_one_line(ray_cluster: str, tmp_path: Path) -> None:
    """A worker process that exits before registration (a bad option) under a Ray actor: the run
    fails at once naming the worker, its code and its last log line, and the actors' CPUs are free."""
    import ray

    from psrv.launch import RayLauncher

    with pytest.raises(RunFailed) as failed, RayLauncher() as launcher:
        run_local(_config(workers=2, rounds=3), DIGITS, tmp_path / "bad", worker_extra={1: ("--bogus",)},
                  launcher=launcher)  # fmt: skip
    reason = str(failed.value)
    assert "worker w1 exited with code 2 before registration completed" in reason, reason
    assert "No such option '--bogus'" in reason and "\n" not in reason
    assert "No such option '--bogus'" in (tmp_path / "bad" / "worker1.log").read_text()
    assert ray.is_initialized()  # the launcher did not shut down the cluster it did not start
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 4  # every actor was ended


def test_local_launcher_starts_each_command_with_its_log(tmp_path: Path) -> None:
    argvs = [[sys.executable, "-c", f"print('hello {i}'); raise SystemExit({i})"] for i in range(2)]
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    workers = LocalLauncher().start(argvs, logs)
    try:
        assert [p.wait(timeout=60) for p in workers.procs] == [0, 1]
    finally:
        workers.close()
    assert [f.read_text() for f in logs] == ["hello 0\n", "hello 1\n"]


@pytest.mark.slow
@pytest.mark.process
def test_ctrl_c_ends_the_ray_workers(ray_cluster: str, tmp_path: Path) -> None:
    """Ctrl-C during a Ray-launched run: RunInterrupted with the rounds done, and every actor (so
    every worker process) is gone, its CPUs back to the cluster."""
    import _thread

    import ray

    from psrv.launch import RayLauncher
    from psrv.runner import RunInterrupted

    def on_round(record: dict) -> None:
        if record["round"] == 1:
            _thread.interrupt_main()  # as a terminal's Ctrl-C does

    with pytest.raises(RunInterrupted) as stopped, RayLauncher() as launcher:
        run_local(_config(workers=1, rounds=500), DIGITS, tmp_path / "run", on_round=on_round, launcher=launcher)
    assert stopped.value.summary["status"] == "interrupted" and 2 <= stopped.value.summary["rounds"] < 500
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 4
    assert (tmp_path / "run" / "worker0.log").exists()


@pytest.mark.slow
@pytest.mark.process
def test_ray_refuses_more_cpus_than_the_cluster_has(ray_cluster: str) -> None:
    from psrv.launch import RayLauncher

    with RayLauncher(cpus=2.0) as launcher, pytest.raises(LauncherError) as refused:
        launcher.connect(3)
    assert "need 6 CPUs but the Ray cluster has 4; pass --ray-cpus-per-worker 1.3" in str(refused.value)


@pytest.mark.slow
@pytest.mark.process
def test_ray_asks_resources_per_worker_process_not_per_logical_worker(ray_cluster: str, tmp_path: Path) -> None:
    """Three virtual workers in one process at 4 CPUs a process fit the 4-CPU cluster (one actor);
    counting 4 CPUs per logical worker (12) would refuse the run."""
    from psrv.launch import RayLauncher

    with RayLauncher(cpus=4.0) as launcher:
        summary = run_local(_config(workers=3, rounds=3), DIGITS, tmp_path / "host", launcher=launcher, processes=1)
    assert summary["status"] == "done" and summary["rounds"] == 3
    assert (tmp_path / "host" / "workers0-2.log").exists()  # one process hosted all three
