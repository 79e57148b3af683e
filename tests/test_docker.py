"""docker-compose.yml and Dockerfile: first checked without an engine (the compose file parses, and
every command and option it gives a container is one the psrv CLI accepts, parsed by click itself,
with consistent workers, shards, ids, data, ports, rates and mounts), then for real
(``test_compose_runs_from_local_wheels_on_shaped_links``, marked ``container``, ``[plain]`` and
``[tls]`` with docker-compose.tls.yml): scripts/compose_up.sh installs podman if needed, builds the
image from a host wheelhouse with no network in the build (once for both) and runs the compose file
to completion on tc-shaped links; the run, the TLS options, psrv's byte counts and the wire counters
of every container are checked. Opt-in (``PSRV_CONTAINER_TEST=1``; CI runs ``-m container`` as its own
step, bounded by ``PSRV_CONTAINER_TIMEOUT``): from a machine without podman the single run took
9.6 min on 2 loaded cores (3.5 min when quiet); with podman, the base image and the image's layers
cached, both runs take 2-3 min."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from psrv.cli import main
from psrv.cluster import entrypoint
from psrv.cluster.shaping import ENV_DOWN, ENV_UP, parse_rate, tbf_params

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = ROOT / "scripts" / "compose_up.sh"
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _defaults(value: Any) -> Any:
    """Compose's ${VAR:-default} interpolation, with the environment empty: the defaults."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: _defaults(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _defaults(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_every_command_and_option_exists_in_the_cli(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "server" in services
    for name, svc in services.items():
        role, *args = svc["command"]
        assert role in entrypoint.ROLES, f"{name}: {role!r} is not an entrypoint role"
        cmd_name = entrypoint.ROLES[role]
        cmd = main.commands[cmd_name]
        known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
        used = {a for a in args if a.startswith("-")}
        assert used <= known, f"{name}: {sorted(used - known)} not options of psrv {cmd_name}"
        hidden = {opt for p in cmd.params if getattr(p, "hidden", False) for opt in p.opts}
        assert not used & hidden, f"{name} uses test-only options {used & hidden}"
        cmd.make_context(cmd_name, list(args))  # click parses it: types, choices, required options


def test_workers_shards_and_addresses_are_consistent(compose: dict[str, Any]) -> None:
    services = compose["services"]
    server = services["server"]["command"]
    workers = {n: s["command"] for n, s in services.items() if s["command"][0] == "worker"}
    m = int(_option(server, "--workers"))
    assert len(workers) == m >= 2
    assert _option(server, "--host") == "0.0.0.0"
    port = _option(server, "--port")
    shards = sorted(_option(c, "--shard") for c in workers.values())
    assert shards == sorted(f"{i}/{m}" for i in range(m))
    ids = [_option(c, "--worker-id") for c in workers.values()]
    assert len(set(ids)) == m
    # the server owns the shape (the workers' data) and lets only these ids into its slots
    assert sorted(_option(server, "--worker-ids").split(",")) == sorted(ids)
    assert {_option(c, "--data") for c in workers.values()} == {_option(server, "--data")}
    for c in workers.values():
        assert _option(c, "--server") == f"server:{port}"
    for path in ("--metrics", "--summary-json", "--model-out"):
        assert _option(server, path).startswith("/out/")


def test_shaping_mounts_and_capabilities(compose: dict[str, Any]) -> None:
    rates = []
    for name, svc in compose["services"].items():
        assert "NET_ADMIN" in svc["cap_add"], f"{name}: tc needs NET_ADMIN"
        assert any(v.split(":")[:2] == ["./psrv-out", "/out"] for v in svc["volumes"]), name
        env = svc["environment"]
        assert ENV_UP in env and ENV_DOWN in env, name
        for key in (ENV_UP, ENV_DOWN):
            parse_rate(env[key])  # a valid tc rate, or empty = unshaped
        assert env["PSRV_COUNTERS"].startswith("/out/")
        if svc["command"][0] == "worker":
            rates.append(parse_rate(env[ENV_UP]))
            assert rates[-1] is not None, f"{name}: a worker's uplink is shaped by default"
    assert len(set(rates)) > 1, "the default shows workers at different rates"
    assert len({s["environment"]["PSRV_COUNTERS"] for s in compose["services"].values()}) == len(compose["services"])


def test_dockerfile_installs_torch_first_and_runs_the_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith("#")]
    torch = next(i for i, x in enumerate(lines) if "torch==2.13.0" in x)
    package = next(i for i, x in enumerate(lines) if re.search(r"pip install .*--no-cache-dir \.(\s|$)", x))
    assert torch < package
    assert "iproute2" in text
    assert 'ENTRYPOINT ["python", "-m", "psrv.cluster.entrypoint"]' in lines
    for line in lines:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such path"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert all(s.get("build") == "." for s in compose["services"].values())


def test_dockerfile_installs_only_from_the_wheelhouse_when_told() -> None:
    """Every pip install sees the context's wheels/ (bind mount) and pip's settings come in as build
    arguments, so `--build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels` reaches all of them."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith("#")]
    first_from = next(i for i, x in enumerate(lines) if x.startswith("FROM "))
    args = {x.split()[1].split("=")[0] for x in lines[first_from:] if x.startswith("ARG ")}
    assert {"PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"} <= args
    assert not [x for x in lines if x.startswith("ARG PIP_") and "=" in x], "an empty PIP_NO_INDEX is not a boolean"
    installs = [x for x in lines if "pip install" in x]
    assert len(installs) >= 2
    for x in installs:
        assert x.startswith("RUN --mount=type=bind,source=wheels,target=/wheels "), x
    assert (ROOT / "wheels").is_dir()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "wheels" not in ignored and ".git" in ignored


def test_compose_up_script_refuses_unknown_steps() -> None:
    proc = subprocess.run(["bash", str(_SCRIPT), "nosuch"], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "unknown step 'nosuch'" in proc.stderr and "setup, wheels, build, up" in proc.stderr
    usage = subprocess.run(["bash", str(_SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "PIP_NO_INDEX=1" in usage.stdout


# --- the real thing: build the image from local wheels and run docker-compose.yml under podman ---------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ROUNDS = 20


def _step(step: str, env: dict[str, str], log: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """One step of scripts/compose_up.sh in its own process group (killed whole on timeout); output in ``log``."""
    with log.open("w") as fh:
        proc = subprocess.Popen(
            ["bash", str(_SCRIPT), step], env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except BaseException as exc:  # timeout, Ctrl-C: the group goes; the EXIT trap runs `compose down`
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                pytest.fail(f"compose_up.sh {step} still running after {timeout:.0f} s; log in {log}")
            raise
    return subprocess.CompletedProcess([step], code, log.read_text(), "")


def _last_line(text: str) -> str:
    lines = [x for x in _ANSI.sub("", text).splitlines() if x.strip()]
    return lines[-1] if lines else "(no output)"


def _remove_project(engine: str, project: str, env: dict[str, str]) -> None:
    """Containers, pods and networks of the compose project, whatever state the run left them in."""
    if shutil.which(engine) is None:
        return
    label = f"io.podman.compose.project={project}" if engine == "podman" else f"com.docker.compose.project={project}"

    def run(*args: str) -> list[str]:
        proc = subprocess.run([engine, *args], env=env, capture_output=True, text=True, timeout=120)
        return proc.stdout.split()

    ids = run("ps", "-aq", "--filter", f"label={label}")
    if ids:
        run("rm", "-f", "-t", "2", *ids)
    if engine == "podman":
        pods = run("pod", "ls", "-q", "--filter", f"name=pod_{project}")
        if pods:
            run("pod", "rm", "-f", *pods)
    nets = run("network", "ls", "-q", "--filter", f"label={label}")
    if nets:
        run("network", "rm", "-f", *nets)


class _Budget:
    """One time limit for all container tests of a session (``PSRV_CONTAINER_TIMEOUT`` seconds, default
    1200): every step gets at most what is left of it, and a step still running then is killed with its
    process group (the script's EXIT trap takes the compose project down), so the tests cannot hang."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        left = self.end - time.monotonic()
        if left < 30:
            pytest.fail(f"the container tests' time ({_TIMEOUT_VAR}) is spent")
        return min(cap, left)


_TIMEOUT_VAR = "PSRV_CONTAINER_TIMEOUT"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], _Budget]:
    """podman (installed if missing) and psrv's image built from a host wheelhouse with no network in the
    build, once for the module; skips when opted out, not root, or podman cannot be installed or run."""
    if os.environ.get("PSRV_CONTAINER_TEST", "") != "1":
        pytest.skip("opt-in, minutes on a machine without podman: PSRV_CONTAINER_TEST=1 runs it")
    if os.geteuid() != 0:
        pytest.skip("needs root: rootful podman, and tc (NET_ADMIN) inside the containers")
    budget = _Budget(float(os.environ.get(_TIMEOUT_VAR, "1200")))
    logs = tmp_path_factory.mktemp("image")
    engine = os.environ.get("PSRV_ENGINE", "podman")
    env = {**os.environ, "PSRV_ENGINE": engine}
    setup = _step("setup", env, logs / "setup.log", budget.left(900))
    if setup.returncode != 0:
        pytest.skip(f"no container engine here: {_last_line(setup.stdout)}")
    if shutil.which(engine) is None:
        pytest.skip(f"{engine} not installed")
    conf = Path(env.get("PSRV_CACHE") or Path.home() / ".cache" / "psrv-containers") / "containers.conf"
    if engine == "podman" and conf.exists():
        env.setdefault("CONTAINERS_CONF", str(conf))  # as the script does: runc, ulimits this host can give
    wheels = _step("wheels", env, logs / "wheels.log", budget.left(900))
    if wheels.returncode != 0:
        pytest.skip(f"no package index for the wheelhouse: {_last_line(wheels.stdout)}")
    build = _step("build", env, logs / "build.log", budget.left(900))
    assert build.returncode == 0, build.stdout[-3000:]
    return env, budget


def _entrypoint_lines(log: str) -> dict[str, str]:
    """Each container's ``psrv entrypoint: ...`` line (podman-compose ``[w0]   | text``, docker ``w0-1  | text``)."""
    found = {}
    for line in log.splitlines():
        m = re.match(r"^\[?([\w.-]+?)(?:-\d+)?\]?\s*\|\s*psrv entrypoint: (.*)$", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.container
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_compose_runs_from_local_wheels_on_shaped_links(
    image: tuple[dict[str, str], _Budget], tmp_path: Path, tls: bool
) -> None:
    """scripts/compose_up.sh end to end: docker-compose.yml run to completion in the image built from
    local wheels, with 4 workers at their default rates (w0, w1 100mbit; w2, w3 1mbit up / 10mbit down),
    gd so that every worker uploads its dense gradient each round and the 1mbit uplinks set the pace;
    ``tls``: with docker-compose.tls.yml over it (mutual TLS and worker tokens from `psrv certs` run on
    the host into the mounted out folder, as README says)."""
    base_env, budget = image
    engine = base_env["PSRV_ENGINE"]
    project = f"psrvtest{os.getpid()}{'tls' if tls else ''}"
    out = tmp_path / "out"
    out.mkdir()
    files = ["docker-compose.yml", *(["docker-compose.tls.yml"] if tls else [])]
    for f in files:
        shutil.copy(ROOT / f, tmp_path / f)
    env = {
        **base_env,
        "PSRV_PROJECT": project,
        "PSRV_COMPOSE_DIR": str(tmp_path),
        "PSRV_OUT": str(out),
        "PSRV_ROUNDS": str(_ROUNDS),
        "PSRV_ALGORITHM": "gd",
        "COMPOSE_FILE": ":".join(files),
        "COMPOSE_PATH_SEPARATOR": ":",
    }
    for name in ("W0", "W1", "W2", "W3", "SERVER"):  # the file's default rates, whatever this shell has set
        env.pop(f"{name}_RATE_UP", None)
        env.pop(f"{name}_RATE_DOWN", None)
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    ids = [_option(s["command"], "--worker-id") for s in services.values() if s["command"][0] == "worker"]
    if tls:
        certs = subprocess.run(
            [sys.executable, "-m", "psrv", "certs", str(out / "tls"), "--workers", ",".join(ids), "--host", "server"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert certs.returncode == 0, certs.stderr
    try:
        up = _step("up", env, tmp_path / "up.log", budget.left(600))
    finally:
        _remove_project(engine, project, env)
    log = _ANSI.sub("", up.stdout)
    assert up.returncode == 0, log[-4000:]

    # the credentials reached every container (the entrypoint names the options it appended) and the
    # server listened with TLS: start-server warns about a non-loopback address only without it
    lines = _entrypoint_lines(log)
    assert sorted(lines) == sorted(["server", *ids]), log[-4000:]
    plaintext = "without TLS" in log
    assert plaintext != tls, log[-4000:]
    for name, line in lines.items():
        want = {"--tls-cert", "--tls-key", "--tls-client-ca", "--worker-tokens"} if name == "server" else {
            "--tls-ca", "--tls-cert", "--tls-key", "--token-file"}  # fmt: skip
        added = set(line.partition("PSRV_EXTRA_ARGS: ")[2].split())
        assert added == (want if tls else set()), line

    # the run: every round done, every worker uploaded every round, the loss went down
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["algorithm"] == "gd" and summary["workers"] == 4
    assert summary["rounds"] == len(records) == _ROUNDS
    assert summary["uploads"] == 4 * _ROUNDS and summary["deadline_misses"] == 0
    assert summary["last_round_loss"] < 0.95 * records[0]["loss"]
    assert np.isfinite(np.load(out / "model.npy")).all()

    # psrv's own byte counts: what each worker counted on its channel adds up to what the server counted
    workers = {}
    for line in log.splitlines():
        m = re.search(r'(\{"worker_id".*\})\s*$', line)
        if m:
            w = json.loads(m.group(1))
            workers[w["worker_id"]] = w
    assert sorted(workers) == ["w0", "w1", "w2", "w3"], log[-4000:]
    assert all(w["rounds"] == _ROUNDS and w["uploads"] == _ROUNDS for w in workers.values())
    assert sum(w["bytes_up"] for w in workers.values()) == summary["bytes_up"]
    assert sum(w["bytes_down"] for w in workers.values()) == summary["bytes_down"]
    upload = {wid: [next(x for x in r["workers"] if x["id"] == wid) for r in records] for wid in workers}

    # the wire, per host: tc's qdisc counters in each container (frames, so at least psrv's messages), and
    # what the server received is what the workers sent (plus a little: ARP, DNS, TCP control)
    hosts = {h: json.loads((out / f"counters-{h}.json").read_text()) for h in ("server", *workers)}
    assert all(c["exit_code"] == 0 for c in hosts.values())
    sent = sum(hosts[w]["delta"]["wire_tx"]["bytes"] for w in workers)
    got = sum(hosts[w]["delta"]["wire_rx"]["bytes"] for w in workers)
    srv = hosts["server"]["delta"]
    assert summary["bytes_up"] <= srv["wire_rx"]["bytes"] and summary["bytes_down"] <= srv["wire_tx"]["bytes"]
    assert abs(srv["wire_rx"]["bytes"] - sent) <= 0.02 * sent + 32768, (srv, sent)
    assert abs(srv["wire_tx"]["bytes"] - got) <= 0.02 * got + 32768, (srv, got)
    for wid, w in workers.items():
        c = hosts[wid]
        tx, rx, elapsed = c["delta"]["wire_tx"]["bytes"], c["delta"]["wire_rx"]["bytes"], c["elapsed_s"]
        assert tx >= w["bytes_up"] and rx >= w["bytes_down"], (wid, c, w)
        assert c["delta"]["wire_tx"]["drops"] == 0
        # the shaped rates hold: tbf lets through at most rate x time + one burst, in each direction
        for nbytes, rate in ((tx, c["rate_up"]), (rx, c["rate_down"])):
            burst = tbf_params(rate)[0]
            assert (nbytes - burst) * 8 / rate <= elapsed, (wid, nbytes, rate, elapsed)
        # ... and the slow uplinks were the bottleneck: each of their uploads took at least its bytes at
        # the rate from the round's start, and together they fill most of the training time
        if c["rate_up"] == 1_000_000:
            burst = tbf_params(c["rate_up"])[0]
            for r in upload[wid]:
                assert r["latency"] >= (r["bytes"] - burst) * 8 / c["rate_up"], (wid, r)
            busy = sum(r["bytes"] for r in upload[wid]) * 8 / c["rate_up"]
            wall = summary["wall_time"]
            assert 0.5 * wall <= busy <= wall + burst * 8 / c["rate_up"], (wid, busy, wall)


def test_entrypoint_names_the_options_it_appends_not_their_values() -> None:
    """What the container test reads from each log line: PSRV_EXTRA_ARGS' options, never a path or value."""
    extra = entrypoint.extra_args({"PSRV_EXTRA_ARGS": "--tls-ca /out/tls/ca.crt --token-file='/out/a b' -v"})
    assert extra == ["--tls-ca", "/out/tls/ca.crt", "--token-file=/out/a b", "-v"]
    assert entrypoint.option_names(extra) == ["--tls-ca", "--token-file", "-v"]
    log = "[server] | psrv entrypoint: eth0 up none, down none; PSRV_EXTRA_ARGS: --tls-cert\nw0-1  | psrv entrypoint: x"
    assert _entrypoint_lines(log) == {"server": "eth0 up none, down none; PSRV_EXTRA_ARGS: --tls-cert", "w0": "x"}
