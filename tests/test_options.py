"""Job options are declared once: every subcommand takes the same option set with the same
defaults, bad options name the valid ones, and comparisons take options per algorithm."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from psrv import data
from psrv.algorithms import distribute_options, make_algorithm, option_defaults
from psrv.cli import main
from psrv.options import DATA_OPTIONS, JOB_OPTIONS, SPLITS, WORKER_OPTIONS, DataConfig, JobConfig, parse_key_values

#: subcommand path -> the option groups it must take
COMMANDS = {
    ("run",): (JOB_OPTIONS, DATA_OPTIONS, WORKER_OPTIONS),
    ("start-server",): (JOB_OPTIONS,),
    ("start-worker",): (DATA_OPTIONS, WORKER_OPTIONS),
    ("cluster", "run"): (JOB_OPTIONS, DATA_OPTIONS, WORKER_OPTIONS),
}


def _command(path: tuple[str, ...]) -> click.Command:
    ctx = click.Context(main)
    cmd: click.Command = main
    for name in path:
        cmd = cmd.get_command(ctx, name)  # type: ignore[attr-defined]
    return cmd


def _declared(cmd: click.Command) -> dict[str, tuple]:
    return {
        p.name: (tuple(p.opts), p.default, repr(p.type), p.multiple if isinstance(p, click.Option) else False)
        for p in cmd.params
    }


def test_every_subcommand_takes_the_same_job_and_data_options() -> None:
    reference: dict[str, tuple] = {}
    for path, groups in COMMANDS.items():
        declared = _declared(_command(path))
        for group in groups:
            for name in group:
                assert name in declared, f"{' '.join(path)} lacks option {name}"
                reference.setdefault(name, declared[name])
                assert declared[name] == reference[name], (path, name)


def test_split_choices_are_the_data_modules() -> None:
    assert set(SPLITS) == set(data.SPLITS)


def test_parse_key_values() -> None:
    assert parse_key_values(["a=1", " b = 2.5"]) == {"a": 1.0, "b": 2.5}
    for bad in ["a", "=1", "a=x"]:
        with pytest.raises(ValueError, match="KEY=NUMBER"):
            parse_key_values([bad])


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown option badkey for gd; valid: batch, ef, lr"):
        make_algorithm("gd", {"badkey": 1})
    with pytest.raises(ValueError, match=r"valid: .*ratio"):
        make_algorithm("gd", {"bits": 3}, "topk")
    result = CliRunner().invoke(main, ["start-server", "--algorithm", "gd", "-o", "badkey=1"])
    assert result.exit_code == 2 and "unknown option 'badkey'" in result.output and "gd: batch, ef, lr" in result.output


def test_options_per_algorithm_of_a_comparison() -> None:
    per = distribute_options(["gd", "topk-ef", "laq"], "", {"ratio": 0.05, "laq.bits": 8, "lr": 0.1})
    assert per == {"gd": {"lr": 0.1}, "topk-ef": {"ratio": 0.05, "lr": 0.1}, "laq": {"bits": 8, "lr": 0.1}}
    with pytest.raises(ValueError, match="not among"):
        distribute_options(["gd"], "", {"laq.bits": 8})
    with pytest.raises(ValueError, match="unknown option 'nope'"):
        distribute_options(["gd", "laq"], "", {"nope": 1})
    assert option_defaults("slaq") == {"lr": 0.008, "bits": 3, "D": 10, "xi": -1.0, "t_bar": 100, "batch": 500}


def test_the_same_job_builds_the_same_server_everywhere() -> None:
    """`psrv run`, `start-server` and `cluster run` make ServerConfig through JobConfig: the l2
    default is the task's own in all of them (cluster run used to force 0.01)."""
    job = JobConfig(algorithm="gd", task="linreg")
    assert job.server_config().task_options == {}
    argv = job.argv()
    assert "--l2" not in argv and argv[argv.index("--task") + 1] == "linreg"
    assert DataConfig(split="contiguous", regression=True).argv()[-1] == "--regression"


def test_start_server_runs_one_algorithm() -> None:
    result = CliRunner().invoke(main, ["start-server", "--algorithm", "gd,laq"])
    assert result.exit_code == 2 and "a server runs one algorithm" in result.output


@pytest.mark.slow
@pytest.mark.process
def test_reused_out_folder_plots_only_this_runs_algorithms(tmp_path: Path) -> None:
    from psrv.plots import run_metrics

    common = ["run", "--data", "digits", "--workers", "1", "--rounds", "3", "--out", str(tmp_path)]  # one worker each
    for more in (["--algorithm", "gd,laq"], ["--algorithm", "topk-ef", "-o", "topk-ef.ratio=0.05"]):
        result = CliRunner().invoke(main, [*common, *more])
        assert result.exit_code == 0, result.output
    assert sorted(run_metrics(tmp_path)) == ["topk-ef"]  # gd/ and laq/ are still on disk, but not this run's
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (entry,) = manifest["runs"]
    assert entry["algorithm_options"] == {"lr": 0.02, "ef": True, "batch": 0, "ratio": 0.05, "k": 0}
    assert entry["task_options"] == {"l2": 0.01} and entry["data"]["data"] == "digits"
    assert manifest["psrv_version"] and entry["server"]["seed"] == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["algorithm_options"] == entry["algorithm_options"]


def _job_from(path: tuple[str, ...], args: list[str]):
    from psrv.options import jobs_from_cli, pop_data

    cmd = _command(path)
    params = dict(cmd.make_context(path[-1], list(args)).params)  # click consumes the list
    dc = pop_data(params) if "split" in params else None  # start-server's --data only gives the shape
    return jobs_from_cli(params, dc.data if dc else None)[0], dc


def test_cluster_and_run_train_the_same_objective(tmp_path: Path) -> None:
    """`psrv cluster run --task linreg` and `psrv run --task linreg` build the same server (the
    cluster used to force l2 = 0.01 where run used linreg's 0), and the start-server command line
    the cluster hands to its server host rebuilds exactly that configuration."""
    from psrv.cluster.config import ClusterConfig
    from psrv.cluster.run import server_argv

    args = [
        "--algorithm",
        "laq",
        "--task",
        "linreg",
        "--data",
        "linreg-hetero",
        "--split",
        "contiguous",
        "-o",
        "bits=8",
    ]
    run_job, run_dc = _job_from(("run",), args)
    cluster_job, cluster_dc = _job_from(("cluster", "run"), args)
    assert run_job == cluster_job and run_dc == cluster_dc
    assert run_job.server_config().task_options == {}  # linreg's own l2 = 0
    argv = server_argv(ClusterConfig(job=cluster_job, data=cluster_dc), "10.0.0.1", tmp_path)
    server_args = argv[1 : argv.index("--host")]
    server_job, _ = _job_from(("start-server",), server_args)
    assert server_job.server_config() == run_job.server_config()
    # and the server owns the shape and the ids, from the same data as the workers
    rest = argv[argv.index("--host") :]
    assert rest[rest.index("--data") + 1] == "linreg-hetero"
    assert rest[rest.index("--worker-ids") + 1] == ",".join(f"w{i}" for i in range(10))  # 10: the default


def test_liveness_options_reach_the_server_through_its_command_line() -> None:
    """--min-workers and --quorum-wait are job options: `psrv run`/`cluster run` hand them to the
    start-server command they build, which rebuilds the same ServerConfig."""
    job, _ = _job_from(("run",), ["--algorithm", "gd", "--workers", "4", "--min-workers", "3", "--quorum-wait", "7.5"])
    config = job.server_config()
    assert (config.min_workers, config.quorum_wait) == (3, 7.5)
    server_job, _ = _job_from(("start-server",), job.argv())
    assert server_job.server_config() == config
    default, _ = _job_from(("start-server",), ["--algorithm", "gd"])
    assert (default.min_workers, default.quorum_wait) == (1, None) and "--min-workers" not in default.argv()


def test_split_takes_a_dirichlet_concentration() -> None:
    """`--split dirichlet:0.1` reaches the workers' command line as given (they parse it in
    psrv.data.shard); a malformed one is a one-line usage error naming the flag."""
    _, dc = _job_from(("run",), ["--split", "dirichlet:0.1"])
    argv = dc.argv()
    assert argv[argv.index("--split") + 1] == "dirichlet:0.1"
    for bad, said in [
        ("dirichlet:0", "finite number > 0"),
        ("dirichlet:", "ALPHA must be"),
        ("iid:2", "unknown split"),
    ]:
        result = CliRunner().invoke(main, ["run", "--split", bad])
        assert result.exit_code == 2 and "--split" in result.output and said in result.output, result.output
