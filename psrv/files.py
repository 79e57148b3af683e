"""Files a run leaves behind, never half-written.

Summaries, models and manifests are written whole or not at all: the bytes go to a temporary file in
the same folder, which is flushed, fsync'd and then renamed over the target (``os.replace``, atomic on
POSIX), so a crash or a full disk leaves the previous file as it was. Per-round metrics are appended
line by line (:class:`LineLog`): each line is one write, and a write that fails is cut back off, so
the file holds whole lines only. The checks here run before training, so an unwritable path or a
metrics file that would be overwritten is a one-line error at start, not a lost run.

Pure: standard library and numpy only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LineLog",
    "OutputError",
    "atomic_save_npy",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_new_log",
    "check_writable_dir",
    "check_writable_file",
    "npy_path",
]


class OutputError(OSError):
    """An output path that cannot be written, or a file that would be overwritten (one-line message)."""


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` whole: temp file in the same folder, fsync, rename. On any
    error the temp file is removed and ``path`` is left as it was. Creates missing parent folders."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(p.parent)
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON with sorted keys and a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def npy_path(path: str | Path) -> Path:
    """Where ``np.save(path, ...)`` writes: ``.npy`` is added when the name lacks it."""
    p = Path(path)
    return p if p.name.endswith(".npy") else p.with_name(p.name + ".npy")


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` made atomic (same file name rule: ``.npy`` added when missing)."""
    buf = io.BytesIO()
    np.save(buf, array)
    return atomic_write_bytes(npy_path(path), buf.getvalue())


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform opens folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Create folder ``path`` if needed and prove a file can be made in it; else :class:`OutputError`."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise OutputError(f"{what} {str(p)!r} is not a writable folder: {exc.strerror or exc}") from None
    return p


def check_writable_file(path: str | Path, what: str) -> Path:
    """``path`` can be written (its folder is made if missing; it is not a folder itself); else
    :class:`OutputError`. Nothing is written to ``path``."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{what} {str(p)!r} is a folder, not a file")
    check_writable_dir(p.parent, f"the folder of {what}")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{what} {str(p)!r} is not writable")
    return p


def check_new_log(path: str | Path, what: str, overwrite: bool = False, flag: str = "--overwrite-metrics") -> Path:
    """``path`` is writable and, unless ``overwrite``, holds nothing yet (an existing non-empty file
    is refused, naming ``flag``)."""
    p = check_writable_file(path, what)
    if not overwrite and p.exists() and p.stat().st_size > 0:
        raise OutputError(f"{what} {str(p)!r} already exists and is not empty (pass {flag} to replace it)")
    return p


class LineLog:
    """An append-only file of whole lines. Each :meth:`write` is one ``os.write`` of the whole line;
    if it fails or is short (a full disk), the file is cut back to where it was and the error raised,
    so a reader never sees half a line. ``overwrite`` starts the file empty; otherwise an existing
    non-empty file is refused (:func:`check_new_log`).

    ``keep_lines`` (a resumed run, :mod:`psrv.checkpoint`): continue the file after its first
    ``keep_lines`` whole lines -- whatever follows them (the lines of rounds after the checkpoint,
    which the resumed run writes again, or half a line) is cut off. The one case a log is cut, and
    only back to the lines the checkpoint counted; a file with fewer lines is refused."""

    def __init__(
        self, path: str | Path, overwrite: bool = False, what: str = "metrics file", keep_lines: int | None = None
    ) -> None:
        if keep_lines is not None:
            self.path = check_writable_file(path, what)
            self._size = _offset_after_lines(self.path, keep_lines, what)
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.ftruncate(self._fd, self._size)
            os.lseek(self._fd, self._size, os.SEEK_SET)
            self.lines = keep_lines
            return
        self.path = check_new_log(path, what, overwrite)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._size = 0
        self.lines = 0  # whole lines in the file

    def write(self, line: str) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: closed")
        data = (line if line.endswith("\n") else line + "\n").encode("utf-8")
        try:
            n = os.write(self._fd, data)
            if n != len(data):
                raise OSError(f"{self.path}: short write ({n} of {len(data)} bytes; disk full?)")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
                os.lseek(self._fd, self._size, os.SEEK_SET)
            raise
        self._size += n
        self.lines += 1

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)


def _offset_after_lines(path: Path, lines: int, what: str) -> int:
    """Byte offset just after the first ``lines`` newline-terminated lines of ``path`` (0 for 0);
    :class:`OutputError` when it holds fewer."""
    if lines <= 0:
        return 0
    seen = offset = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                count = chunk.count(b"\n")
                if seen + count >= lines:
                    pos = -1
                    for _ in range(lines - seen):
                        pos = chunk.index(b"\n", pos + 1)
                    return offset + pos + 1
                seen += count
                offset += len(chunk)
    except FileNotFoundError:
        pass
    raise OutputError(f"{what} {str(path)!r} holds {seen} whole lines, fewer than the {lines} the checkpoint counted")
