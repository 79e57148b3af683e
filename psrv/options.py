"""Job options, declared once: what defines a job (algorithm, task, rounds, ...) and the data a
worker trains on. ``psrv run``, ``psrv start-server``, ``psrv start-worker``, ``psrv cluster run``
and the container entrypoint all take these same options with the same defaults, and the command
lines of server and worker processes are built here and nowhere else. ``--device`` (where a
worker's torch model computes) is a worker option: each process's own, passed on the worker's
command line, never part of the job the server sends.

Algorithm options (``-o KEY=VALUE``) may name one algorithm of a comparison: ``-o topk-ef.ratio=0.05``
applies to ``topk-ef`` only; an unprefixed ``-o ratio=0.05`` applies to every listed algorithm that
has such an option, and must fit at least one of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

from psrv.keyvalue import parse_key_values

SPLITS = ("iid", "noniid", "dirichlet", "contiguous")  # psrv.data.SPLITS; a test keeps them equal
DEVICES = ("cpu", "cuda", "auto")  # psrv.tasks.torch_task.DEVICES; a test keeps them equal
DEFAULT_ALGORITHMS = "gd,topk-ef,laq"


# ---------------------------------------------------------------------------------- KEY=VALUE
def _key_values(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    try:
        return parse_key_values(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _algorithm_list(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    from psrv.algorithms import ALGORITHMS  # imported when used: --help stays fast

    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown algorithm {', '.join(unknown) or value!r}; known: {', '.join(sorted(ALGORITHMS))}"
        )
    if len(set(names)) != len(names):
        raise click.BadParameter(f"an algorithm is listed twice: {value!r}")
    return names


def _split(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from psrv.data import DataError, parse_split  # imported when used: --help stays fast

    try:
        parse_split(value)
    except DataError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


# ---------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class DataConfig:
    """The data every process of a run derives identically: set, train/test split, shards."""

    data: str = "mnist"
    split: str = "iid"
    test_fraction: float = 0.2
    seed: int = 0
    regression: bool = False

    def argv(self) -> list[str]:
        """``start-worker`` flags for this data."""
        return [
            "--data",
            self.data,
            "--split",
            self.split,
            "--test-fraction",
            repr(self.test_fraction),
            "--seed",
            str(self.seed),
            *(["--regression"] if self.regression else []),
        ]


@dataclass(frozen=True)
class JobConfig:
    """One job: a single algorithm with its options, a task, and the run's length and pace."""

    algorithm: str = "laq"
    compressor: str = ""
    lr: float = 0.02
    options: Mapping[str, float] = field(default_factory=dict)  # algorithm/compressor options, lr excluded
    task: str = "logreg"
    l2: float | None = None  # None: the task's own default
    task_options: Mapping[str, float] = field(default_factory=dict)
    rounds: int = 500
    workers: int = 10
    round_timeout: float = 10.0
    seed: int = 0
    zstd: bool = False
    downlink: str = "auto"
    down_compressor: str = ""
    transport: str = "stream"
    server_opt: str = "sgd"
    clip_norm: float = 0.0  # > 0: the server clips each upload to this L2 norm
    min_workers: int = 1  # fewer live workers than this (after quorum_wait) fail the run
    quorum_wait: float | None = None  # None: 2 x round_timeout
    aggregate: str = "mean"  # the server's rule over the contributions (psrv.robust)

    def algorithm_options(self) -> dict[str, float]:
        return {"lr": self.lr, **self.options}

    def all_task_options(self) -> dict[str, float]:
        return {**({} if self.l2 is None else {"l2": self.l2}), **self.task_options}

    def server_config(self, **extra: Any) -> Any:
        """The engine's :class:`psrv.engine.ServerConfig` (``ValueError`` on bad options)."""
        from psrv.engine import ServerConfig

        return ServerConfig(
            algorithm=self.algorithm,
            compressor=self.compressor,
            options=self.algorithm_options(),
            task=self.task,
            task_options=self.all_task_options(),
            num_workers=self.workers,
            rounds=self.rounds,
            round_timeout=self.round_timeout,
            seed=self.seed,
            zstd=self.zstd,
            downlink=self.downlink,
            down_compressor=self.down_compressor,
            transport=self.transport,
            server_opt=self.server_opt,
            clip_norm=self.clip_norm,
            min_workers=self.min_workers,
            quorum_wait=self.quorum_wait,
            aggregate=self.aggregate,
            **extra,
        )

    def argv(self) -> list[str]:
        """``start-server`` flags for this job."""
        args = [
            "--algorithm",
            self.algorithm,
            "--lr",
            repr(self.lr),
            "--task",
            self.task,
            "--rounds",
            str(self.rounds),
            "--workers",
            str(self.workers),
            "--round-timeout",
            repr(self.round_timeout),
            "--seed",
            str(self.seed),
        ]
        if self.compressor:
            args += ["--compressor", self.compressor]
        if self.l2 is not None:
            args += ["--l2", repr(self.l2)]
        if self.zstd:
            args.append("--zstd")
        if self.downlink != "auto":
            args += ["--downlink", self.downlink]
        if self.down_compressor:
            args += ["--down-compressor", self.down_compressor]
        if self.transport != "stream":
            args += ["--transport", self.transport]
        if self.server_opt != "sgd":
            args += ["--server-opt", self.server_opt]
        if self.clip_norm:
            args += ["--clip-norm", repr(self.clip_norm)]
        if self.min_workers != 1:
            args += ["--min-workers", str(self.min_workers)]
        if self.quorum_wait is not None:
            args += ["--quorum-wait", repr(self.quorum_wait)]
        if self.aggregate != "mean":
            args += ["--aggregate", self.aggregate]
        for k, v in self.options.items():
            args += ["-o", f"{k}={v!r}"]
        for k, v in self.task_options.items():
            args += ["-t", f"{k}={v!r}"]
        return args


def psrv_argv(subcommand: str, *args: str, verbose: bool = False) -> list[str]:
    """``python -m psrv [-v] SUBCOMMAND ARGS``: how a run starts its server and worker processes."""
    return [sys.executable, "-m", "psrv", *(["-v"] if verbose else []), subcommand, *args]


def device_argv(device: str) -> list[str]:
    """``start-worker`` flags for the device its model computes on (none for the default, cpu)."""
    return [] if device == "cpu" else ["--device", device]


def worker_id(index: int) -> str:
    """The id of worker ``index`` in the runs psrv starts itself (``psrv run``, ``psrv cluster run``)."""
    return f"w{index}"


def worker_ids(num_workers: int) -> list[str]:
    """The ids of a run's ``num_workers`` workers, as :func:`worker_argv` gives them."""
    return [worker_id(i) for i in range(num_workers)]


def worker_argv(
    address: str,
    index: int,
    num_workers: int,
    dc: DataConfig,
    extra: Sequence[str] = (),
    verbose: bool = False,
    device: str = "cpu",
) -> list[str]:
    """The ``start-worker`` command of worker ``index`` of ``num_workers`` (shard ``index``)."""
    who = ("--worker-id", worker_id(index), "--shard", f"{index}/{num_workers}")
    return _start_worker_argv(address, who, dc, extra, verbose, device)


def host_argv(
    address: str,
    shards: range,
    num_workers: int,
    dc: DataConfig,
    extra: Sequence[str] = (),
    verbose: bool = False,
    device: str = "cpu",
) -> list[str]:
    """The ``start-worker`` command of a process hosting the logical workers ``shards`` of
    ``num_workers`` (virtual workers; ids ``w<i>``, shard i); one worker: :func:`worker_argv`."""
    if len(shards) == 1:
        return worker_argv(address, shards[0], num_workers, dc, extra, verbose, device)
    who = ("--shard", f"{shards[0]}-{shards[-1]}/{num_workers}")
    return _start_worker_argv(address, who, dc, extra, verbose, device)


def _start_worker_argv(
    address: str, who: Sequence[str], dc: DataConfig, extra: Sequence[str], verbose: bool, device: str
) -> list[str]:
    return psrv_argv(
        "start-worker", "--server", address, *who, *dc.argv(), *device_argv(device), *extra, verbose=verbose
    )


def host_blocks(num_workers: int, processes: int | None) -> list[range]:
    """The workers of each of ``processes`` worker processes: consecutive blocks of near-equal
    size (None, or as many as workers: one worker per process)."""
    p = num_workers if processes is None else max(1, min(processes, num_workers))
    size, rest = divmod(num_workers, p)
    starts = [i * size + min(i, rest) for i in range(p + 1)]
    return [range(starts[i], starts[i + 1]) for i in range(p)]


def server_argv(job: JobConfig, extra: Sequence[str] = (), verbose: bool = False) -> list[str]:
    """The ``start-server`` command of ``job``."""
    return psrv_argv("start-server", *job.argv(), *extra, verbose=verbose)


def default_task(data: str | None) -> str:
    """The task ``--task`` defaults to: the task whose own data ``--data`` names (``charlm``, a
    factory spec), the task a built-in data set is made for, else logreg."""
    if data:
        from psrv.tasks import TASKS, is_plugin_spec

        if is_plugin_spec(data) or getattr(TASKS.get(data), "own_data", None) is not None:
            return data
        from psrv.data import builtin_task_hint

        return builtin_task_hint(data) or "logreg"
    return "logreg"


def validate_job_data(job: JobConfig, dc: DataConfig, device: str = "cpu") -> tuple[Any, Any, int]:
    """Load the run's data once and build its task on it on ``device``, so a bad ``--data``, a task
    that does not fit the data, a factory whose model fails on it, or ``--device cuda`` without
    CUDA is a ``ValueError`` before any worker starts. Returns (train, test, the model's dimension)."""
    from psrv.data import load_split
    from psrv.tasks import make_task

    check_device(device)
    train, test = load_split(dc.data, dc.test_fraction, dc.seed, dc.regression)
    task = make_task(job.task, train.n_features, train.n_classes, device=device, **job.all_task_options())
    return train, test, int(task.dim)


def check_device(device: str) -> None:
    """``ValueError`` (one line) unless ``device`` is one this process can compute on (imports torch
    only for a device other than cpu)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device != "cpu":
        from psrv.tasks.torch_task import resolve_device

        resolve_device(device)


def check_job_data(job: JobConfig, dc: DataConfig, device: str = "cpu") -> tuple[Any, Any, int]:
    """:func:`validate_job_data` for a command: a problem is a usage error (one line, exit 2)."""
    try:
        return validate_job_data(job, dc, device)
    except ValueError as exc:  # DataError too
        raise click.UsageError(str(exc)) from None


def jobs(
    algorithms: Sequence[str],
    data: str | None = None,
    *,
    compressor: str,
    lr: float,
    options: Mapping[str, float],
    task: str | None,
    l2: float | None,
    task_options: Mapping[str, float],
    rounds: int,
    workers: int,
    round_timeout: float,
    seed: int,
    zstd: bool,
    downlink: str = "auto",
    down_compressor: str = "",
    transport: str = "stream",
    server_opt: str = "sgd",
    clip_norm: float = 0.0,
    min_workers: int = 1,
    quorum_wait: float | None = None,
    aggregate: str = "mean",
) -> list[JobConfig]:
    """One :class:`JobConfig` per algorithm from the parsed job options (``ValueError`` on a bad
    option). The task defaults to the one a built-in data set is made for, else logreg."""
    from psrv.algorithms import distribute_options, make_algorithm
    from psrv.tasks import check_task

    if task is None:
        task = default_task(data)
    check_task(task, {**({} if l2 is None else {"l2": l2}), **task_options})  # a bad factory fails here
    per_algorithm = distribute_options(algorithms, compressor, options)
    out = []
    for name in algorithms:
        job = JobConfig(
            algorithm=name,
            compressor=compressor,
            lr=lr,
            options=per_algorithm[name],
            task=task,
            l2=l2,
            task_options=dict(task_options),
            rounds=rounds,
            workers=workers,
            round_timeout=round_timeout,
            seed=seed,
            zstd=zstd,
            downlink=downlink,
            down_compressor=down_compressor,
            transport=transport,
            server_opt=server_opt,
            clip_norm=clip_norm,
            min_workers=min_workers,
            quorum_wait=quorum_wait,
            aggregate=aggregate,
        )
        job.server_config()  # every bad option fails before anything runs (a bad --down-compressor, --server-opt too)
        make_algorithm(name, job.algorithm_options(), compressor)  # every bad option fails before anything runs
        out.append(job)
    return out


# ---------------------------------------------------------------------------------- click
#: name -> click option. Commands pick groups of them; each declaration exists once.
_SEED = click.option("--seed", type=int, default=0, show_default=True, help="Seeds the model, data split and rngs.")

JOB_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "algorithms": click.option(
        "--algorithm",
        "algorithms",
        default=DEFAULT_ALGORITHMS,
        show_default=True,
        callback=_algorithm_list,
        help="One algorithm, or a comma-separated list to compare, run one after another.",
    ),
    "compressor": click.option("--compressor", default="", help="Uplink compressor (default: the algorithm's own)."),
    "lr": click.option("--lr", type=float, default=0.02, show_default=True, help="Step size alpha."),
    "options": click.option(
        "-o",
        "--option",
        "options",
        multiple=True,
        callback=_key_values,
        metavar="[ALGORITHM.]KEY=VALUE",
        help="Algorithm/compressor option, e.g. -o bits=3 -o ratio=0.01; -o topk-ef.ratio=0.05 for one "
        "algorithm of a comparison.",
    ),
    "task": click.option(
        "--task",
        default=None,
        metavar="NAME|FILE.py:FACTORY|MODULE:FACTORY",
        help="Model/objective: logreg, linreg, mlp, cnn, wide, charlm, or your own torch model: a factory "
        "returning psrv.TorchSpec (default: the task --data is made for, else logreg).",
    ),
    "l2": click.option(
        "--l2",
        type=float,
        default=None,
        help="L2 regularisation weight (default: the task's own: logreg 0.01, linreg 0, mlp 0).",
    ),
    "task_options": click.option(
        "-t",
        "--task-option",
        "task_options",
        multiple=True,
        callback=_key_values,
        metavar="KEY=VALUE",
        help="Task option, e.g. -t hidden=200 for mlp.",
    ),
    "rounds": click.option("--rounds", type=click.IntRange(min=0), default=500, show_default=True),
    "workers": click.option("--workers", type=click.IntRange(min=1), default=10, show_default=True),
    "round_timeout": click.option(
        "--round-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=10.0,
        show_default=True,
        help="Seconds a round waits for reports; a worker that misses it counts as skipping.",
    ),
    "seed": _SEED,
    "zstd": click.option("--zstd", is_flag=True, help="Workers zstd-compress each payload when that makes it smaller."),
    "downlink": click.option(
        "--downlink",
        type=click.Choice(["auto", "dense", "replica"]),
        default="auto",
        show_default=True,
        help="Model broadcast: dense, exact updates of the workers' replicas, or chosen per round.",
    ),
    "down_compressor": click.option(
        "--down-compressor",
        default="",
        metavar="NAME[:KEY=VALUE,...]",
        help="Compress the model broadcast with EF21-P, e.g. topk:ratio=0.05 or qsgd:levels=16 (default: none).",
    ),
    "server_opt": click.option(
        "--server-opt",
        default="sgd",
        show_default=True,
        metavar="NAME[:KEY=VALUE,...]",
        help="Server optimizer applied to the aggregate, with --lr as its step size: sgd, momentum[:momentum=0.9], "
        "adam[:beta1=0.9,beta2=0.999,eps=1e-8,bias_correction=1], adamw[:...,weight_decay=0.01] "
        "(Reddi et al., ICLR 2021), e.g. adam:beta2=0.99.",
    ),
    "clip_norm": click.option(
        "--clip-norm",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        metavar="C",
        help="Server-side defence: scale each upload down to L2 norm C at most before absorbing it (0: off). "
        "Meant for gradient uploads (gd, sgd, topk-ef, lag-wk, lasg, sasg, lag-ps); for accumulating rules "
        "(laq, slaq, ef21, riag, ciag) it clips the innovation, so the server's sum leaves the workers' own "
        "state: a different algorithm.",
    ),
    "min_workers": click.option(
        "--min-workers",
        type=click.IntRange(min=0),
        default=1,
        show_default=True,
        metavar="N",
        help="Fewer live workers than N (a worker is gone when its stream closes or it misses --round-timeout "
        "several times in a row) make the server wait --quorum-wait seconds for rejoins, then fail the run "
        "(exit 1, naming who is gone). 0: never fail for lack of workers.",
    ),
    "quorum_wait": click.option(
        "--quorum-wait",
        type=click.FloatRange(min=0),
        default=None,
        metavar="SECONDS",
        help="How long a run below --min-workers live workers waits for rejoins before it fails "
        "[default: 2 x --round-timeout].",
    ),
    "aggregate": click.option(
        "--aggregate",
        default="mean",
        show_default=True,
        metavar="mean|median|trimmed-mean[:beta=B]",
        help="Server-side defence against byzantine workers: the coordinate-wise median or trimmed mean "
        "(beta: the fraction cut at each end, default 0.1) of the workers' contributions, scaled as the sum "
        "(Yin et al., ICML 2018). For gd, sgd, lag-wk, lasg, lag-ps with dense uploads; refused for "
        "accumulating rules, error feedback and sparse uploads.",
    ),
    "transport": click.option(
        "--transport",
        type=click.Choice(["stream", "unary"]),
        default="stream",
        show_default=True,
        help="How workers run rounds: one persistent Rounds stream each, or GetModel + Push/Skip unary calls.",
    ),
}

DATA_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "data": click.option(
        "--data",
        default=None,
        help="Built-in data set (mnist, digits, breast_cancer, linreg-hetero, synthetic), a .csv/.npz file, "
        "or a task that brings its own data (charlm, FILE.py:FACTORY) [default: the task's own data, or the "
        "data set it is made for, else mnist].",
    ),
    "split": click.option(
        "--split",
        metavar="|".join(SPLITS) + "|dirichlet:ALPHA",
        default="iid",
        show_default=True,
        callback=_split,
        help="How the training data is cut into the workers' shards; dirichlet is Dirichlet(0.5) over each "
        "class's shares, dirichlet:ALPHA another concentration (dirichlet:0.1: strongly skewed).",
    ),
    "test_fraction": click.option(
        "--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True
    ),
    "seed": _SEED,
    "regression": click.option("--regression", is_flag=True, help="The data file's label column is a real target."),
}


#: What a worker process (and ``psrv run``'s evaluation) runs on: its own, not the job's (never sent
#: to the server); reaches ``start-worker`` through :func:`worker_argv`.
WORKER_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "device": click.option(
        "--device",
        type=click.Choice(DEVICES),
        default="cpu",
        show_default=True,
        help="Where the workers' torch model computes (cnn, wide, charlm, your own): cpu, cuda, or auto (cuda "
        "if available, else cpu); psrv run evaluates there too. logreg, linreg and mlp always run on the CPU.",
    ),
}


#: Server checkpoints (psrv.checkpoint): ``start-server`` and ``psrv run`` take them; not part of the job
#: (a resumed run may checkpoint elsewhere or more often).
CHECKPOINT_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "checkpoint_dir": click.option(
        "--checkpoint-dir",
        type=click.Path(file_okay=False),
        default=None,
        metavar="DIR",
        help="Save the server's whole state to DIR/checkpoint.npz (atomically) every --checkpoint-every rounds, "
        "after the last round and on SIGTERM/SIGINT (psrv run: DIR/<algorithm>/). Continue with start-server "
        "--resume DIR.",
    ),
    "checkpoint_every": click.option(
        "--checkpoint-every",
        type=click.IntRange(min=0),
        default=None,
        metavar="N",
        help="Rounds between checkpoints [default: 10, or the resumed checkpoint's; 0: only at the end and on "
        "SIGTERM/SIGINT].",
    ),
}


def pop_checkpoint(kw: dict[str, Any]) -> tuple[str | None, int | None]:
    """Take ``--checkpoint-dir`` and ``--checkpoint-every`` out of a command's keyword arguments."""
    return kw.pop("checkpoint_dir"), kw.pop("checkpoint_every")


def _apply(groups: Sequence[Mapping[str, Callable[[Any], Any]]]) -> Callable[[Any], Any]:
    def decorate(fn: Any) -> Any:
        merged: dict[str, Callable[[Any], Any]] = {}
        for group in groups:
            merged.update(group)  # an option in two groups (--seed) is declared once
        for option in reversed(list(merged.values())):
            fn = option(fn)
        return fn

    return decorate


job_options = _apply([JOB_OPTIONS])
data_options = _apply([DATA_OPTIONS, WORKER_OPTIONS])  # start-worker
job_and_data_options = _apply([JOB_OPTIONS, DATA_OPTIONS, WORKER_OPTIONS])  # run, cluster run
checkpoint_options = _apply([CHECKPOINT_OPTIONS])  # run, start-server


def pop_data(kw: dict[str, Any]) -> DataConfig:
    """Take the data options out of a command's keyword arguments (``--seed`` stays for the job).
    Without ``--data``: the data of the command's ``--task`` (:func:`psrv.tasks.default_data`)."""
    data = kw.pop("data")
    if data is None:
        data = "mnist"
        if kw.get("task") is not None:
            from psrv.tasks import default_data

            try:
                data = default_data(kw["task"])
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
    return DataConfig(
        data=data,
        split=kw.pop("split"),
        test_fraction=kw.pop("test_fraction"),
        seed=kw["seed"],
        regression=kw.pop("regression"),
    )


def pop_device(kw: dict[str, Any]) -> str:
    """Take ``--device`` out of a command's keyword arguments; without CUDA, ``--device cuda`` is a
    usage error (one line, exit 2)."""
    device = kw.pop("device")
    try:
        check_device(device)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return device


def jobs_from_cli(kw: dict[str, Any], data: str | None = None) -> list[JobConfig]:
    """The jobs of a command's job options (removed from ``kw``); bad options are usage errors."""
    names = [k for k in JOB_OPTIONS if k != "algorithms"]
    values = {k: kw.pop(k) for k in names}
    try:
        return jobs(kw.pop("algorithms"), data, **values)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


# ---------------------------------------------------------------------------------- the server's own
def _shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        f, c = (int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected F,C (features, classes; 0 classes: regression), got {value!r}") from None
    if f < 1 or c == 1 or c < 0:
        raise click.BadParameter(f"need F >= 1 and C >= 2 (or 0 for regression), got {value!r}")
    return f, c


def _id_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


#: ``start-server`` only: where the task's shape comes from, who may take a slot, and the server's limits
#: (README, "Limits"). ``psrv run`` and ``psrv cluster run`` derive shape and ids themselves.
SERVER_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "data": click.option(
        "--data",
        default=None,
        help="The data the workers train on (as start-worker's --data): the model's shape is derived from it. "
        "Default: the task's own data if it brings any, else --shape, else the first registration fixes it.",
    ),
    "regression": click.option("--regression", is_flag=True, help="The --data file's label column is a real target."),
    "shape": click.option(
        "--shape",
        default=None,
        callback=_shape,
        metavar="F,C",
        help="The model's shape: F features, C classes (0: regression); workers with other data are refused.",
    ),
    "max_dim": click.option(
        "--max-dim",
        type=click.IntRange(min=1),
        default=10_000_000,
        show_default=True,
        help="Largest model (parameters) a first registration may make the server allocate (without --data/--shape).",
    ),
    "worker_ids": click.option(
        "--worker-ids",
        default=None,
        callback=_id_list,
        metavar="ID,ID,...",
        help="Only these ids take worker slots (others: PERMISSION_DENIED). Default: any id, first come.",
    ),
    "max_id_bytes": click.option(
        "--max-id-bytes", type=click.IntRange(min=1), default=128, show_default=True, help="Longest worker id."
    ),
    "max_message_bytes": click.option(
        "--max-message-bytes",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Largest gRPC message received (0: derived from the model's dimension, 16 bytes per parameter + 1 MiB).",
    ),
    "calls_per_worker": click.option(
        "--max-calls-per-worker",
        "calls_per_worker",
        type=click.IntRange(min=1),
        default=4,
        show_default=True,
        help="Long-lived calls (model long polls, streams) one registered worker id may hold at once.",
    ),
    "anonymous_calls": click.option(
        "--max-anonymous-calls",
        "anonymous_calls",
        type=click.IntRange(min=1),
        default=16,
        show_default=True,
        help="Such calls that callers without a registered id (and upload streams) may hold at once, together.",
    ),
    "max_concurrent_calls": click.option(
        "--max-concurrent-calls",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Calls in progress at once, in all; gRPC refuses more (0: twice the server's threads, "
        "(calls per worker x workers + anonymous calls + 8)).",
    ),
    "stream_idle_timeout": click.option(
        "--stream-idle-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=60.0,
        show_default=True,
        help="Seconds an upload's stream may wait for its next piece before the server ends it.",
    ),
    "call_rate": click.option(
        "--max-call-rate",
        "call_rate",
        type=click.FloatRange(min=0),
        default=10_000.0,
        show_default=True,
        metavar="CALLS_PER_S",
        help="Calls per second one worker id may start (a Rounds stream is one call; 0: no limit). "
        "A worker makes one call per run (stream transport) or two per round (unary).",
    ),
    "anonymous_call_rate": click.option(
        "--max-anonymous-call-rate",
        "anonymous_call_rate",
        type=click.FloatRange(min=0),
        default=100.0,
        show_default=True,
        metavar="CALLS_PER_S",
        help="Calls per second from one host that name no registered or configured worker id "
        "(registrations, junk ids), together (0: no limit).",
    ),
    "call_burst": click.option(
        "--call-burst",
        type=click.IntRange(min=1),
        default=1000,
        show_default=True,
        help="Calls a caller may start at once above its rate (the anonymous burst is at least 2 x --workers).",
    ),
}

server_options = _apply([SERVER_OPTIONS])


def server_shape(task: str, data: str | None, shape: tuple[int, int] | None, regression: bool, seed: int) -> Any:
    """The model's shape a server is started with: ``shape``, else the shape of ``data`` (loaded once),
    else that of the task's own data, else None (the first registration fixes it). ``ValueError`` when
    ``shape`` and ``data`` disagree or the data cannot be loaded."""
    from psrv.data import load_split

    spec = data
    if spec is None and shape is None:
        from psrv.tasks import TASKS, is_plugin_spec, own_data

        brings = is_plugin_spec(task) or getattr(TASKS.get(task), "own_data", None) is not None
        spec = task if brings and own_data(task) is not None else None
    if spec is None:
        return shape
    train, _ = load_split(spec, 0.0, seed, regression)
    found = (train.n_features, train.n_classes)
    if shape is not None and tuple(shape) != found:
        raise ValueError(f"--shape {shape[0]},{shape[1]} does not match --data {spec}: {found[0]},{found[1]}")
    return found


def pop_server_options(kw: dict[str, Any], task: str, seed: int) -> tuple[dict[str, Any], Any]:
    """Take :data:`SERVER_OPTIONS` out of ``kw``: the engine's (``ServerConfig`` fields) and the
    transport's limits (:class:`psrv.limits.TransportLimits`); usage errors are one line."""
    from psrv.limits import TransportLimits

    data, regression, shape = kw.pop("data"), kw.pop("regression"), kw.pop("shape")
    try:
        task_shape = server_shape(task, data, shape, regression, seed)
    except ValueError as exc:  # DataError too
        raise click.UsageError(str(exc)) from None
    engine = {"task_shape": task_shape, "max_dim": kw.pop("max_dim"), "worker_ids": kw.pop("worker_ids"),
              "max_id_bytes": kw.pop("max_id_bytes")}  # fmt: skip
    names = ("max_message_bytes", "calls_per_worker", "anonymous_calls", "max_concurrent_calls", "stream_idle_timeout",
             "call_rate", "anonymous_call_rate", "call_burst")  # fmt: skip
    return engine, TransportLimits(**{k: kw.pop(k) for k in names})
