"""How ``psrv run`` starts its worker processes: a :class:`Launcher` takes the ``psrv start-worker``
command lines of a job (one per worker process, :func:`psrv.options.worker_argv`) and their log
files, starts them, and gives back one handle per process with the interface of
:class:`subprocess.Popen` that the runner uses: ``poll()``, ``wait(timeout)`` (raising
:class:`subprocess.TimeoutExpired`) and ``kill()``. So the runner watches, waits for and stops the
workers the same way whoever placed them.

- :class:`LocalLauncher` (the default): subprocesses of this process on this machine, each in its
  own process group, dying with it (:mod:`psrv.lifeline`).
- :class:`RayLauncher` (``psrv run --launcher ray``): each worker process runs under a Ray actor
  (Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI 2018) that
  holds the CPUs (and GPUs) it asked for, on an existing Ray cluster or on one started for the run.
  The actor runs the very same ``start-worker`` command as a child process and sends its exit code
  and log back; files named on the command line (TLS certificates, tokens) are copied to the node.

Ray is an optional extra (``pip install 'psrv[ray]'``), imported only when the Ray launcher starts.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from psrv import lifeline

#: the launchers ``psrv run --launcher`` knows
LAUNCHERS = ("local", "ray")
#: a file named on a worker's command line is copied to its Ray node up to this size (else passed as is)
SHIP_LIMIT = 64 * 2**20


class LauncherError(RuntimeError):
    """A launcher that cannot start (one line, naming the extra or flag to change)."""


class WorkerHandle(Protocol):
    """One started worker process, as :class:`subprocess.Popen` has it."""

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class Workers:
    """The worker processes of one job: ``procs`` (one handle per command line, in order) and what
    :meth:`close` releases once they are gone (log files, actors)."""

    def __init__(self, procs: Sequence[WorkerHandle], closers: Sequence[Any] = ()) -> None:
        self.procs = list(procs)
        self._closers = list(closers)

    def close(self) -> None:
        for c in self._closers:
            with contextlib.suppress(Exception):
                c()


class Launcher:
    """Where the server listens and how the worker processes of each job start. Used as a context
    manager around the jobs of one ``psrv run`` (a Ray launcher connects once, then disconnects)."""

    name = "local"

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release what :meth:`connect` took (a no-op locally)."""

    def connect(self, processes: int) -> None:
        """Be ready to start ``processes`` worker processes, each hosting one or more workers (a Ray
        launcher connects or starts its cluster, and checks it has their resources)."""

    @property
    def bind_host(self) -> str:
        """The host the run's server binds (its port is any free one)."""
        return "127.0.0.1"

    @property
    def advertise_host(self) -> str:
        """The host the workers dial: the server's address as they reach it."""
        return "127.0.0.1"

    def address(self, port: int) -> str:
        """The ``--server`` of the workers for a server on ``port``."""
        return f"{self.advertise_host}:{port}"

    def start(self, argvs: Sequence[Sequence[str]], logs: Sequence[Path]) -> Workers:
        raise NotImplementedError


class LocalLauncher(Launcher):
    """Worker subprocesses on this machine (what ``psrv run`` always did): each in its own process
    group -- a terminal's Ctrl-C reaches this process, which stops them --, output to its log, and
    dying with this process (:mod:`psrv.lifeline`)."""

    def start(self, argvs: Sequence[Sequence[str]], logs: Sequence[Path]) -> Workers:
        env = lifeline.child_env()
        procs: list[subprocess.Popen] = []
        files: list[Any] = []
        try:
            for argv, path in zip(argvs, logs, strict=True):
                log_file = open(path, "w")
                files.append(log_file)
                procs.append(
                    subprocess.Popen(
                        list(argv),
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env=env,
                        process_group=0,
                    )
                )
        except BaseException:
            for p in procs:
                with contextlib.suppress(OSError):
                    p.kill()
                    p.wait(timeout=10)
            for f in files:
                f.close()
            raise
        return Workers(procs, [f.close for f in files])


# ---------------------------------------------------------------------------------- Ray
def import_ray() -> Any:
    """The ``ray`` module, or :class:`LauncherError` naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise LauncherError(
            "--launcher ray needs Ray, which is not installed; pip install 'psrv[ray]' (or pass --launcher local)"
        ) from None
    return ray


class _WorkerProcess:
    """The Ray actor under one worker process: it starts the ``start-worker`` command as its child
    (dying with the actor, :mod:`psrv.lifeline`), with the files the command names written to a
    folder of its own. Threaded, so :meth:`kill` reaches it while :meth:`run` waits.
    Standard library only (it runs on any node of the cluster)."""

    def __init__(self, argv: list[str], files: dict[int, tuple[str, bytes]], env: dict[str, str]) -> None:
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="psrv-worker-")
        argv = list(argv)
        argv[0] = sys.executable  # this node's Python (the caller's path may not exist here)
        for i, (name, data) in files.items():
            path = os.path.join(self.dir, f"{i}-{name}")
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
            argv[i] = path
        self.log_path = os.path.join(self.dir, "worker.log")
        child_env = {**os.environ, **env, lifeline.PARENT_ENV: str(os.getpid())}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env
            )

    def run(self) -> tuple[int, bytes]:
        """Wait for the process; its exit code and log."""
        code = self.proc.wait()
        with open(self.log_path, "rb") as f:
            data = f.read()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        return code, data

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()


class RayWorker:
    """A worker process under a Ray actor, as a :class:`subprocess.Popen` handle: its exit code and
    log (written to ``log`` here) arrive when it ends. An actor that dies (its node lost) counts as
    exit code -1, its log then says why."""

    def __init__(self, ray: Any, actor: Any, log: Path) -> None:
        self.ray, self.actor, self.log = ray, actor, log
        self.ref = actor.run.remote()
        self.returncode: int | None = None

    def _collect(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        ready, _ = self.ray.wait([self.ref], timeout=timeout)
        if not ready:
            return None
        try:
            code, data = self.ray.get(self.ref)
        except Exception as exc:  # RayActorError, a lost node, ...
            code, data = -1, f"psrv: the Ray actor of this worker died: {exc}\n".encode()
        Path(self.log).write_bytes(data)  # before the code is seen: a watcher reads the log at once
        self.returncode = int(code)
        return self.returncode

    def poll(self) -> int | None:
        return self._collect(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._collect(timeout)
        if code is None:
            raise subprocess.TimeoutExpired("psrv start-worker (Ray actor)", timeout or 0)
        return code

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(Exception):
                self.actor.kill.remote()

    def release(self) -> None:
        """End the actor (its worker process dies with it); its CPUs go back to the cluster."""
        with contextlib.suppress(Exception):
            self.ray.kill(self.actor)


class RayLauncher(Launcher):
    """Worker processes under Ray actors, each holding ``cpus`` CPUs and ``gpus`` GPUs of the cluster
    (``gpus`` None: with ``device`` cuda, the cluster's GPUs shared evenly, at most one each),
    spread over its nodes. ``address`` None: a Ray of this process if one is running, else a local
    cluster started for the run with CPUs for every worker (oversubscribed as the local launcher
    would), shut down after. On a cluster of several nodes the server binds every interface and the
    workers dial this node's IP (:func:`ray.util.get_node_ip_address`); on one node, loopback."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus: float = 1.0, gpus: float | None = None, device: str = "cpu"):
        self.ray = import_ray()
        self.address_, self.cpus, self.gpus, self.device = address, cpus, gpus, device
        self._owned = False
        self._connected = False
        self._multi_node = False
        self._node_ip = "127.0.0.1"

    def connect(self, processes: int) -> None:
        ray = self.ray
        if not self._connected:
            if not ray.is_initialized():
                kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
                if self.address_ is None:
                    kw["num_cpus"] = max(os.cpu_count() or 1, math.ceil(processes * self.cpus))
                try:
                    ray.init(address=self.address_, **kw)
                except Exception as exc:  # ConnectionError, a bad address, ...
                    where = self.address_ or "a local Ray cluster"
                    raise LauncherError(f"--launcher ray: cannot connect to {where}: {_one_line(exc)}") from None
                self._owned = True
            self._connected = True
            alive = [n for n in ray.nodes() if n.get("Alive")]
            self._multi_node = len(alive) > 1
            self._node_ip = ray.util.get_node_ip_address() if self._multi_node else "127.0.0.1"
        total = ray.cluster_resources()
        if self.gpus is None:
            have = float(total.get("GPU", 0))
            if self.device == "cuda" and have <= 0:
                raise LauncherError("--device cuda: the Ray cluster has no GPU (pass --device cpu or auto)")
            self.gpus = min(1.0, have / processes) if self.device == "cuda" else 0.0
        need_cpu = processes * self.cpus
        if need_cpu > float(total.get("CPU", 0)) + 1e-9:
            fit = float(total.get("CPU", 0)) / processes
            raise LauncherError(
                f"{processes} worker process(es) at --ray-cpus-per-worker {self.cpus:g} need {need_cpu:g} CPUs but "
                f"the Ray cluster has {float(total.get('CPU', 0)):g}; pass --ray-cpus-per-worker {fit:.2g} or fewer "
                "processes (--processes)"
            )
        if processes * self.gpus > float(total.get("GPU", 0)) + 1e-9:
            raise LauncherError(
                f"{processes} worker process(es) at --ray-gpus-per-worker {self.gpus:g} need "
                f"{processes * self.gpus:g} GPUs but "
                f"the Ray cluster has {float(total.get('GPU', 0)):g}"
            )

    def close(self) -> None:
        if self._owned:
            with contextlib.suppress(Exception):
                self.ray.shutdown()
        self._owned = self._connected = False

    @property
    def bind_host(self) -> str:
        return "0.0.0.0" if self._multi_node else "127.0.0.1"

    @property
    def advertise_host(self) -> str:
        return self._node_ip

    def start(self, argvs: Sequence[Sequence[str]], logs: Sequence[Path]) -> Workers:
        ray = self.ray
        self.connect(len(argvs))
        actor_cls = ray.remote(max_concurrency=2)(_WorkerProcess)
        # from a checkout: the actors (which import this module) and their workers import the same code
        root = _checkout_root()
        runtime_env = {"env_vars": {"PYTHONPATH": root}} if root else None
        env: dict[str, str] = {}
        procs: list[RayWorker] = []
        try:
            for argv, path in zip(argvs, logs, strict=True):
                files = _shipped_files(argv)
                actor = actor_cls.options(
                    num_cpus=self.cpus, num_gpus=self.gpus or 0, scheduling_strategy="SPREAD", runtime_env=runtime_env
                ).remote(list(argv), files, env)
                procs.append(RayWorker(ray, actor, path))
        except BaseException:
            for p in procs:
                p.release()
            raise
        return Workers(procs, [p.release for p in procs])


def _checkout_root() -> str:
    """The folder psrv is imported from when it runs from a checkout (so its worker processes on
    this machine import the same code); empty when it is installed."""
    root = Path(__file__).resolve().parent.parent
    return "" if "site-packages" in root.parts or "dist-packages" in root.parts else str(root)


def _shipped_files(argv: Sequence[str]) -> dict[int, tuple[str, bytes]]:
    """The files a worker's command line names (after ``python -m psrv``), up to :data:`SHIP_LIMIT`
    each: argument index -> (file name, contents)."""
    files = {}
    for i, arg in enumerate(argv):
        if i < 3 or arg.startswith("-"):
            continue
        path = Path(arg)
        with contextlib.suppress(OSError):
            if path.is_file() and path.stat().st_size <= SHIP_LIMIT:
                files[i] = (path.name, path.read_bytes())
    return files


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def make_launcher(
    name: str, address: str | None = None, cpus: float = 1.0, gpus: float | None = None, device: str = "cpu"
) -> Launcher:
    """The launcher ``psrv run --launcher NAME`` uses (:class:`LauncherError` when it cannot be made)."""
    if name == "local":
        return LocalLauncher()
    if name == "ray":
        return RayLauncher(address, cpus, gpus, device)
    raise LauncherError(f"unknown launcher {name!r}; expected one of {', '.join(LAUNCHERS)}")


def wait_gone(procs: Sequence[WorkerHandle], timeout: float) -> None:
    """Wait up to ``timeout`` seconds (together) for killed workers to be reaped."""
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
