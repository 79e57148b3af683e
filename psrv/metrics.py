"""Where a run's measurements go: byte totals per direction and method, and the per-round sink
(JSONL file, periodic evaluation, a progress callback) that the runner hands to the engine.

Pure: no gRPC, so the engine and the transports share it.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from psrv.files import LineLog


class ByteCounter:
    """Thread-safe message and byte totals per (direction, method)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.messages: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, direction: str, method: str, nbytes: int) -> None:
        with self._lock:
            self.bytes[direction, method] += nbytes
            self.messages[direction, method] += 1

    def total(self, direction: str) -> int:
        with self._lock:
            return sum(v for (d, _), v in self.bytes.items() if d == direction)

    def entries(self) -> list[list[Any]]:
        """``[direction, method, bytes, messages]`` of every count (what a checkpoint saves)."""
        with self._lock:
            return [[d, m, int(n), int(self.messages[d, m])] for (d, m), n in self.bytes.items()]

    def restore(self, entries: list[list[Any]]) -> None:
        """Set the counts saved by :meth:`entries` (a resumed run counts on from them)."""
        with self._lock:
            for direction, method, nbytes, messages in entries:
                self.bytes[direction, method] = int(nbytes)
                self.messages[direction, method] = int(messages)


class MetricsSink:
    """Receives every closed round from the engine (:class:`psrv.engine.RoundSink`).

    ``evaluator(theta)`` (embedded runs only: a real server holds no data) adds fields to every
    ``eval_every``-th round's record and to the last; then the record is appended to
    ``jsonl_path`` (one JSON object per line, each whole or absent: :class:`psrv.files.LineLog`)
    and passed to ``on_round``. An existing non-empty ``jsonl_path`` is refused
    (:class:`psrv.files.OutputError`) unless ``overwrite``."""

    def __init__(
        self,
        jsonl_path: str | Path | None = None,
        evaluator: Callable[[np.ndarray], dict[str, float]] | None = None,
        eval_every: int = 1,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        overwrite: bool = False,
        keep_lines: int | None = None,
    ) -> None:
        # keep_lines: a resumed run continues the file after that many whole lines (LineLog)
        self._file: LineLog | None = LineLog(jsonl_path, overwrite, keep_lines=keep_lines) if jsonl_path else None
        self._evaluator, self._eval_every = evaluator, max(1, eval_every)
        self._on_round = on_round

    def round_closed(self, record: dict[str, Any], theta: np.ndarray, final: bool) -> None:
        k = record["round"]
        if self._evaluator is not None and (k % self._eval_every == self._eval_every - 1 or final):
            record.update(self._evaluator(theta))
        if self._file is not None:
            self._file.write(json.dumps(record))
        if self._on_round is not None:
            self._on_round(record)

    @property
    def lines(self) -> int | None:
        """Whole lines in the metrics file (None: no file)."""
        return None if self._file is None else self._file.lines

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
