"""psrv.tasks.plugin: a user's factory as a task. Bad factories are refused with one line before any
worker starts; a user-file task trains end to end through real gRPC with gd, laq, sasg, topk-ef."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from psrv import data
from psrv.cli import main
from psrv.server import ParameterServer, ServerConfig
from psrv.tasks import check_task, default_data, is_plugin_spec, make_task, own_data, task_option_defaults
from tests.helpers.threaded import run_in_threads
from tests.helpers.timeouts import PATIENT
from worker.client import load_training_data

EXAMPLE = "examples/my_model.py:make"

BAD = textwrap.dedent(
    """
    import torch
    from torch import nn
    from psrv import TorchSpec

    def _data():
        return torch.utils.data.TensorDataset(torch.randn(10, 2), torch.randint(0, 2, (10,)))

    def wrong_type():
        return nn.Linear(2, 2), nn.CrossEntropyLoss()

    class Grows(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            self.w = nn.Parameter(torch.zeros(5))  # a new, bigger parameter on every call
            return x + self.w[:2]

    def grows():
        return TorchSpec(Grows(), nn.CrossEntropyLoss(), _data(), _data())

    class IntParam(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.steps = nn.Parameter(torch.zeros(1, dtype=torch.int64), requires_grad=False)

        def forward(self, x):
            return self.lin(x)

    def int_param():
        return TorchSpec(IntParam(), nn.CrossEntropyLoss(), _data())

    def lazy():
        return TorchSpec(nn.LazyLinear(2), nn.CrossEntropyLoss(), _data())

    def raises():
        raise RuntimeError("no GPU here")

    def bad_loss():
        return TorchSpec(nn.Linear(2, 2), lambda out, t: out.sum(dim=1), _data())

    def no_loss():
        return TorchSpec(nn.Linear(2, 2), None, _data())

    CONSTANT = 3
    """
)


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("factories") / "bad.py"
    path.write_text(BAD)
    return path


@pytest.mark.parametrize(
    "attr, message",
    [
        ("wrong_type", "the factory must return psrv.TorchSpec.*got tuple"),
        ("grows", r"parameters changed during a forward pass \(\[\(3,\)\] -> \[\(5,\)\]\)"),
        ("int_param", "parameter 'steps' has dtype torch.int64; psrv needs floating-point parameters"),
        ("lazy", "'weight' is uninitialised \\(a lazy module\\)"),
        ("raises", "the factory raised RuntimeError: no GPU here"),
        ("bad_loss", "the loss must return a scalar tensor"),
        ("no_loss", "TorchSpec.loss must be callable"),
        ("CONSTANT", "is not callable \\(a int\\)"),
        ("missing", "has no attribute 'missing' \\(callables: .*grows"),
    ],
)
def test_bad_factories_are_one_line_errors(bad_file: Path, attr: str, message: str) -> None:
    spec = f"{bad_file}:{attr}"
    with pytest.raises(ValueError, match=message) as info:
        check_task(spec, {})
    assert str(info.value).startswith(f"task {spec}") and "\n" not in str(info.value)


def test_bad_sources() -> None:
    with pytest.raises(ValueError, match="no such file 'nowhere/x.py'"):
        check_task("nowhere/x.py:make", {})
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        check_task("no_such_pkg.mod:make", {})
    with pytest.raises(ValueError, match="unknown task 'nope'.*path/to/file.py:factory"):
        check_task("nope", {})
    with pytest.raises(ValueError, match="unknown option.*hidden; valid: l2, precision"):
        check_task(EXAMPLE, {"hidden": 3})
    assert task_option_defaults(EXAMPLE) == {"l2": 0.0, "precision": 32}


def test_spec_forms() -> None:
    for spec in ("a.py:make", "dir/a.py:make", "pkg.mod:make", "mod:f_1", "./x/y:f"):
        assert is_plugin_spec(spec), spec
    for spec in ("logreg", "a.py", "a.py:", "a.py:1x", "mnist", "x.csv"):
        assert not is_plugin_spec(spec), spec


def test_module_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(Path("examples/my_model.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    task = make_task("mypkg.models:make", 1, 2)
    assert task.dim == make_task(EXAMPLE, 1, 2).dim
    train, test = own_data("mypkg.models:make")
    assert (len(train), len(test)) == (800, 200)
    assert default_data("mypkg.models:make") == "mypkg.models:make"
    monkeypatch.delitem(sys.modules, "mypkg.models", raising=False)


def test_own_data_and_its_defaults() -> None:
    train, test = load_training_data(EXAMPLE, 0.5, 0)  # the factory's own test set; test_fraction unused
    assert train.X.shape == (800, 1) and test.X[0, 0] == 800 and train.n_classes == 2
    assert default_data(EXAMPLE) == EXAMPLE and default_data("cnn") == "mnist" and default_data(None) == "mnist"
    with pytest.raises(data.DataError, match="brings no data of its own"):
        load_training_data("logreg", 0.2, 0)
    with pytest.raises(ValueError, match="brings its own data.*start workers with --data"):
        make_task(EXAMPLE, 784, 10)  # a worker that loaded mnist instead


@pytest.mark.parametrize("command", ["run", "start-server"])
def test_cli_refuses_a_bad_factory_before_any_worker_starts(bad_file: Path, command: str, tmp_path: Path) -> None:
    args = [command, "--task", f"{bad_file}:grows", "--rounds", "2", "--workers", "2"]
    if command == "run":
        args += ["--out", str(tmp_path / "out"), "--algorithm", "gd"]
    else:
        args += ["--algorithm", "gd", "--port", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "parameters changed during a forward pass" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("algorithm", ["gd", "laq", "sasg", "topk-ef"])
def test_user_file_task_end_to_end_through_grpc(algorithm: str) -> None:
    M, rounds = 3, 15
    train, test = load_training_data(EXAMPLE, 0.2, 0)
    shards = [data.shard(train, i, M, "iid", 0) for i in range(M)]
    options = {"lr": 0.5, **({"batch": 64.0} if algorithm == "sasg" else {})}
    cfg = ServerConfig(algorithm=algorithm, options=options, task=EXAMPLE, num_workers=M, rounds=rounds, **PATIENT)
    ps = ParameterServer(cfg)
    summary, results = run_in_threads(ps, shards)  # the shards are given: no data to load
    assert summary["rounds"] == rounds and summary["uploads"] + summary["skips"] == M * rounds
    task = make_task(EXAMPLE, train.n_features, train.n_classes)
    theta0 = task.init_params(np.random.default_rng(0))
    assert task.loss(ps.theta, train.X, train.y) < 0.8 * task.loss(theta0, train.X, train.y)
    assert task.accuracy(ps.theta, test.X, test.y) > 0.8
    for r in results:  # every worker ends with the server's model
        np.testing.assert_allclose(r.final_params, ps.theta, rtol=0, atol=1e-6)
