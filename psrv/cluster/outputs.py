"""The run folder of ``psrv cluster run``: the files the processes write there, read back, and the
files this run writes from them.

Written by the processes: ``metrics.jsonl`` and ``server-summary.json`` (the server's per-round
metrics and summary), ``model.npy``, ``<host>.log`` (``server.log``, ``w<i>.log``: each process's
output; a worker's last JSON line is its result), ``counters-<host>.json`` (``--shape-at host``:
the container entrypoint's counters) and ``capture.npz`` (``--capture``: every frame). Written
here: ``summary.json`` (the run's summary) and ``wire-uploads.jsonl`` (every upload seen on the
wire: worker, start, seconds, bytes).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from psrv.files import atomic_write_json, atomic_write_text

METRICS = "metrics.jsonl"
SERVER_SUMMARY = "server-summary.json"
MODEL = "model.npy"
CAPTURE = "capture.npz"
WIRE_UPLOADS = "wire-uploads.jsonl"
SUMMARY = "summary.json"

#: what an earlier run in the same folder may have left and this run must not read as its own
STALE = (METRICS, SERVER_SUMMARY, MODEL, CAPTURE, WIRE_UPLOADS)


def clear_stale(out: Path) -> None:
    for name in STALE:
        (out / name).unlink(missing_ok=True)


def log_name(host: str) -> str:
    return f"{host}.log"


def counters_path(out: Path, host: str) -> Path:
    return out / f"counters-{host}.json"


def read_log(out: Path, host: str) -> str:
    return (out / log_name(host)).read_text(errors="replace")


def tail(text: str, n: int = 20) -> str:
    return "\n".join(text.splitlines()[-n:])


def server_summary(out: Path) -> dict[str, Any]:
    return json.loads((out / SERVER_SUMMARY).read_text())


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line.strip()]


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    return None


def worker_result(out: Path, index: int) -> dict[str, Any] | None:
    """What worker ``index`` printed last as JSON (its bytes up and down), or None."""
    return last_json(read_log(out, f"w{index}"))


def entrypoint_counters(out: Path, host: str) -> dict[str, dict[str, int]]:
    path = counters_path(out, host)
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("delta", {})


def write_wire_uploads(out: Path, bursts: Sequence[Sequence[Mapping[str, Any]]]) -> None:
    """Every upload seen on the wire, ``bursts[i]`` being worker i's."""
    lines = [json.dumps({"worker": i, **b}) + "\n" for i, worker_bursts in enumerate(bursts) for b in worker_bursts]
    atomic_write_text(out / WIRE_UPLOADS, "".join(lines))


def write_summary(out: Path, result: Mapping[str, Any]) -> None:
    atomic_write_json(out / SUMMARY, result)
