"""Per-round scalars to TensorBoard (``psrv run --tensorboard DIR``): what PyTorch users open.

Needs the optional ``tensorboard`` package (``pip install 'psrv[tensorboard]'``); the writer is
torch's :class:`torch.utils.tensorboard.SummaryWriter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: record field -> TensorBoard tag (one scalar per round where the record has a number)
SCALARS = {
    "loss": "loss/workers",
    "train_loss": "loss/train",
    "accuracy": "accuracy/test",
    "uploads": "comm/uploads",
    "payload_bits": "comm/bits",
    "bytes_up": "comm/bytes_up",
    "bytes_down": "comm/bytes_down",
    "round_time": "time/round",
    "elapsed": "time/elapsed",
}
EXTRA = "tensorboard"


class TensorBoardMissing(RuntimeError):
    """The optional package is not installed (one line naming the extra)."""


def check_available() -> None:
    """:class:`TensorBoardMissing` unless the ``tensorboard`` package can be imported."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise TensorBoardMissing(
            f"--tensorboard needs the tensorboard package: pip install 'psrv[{EXTRA}]' (or pip install tensorboard)"
        ) from None


class RoundWriter:
    """Writes each round's record's :data:`SCALARS` to ``log_dir``, step = the round; cumulative
    uploads, bits and bytes too (``comm/*_total``), the x axes the LAQ and SASG papers plot against."""

    def __init__(self, log_dir: str | Path) -> None:
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.totals = {"uploads": 0.0, "payload_bits": 0.0, "bytes_up": 0.0, "bytes_down": 0.0}

    def __call__(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for field, tag in SCALARS.items():
            value = record.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(tag, float(value), step)
        for field in self.totals:
            value = record.get(field)
            if isinstance(value, int | float):
                self.totals[field] += float(value)
                self.writer.add_scalar(f"{SCALARS[field]}_total", self.totals[field], step)

    def close(self) -> None:
        self.writer.close()
