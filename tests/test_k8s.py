"""deploy/k8s/: the Kubernetes manifests validate offline against the API schemas
(``kubernetes-validate``, ``pip install 'psrv[k8s]'``), and every container's command line is one
psrv's own CLI accepts, for every worker index, with the files its volumes mount -- so they cannot
rot as the options change. No cluster runs here (docs/kubernetes.md)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from psrv.certs import make_test_pki
from psrv.cli import main
from psrv.tls_options import pop_client_security, pop_server_security

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
#: the Kubernetes release the manifests are checked against (batch/v1 Indexed Jobs, gRPC probes: GA before it)
VERSION = "1.33"


def _docs() -> list[dict[str, Any]]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def _by(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def test_manifests_validate_offline() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = _docs()
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == {
        ("PersistentVolumeClaim", "psrv-results"),
        ("Service", "psrv-server"),
        ("Job", "psrv-server"),
        ("Job", "psrv-workers"),
    }
    for doc in docs:
        kv.validate(doc, VERSION, strict=True)
    # the validator does catch a mistake: a misspelt field, a wrong type
    bad = copy.deepcopy(_by("Job", "psrv-workers"))
    bad["spec"]["completionMod"] = bad["spec"].pop("completionMode")
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, VERSION, strict=True)
    bad = copy.deepcopy(_by("Job", "psrv-server"))
    _container(bad)["ports"][0]["containerPort"] = "grpc-port"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, VERSION, strict=True)


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' expansion of ``$(VAR)`` in a container's args (only variables it defines)."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), a) for a in args]


def _mounted(args: list[str], container: dict[str, Any], root: Path) -> list[str]:
    """The args with each path under one of the container's volume mounts moved under ``root``
    (where the test made the files the Secret would hold); a path under no mount fails the test."""
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
    out = []
    for a in args:
        flag, _, value = a.partition("=")
        if value.startswith("/"):
            (mount,) = [m for m in mounts if value.startswith(m + "/")] or [None]
            assert mount is not None, f"{flag}={value} is under none of the volume mounts {mounts}"
            value = str(root / value[len(mount) + 1 :]) if mount == "/etc/psrv/tls" else value
            a = f"{flag}={value}"
        out.append(a)
    return out


def _parse(sub: str, args: list[str]) -> dict[str, Any]:
    """The parameters psrv's own ``SUB`` command makes of ``args`` (a usage error fails)."""
    cmd = main.commands[sub]
    with cmd.make_context(sub, list(args)) as ctx:
        return dict(ctx.params)


def test_container_args_are_accepted_by_psrv(tmp_path: Path) -> None:
    server_job, workers_job, service = (
        _by("Job", "psrv-server"),
        _by("Job", "psrv-workers"),
        _by("Service", "psrv-server"),
    )
    n = workers_job["spec"]["completions"]
    assert workers_job["spec"]["completionMode"] == "Indexed" and workers_job["spec"]["parallelism"] == n
    ids = [f"w{i}" for i in range(n)]
    pki = make_test_pki(tmp_path / "tls", ids, hosts=["psrv-server"])  # what docs/kubernetes.md has one make

    server = _container(server_job)
    assert server["command"] == ["python", "-m", "psrv", "start-server"]
    params = _parse("start-server", _mounted(server["args"], server, pki.root))
    assert params["workers"] == n and list(params["worker_ids"]) == ids
    assert pop_server_security(dict(params)).tls  # the TLS files go together (mutual TLS, tokens)
    (port,) = service["spec"]["ports"]
    assert params["port"] == port["port"] == server["ports"][0]["containerPort"] and params["host"] == "0.0.0.0"
    assert server["readinessProbe"]["grpc"]["port"] == params["port"]
    (results,) = [m for m in server["volumeMounts"] if m["name"] == "results"]
    assert all(params[k].startswith(results["mountPath"] + "/") for k in ("metrics", "summary_json", "model_out"))

    worker = _container(workers_job)
    assert worker["command"] == ["python", "-m", "psrv", "start-worker"]
    (index_env,) = [e["name"] for e in worker["env"] if "job-completion-index" in str(e.get("valueFrom"))]
    shards = set()
    for i in range(n):
        args = _mounted(_expand(worker["args"], {index_env: str(i)}), worker, pki.root)
        p = _parse("start-worker", args)
        assert p["worker_id"] == ids[i] and p["shard"] == f"{i}/{n}"
        assert p["server_address"] == f"{service['metadata']['name']}:{port['port']}"
        assert pop_client_security(dict(p)).credentials() is not None and p["data"] == params["data"]
        assert Path(p["tls_cert"]).name == f"{ids[i]}.crt" and Path(p["token_file"]).name == f"{ids[i]}.token"
        shards.add(p["shard"])
    assert len(shards) == n  # every shard once
    # the worker Secret's items give each index its own files, where the args look for them
    items = {it["path"] for v in workers_job["spec"]["template"]["spec"]["volumes"] for it in v["secret"]["items"]}
    assert {f"workers/{w}.{ext}" for w in ids for ext in ("crt", "key", "token")} | {"ca.crt"} == items


def test_a_wrong_arg_would_be_caught() -> None:
    """The check above is not vacuous: an option psrv does not have fails the parse."""
    worker = _container(_by("Job", "psrv-workers"))
    with pytest.raises(click.UsageError):
        _parse("start-worker", [*_expand(worker["args"], {"WORKER_INDEX": "0"}), "--no-such-option=1"])
