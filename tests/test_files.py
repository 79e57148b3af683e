"""Nothing half-written: atomic summaries/models (psrv.files), whole metrics lines, no truncated
metrics file, and unwritable output paths refused before training (exit 2, one line)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from psrv import files
from psrv.cli import main
from psrv.metrics import MetricsSink


def _no_temp_left(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_replaces_whole(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "summary.json"
    files.atomic_write_json(path, {"a": 1})
    files.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    _no_temp_left(path.parent)


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_atomic_write_keeps_the_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    path = tmp_path / "summary.json"
    path.write_text('{"old": true}\n')

    def boom(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if fail_at == "write":
        monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: _FailingFile(fd))
    else:
        monkeypatch.setattr(files.os, fail_at, boom)
    with pytest.raises(OSError):
        files.atomic_write_text(path, '{"new": true}\n' * 1000)
    assert path.read_text() == '{"old": true}\n'
    _no_temp_left(tmp_path)


class _FailingFile:
    """Writes half of what it is given, then reports a full disk."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)

    def write(self, data: bytes) -> None:
        os.write(self.fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_save_npy_uses_np_save_names(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32)
    assert files.atomic_save_npy(tmp_path / "model", a) == tmp_path / "model.npy"
    assert files.atomic_save_npy(tmp_path / "m.npy", a) == tmp_path / "m.npy"
    np.testing.assert_array_equal(np.load(tmp_path / "model.npy"), a)
    _no_temp_left(tmp_path)


def test_metrics_lines_whole_or_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = MetricsSink(path)
    theta = np.zeros(3)
    sink.round_closed({"round": 0, "loss": 1.0}, theta, False)
    real_write = os.write

    def half_then_full_disk(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "write", half_then_full_disk)
    with pytest.raises(OSError):
        sink.round_closed({"round": 1, "loss": 0.5}, theta, False)
    monkeypatch.setattr(files.os, "write", real_write)
    sink.round_closed({"round": 2, "loss": 0.25}, theta, True)
    sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 2]


def test_metrics_file_is_never_truncated(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n')
    with pytest.raises(files.OutputError, match="already exists"):
        MetricsSink(path)
    assert path.read_text() == '{"round": 0}\n'
    MetricsSink(path, overwrite=True).close()  # asked for
    assert path.read_text() == ""
    MetricsSink(path).close()  # an empty file may be reused


def _one_line_error(result: object) -> str:
    out = result.output  # type: ignore[attr-defined]
    assert result.exit_code == 2, out  # type: ignore[attr-defined]
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    return lines[0]


def test_start_server_refuses_an_existing_metrics_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 0}\n')
    result = CliRunner().invoke(main, ["start-server", "--algorithm", "gd", "--port", "0", "--metrics", str(path)])
    assert "--overwrite-metrics" in _one_line_error(result)
    assert path.read_text() == '{"round": 0}\n'


@pytest.mark.parametrize("option", ["--metrics", "--summary-json", "--model-out"])
def test_start_server_unwritable_output_is_an_early_error(tmp_path: Path, option: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(
        main, ["start-server", "--algorithm", "gd", "--port", "0", option, str(blocker / "out")]
    )
    assert "a-file" in _one_line_error(result)


@pytest.mark.parametrize("option", ["--out", "--summary-json"])
def test_run_unwritable_output_is_an_early_error(tmp_path: Path, option: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["run", "--workers", "1", "--rounds", "1", option, str(blocker / "x")]
    if option != "--out":
        args += ["--out", str(tmp_path / "out")]
    assert "a-file" in _one_line_error(CliRunner().invoke(main, args))
