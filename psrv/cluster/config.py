"""What a cluster run is: :class:`ClusterConfig` (hosts, links, the job, the run's limits)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from psrv.cluster import shaping
from psrv.cluster.shaping import LinkRates

SERVER = "server"  # the server's host name; workers are w0, w1, ...
SHAPE_AT = ("bridge", "host")


@dataclass(frozen=True)
class ClusterConfig:
    workers: int = 2
    rounds: int = 100
    algorithm: str = "gd"
    compressor: str = ""
    lr: float = 0.02
    options: Mapping[str, float] = field(default_factory=dict)
    task: str | None = None
    l2: float = 0.01
    task_options: Mapping[str, float] = field(default_factory=dict)
    round_timeout: float = 10.0
    seed: int = 0
    zstd: bool = False
    data: str = "mnist"
    split: str = "iid"
    test_fraction: float = 0.2
    rate: LinkRates = LinkRates()  # every worker's link unless worker_rates says otherwise
    worker_rates: Mapping[int, LinkRates] = field(default_factory=dict)
    server_rate: LinkRates = LinkRates()  # default: the server's link is not shaped
    qdisc: str = "tbf"
    shape_at: str = "bridge"
    offload: bool = True
    capture: bool = False
    port: int = 50051
    timeout: float = 600.0  # the whole run, seconds
    crash_after: Mapping[int, int] = field(default_factory=dict)  # worker index -> rounds (fault injection)
    server_args: tuple[str, ...] = ()  # more start-server options, verbatim

    def __post_init__(self) -> None:
        if self.workers < 1 or self.rounds < 0:
            raise ValueError("need workers >= 1 and rounds >= 0")
        if self.shape_at not in SHAPE_AT:
            raise ValueError(f"shape_at must be one of {', '.join(SHAPE_AT)}")
        if self.qdisc not in shaping.QDISCS:
            raise ValueError(f"qdisc must be one of {', '.join(shaping.QDISCS)}")
        bad = sorted(i for i in [*self.worker_rates, *self.crash_after] if not 0 <= i < self.workers)
        if bad:
            raise ValueError(f"worker index {bad[0]} out of range 0..{self.workers - 1}")

    def link(self, host: str) -> LinkRates:
        if host == SERVER:
            return self.server_rate
        return self.worker_rates.get(int(host[1:]), self.rate)


def with_algorithm(cfg: ClusterConfig, algorithm: str, rounds: int | None = None) -> ClusterConfig:
    return replace(cfg, algorithm=algorithm, rounds=cfg.rounds if rounds is None else rounds)
