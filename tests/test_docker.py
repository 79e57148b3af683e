"""docker-compose.yml and Dockerfile, checked without a Docker engine: the compose file parses, and
every command and option it gives a container is one the psrv CLI accepts (parsed by click itself),
with consistent workers, shards, ids, ports, rates and mounts. The entrypoint's shaping path itself
runs in tests/test_cluster.py (``--shape-at host``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from psrv.cli import main
from psrv.cluster import entrypoint
from psrv.cluster.shaping import ENV_DOWN, ENV_UP, parse_rate

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
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
