"""What a cluster run is: :class:`ClusterConfig` (hosts, links, the job, the run's limits)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from psrv.cluster import shaping
from psrv.cluster.shaping import LinkRates
from psrv.options import DataConfig, JobConfig

SERVER = "server"  # the server's host name; workers are w0, w1, ...
SHAPE_AT = ("bridge", "host")


MAX_WORKERS = 200  # hosts share one /24 on the bridge


@dataclass(frozen=True)
class ClusterConfig:
    """A job (:class:`psrv.options.JobConfig`, the same as ``psrv run``'s) and its data, on hosts
    with shaped links."""

    job: JobConfig = field(default_factory=JobConfig)
    data: DataConfig = field(default_factory=DataConfig)
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
    device: str = "cpu"  # the workers' --device
    tls: bool = False  # mutual TLS + worker tokens with certificates made for the run (psrv.certs)

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS or self.rounds < 0:
            raise ValueError(f"need 1 <= workers <= {MAX_WORKERS} and rounds >= 0")
        if self.shape_at not in SHAPE_AT:
            raise ValueError(f"shape_at must be one of {', '.join(SHAPE_AT)}")
        if self.qdisc not in shaping.QDISCS:
            raise ValueError(f"qdisc must be one of {', '.join(shaping.QDISCS)}")
        bad = sorted(i for i in [*self.worker_rates, *self.crash_after] if not 0 <= i < self.workers)
        if bad:
            raise ValueError(f"worker index {bad[0]} out of range 0..{self.workers - 1}")

    @property
    def workers(self) -> int:
        return self.job.workers

    @property
    def rounds(self) -> int:
        return self.job.rounds

    @property
    def algorithm(self) -> str:
        return self.job.algorithm

    def link(self, host: str) -> LinkRates:
        if host == SERVER:
            return self.server_rate
        return self.worker_rates.get(int(host[1:]), self.rate)


def with_job(cfg: ClusterConfig, job: JobConfig) -> ClusterConfig:
    """The same cluster running another job (the next algorithm of a comparison)."""
    return replace(cfg, job=job)
