"""--device cpu|cuda|auto: declared once (psrv.options), reaching workers on their command line and
psrv run's evaluation; torch tasks compute there with one copy of θ in and one of the gradient out.
The CPU path is tested everywhere; the tests marked ``cuda`` need a GPU and skip without one
(``scripts/gpu_check.sh`` runs them where one exists)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from psrv import options
from psrv.cli import main
from psrv.options import DataConfig, JobConfig, device_argv, worker_argv
from psrv.tasks import check_task, make_task, task_option_defaults
from psrv.tasks import torch_task as tt

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process sees no GPU, whatever the machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _problem(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 64)), rng.integers(0, 10, size=n)


# ------------------------------------------------------------------ resolving
def test_devices_are_declared_once() -> None:
    assert options.DEVICES == tt.DEVICES


def test_resolve_cpu_and_auto_without_cuda(no_cuda: None) -> None:
    assert tt.resolve_device("cpu") == torch.device("cpu")
    assert tt.resolve_device("auto") == torch.device("cpu")
    assert tt.resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_picks_cuda_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tt.resolve_device("auto") == torch.device("cuda")


def test_cuda_without_cuda_is_one_clear_line(no_cuda: None) -> None:
    with pytest.raises(ValueError, match=r"^--device cuda: CUDA is not available \(.*\); use --device cpu or auto$"):
        tt.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        tt.resolve_device("tpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        make_task("cnn", 64, 10, device="cuda")


# ------------------------------------------------------------------ tasks
def test_device_is_not_a_task_option() -> None:
    assert "device" not in task_option_defaults("cnn")
    with pytest.raises(ValueError, match="unknown option"):
        check_task("cnn", {"device": 1.0})


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_and_auto_give_the_default_tasks_numbers(device: str, no_cuda: None) -> None:
    ref = make_task("cnn", 64, 10, precision=64)
    task = make_task("cnn", 64, 10, device=device, precision=64)
    assert task._adapter.device == torch.device("cpu")
    theta = ref.init_params(np.random.default_rng(3))
    np.testing.assert_array_equal(task.init_params(np.random.default_rng(3)), theta)
    X, y = _problem()
    loss, grad = task.local_loss_grad(theta, X, y, 40, 4)
    ref_loss, ref_grad = ref.local_loss_grad(theta, X, y, 40, 4)
    np.testing.assert_array_equal(grad, ref_grad)
    assert loss == ref_loss
    assert task.loss(theta, X, y) == ref.loss(theta, X, y)
    assert task.accuracy(theta, X, y) == ref.accuracy(theta, X, y)


def test_cpu_path_copies_nothing_twice() -> None:
    """On the CPU θ is cast straight into the parameters' flat buffer and the gradient is cast
    once out of the gradient buffer into a fresh float64 array (nothing pinned, no staging)."""
    ad = make_task("cnn", 64, 10)._adapter
    assert ad.host_theta is ad.flat and ad.host_grad is ad.gflat
    theta = np.random.default_rng(0).normal(size=ad.dim).astype(np.float32)
    X, y = _problem()
    _, g1 = ad.local_loss_grad(theta, X, y, 40, 4)
    np.testing.assert_array_equal(ad.flat.numpy(), theta)
    assert g1.dtype == np.float64 and not np.shares_memory(g1, ad.gflat.numpy())
    _, g2 = ad.local_loss_grad(theta * 2, X, y, 40, 4)
    assert not np.shares_memory(g1, g2)  # each call's gradient is its own (LASG holds two)


def test_init_params_do_not_depend_on_the_last_theta() -> None:
    """θ⁰ comes from the factory's module, not from whatever θ the adapter last computed at."""
    task = make_task("cnn", 64, 10, precision=64)
    first = task.init_params(np.random.default_rng(0))
    task.local_loss_grad(np.full(task.dim, 7.0), *_problem(), 40, 4)
    np.testing.assert_array_equal(task.init_params(np.random.default_rng(0)), first)


def test_numpy_tasks_ignore_the_device() -> None:
    assert make_task("logreg", 4, 3, device="auto").dim == make_task("logreg", 4, 3).dim


# ------------------------------------------------------------------ options
def test_device_reaches_workers_on_their_command_line() -> None:
    dc = DataConfig(data="digits")
    assert "--device" not in worker_argv("h:1", 0, 2, dc)
    argv = worker_argv("h:1", 0, 2, dc, device="auto")
    assert argv[argv.index("--device") + 1] == "auto"
    assert device_argv("cpu") == [] and device_argv("cuda") == ["--device", "cuda"]
    from psrv.cluster.config import ClusterConfig
    from psrv.cluster.run import worker_argv as cluster_worker_argv

    args = cluster_worker_argv(ClusterConfig(job=JobConfig(workers=2), device="auto"), 1, "10.0.0.1:50051")
    assert args[args.index("--device") + 1] == "auto"
    cmd = main.commands["start-worker"]
    ctx = cmd.make_context("start-worker", args[1:])  # every option exists and parses
    assert ctx.params["device"] == "auto"


@pytest.mark.parametrize("command", [["run"], ["start-worker", "--server", "h:1", "--worker-id", "w0"]])
def test_cuda_without_cuda_is_a_usage_error(command: list[str], no_cuda: None) -> None:
    r = CliRunner().invoke(main, [*command, "--device", "cuda", "--data", "digits"])
    assert r.exit_code == 2, r.output
    assert "--device cuda: CUDA is not available" in r.output


@pytest.mark.slow
@pytest.mark.process
def test_run_with_device_auto_end_to_end(tmp_path: Path) -> None:
    """Workers get --device auto on their command line; the run trains and says where."""
    r = CliRunner().invoke(
        main,
        [
            "run",
            *("--task", "cnn", "--data", "digits", "--algorithm", "sgd", "--lr", "0.1"),
            *("--workers", "2", "--rounds", "3", "--device", "auto", "--eval-every", "0"),
            *("--out", str(tmp_path)),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "manifest.json").read_text())["device"] == "auto"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["worker_exit_codes"] == [0, 0] and np.isfinite(summary["final_loss"])


# ------------------------------------------------------------------ CUDA (skipped without a GPU)
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["cnn", "wide"])
def test_cuda_gradient_equals_cpu(name: str) -> None:
    cpu = make_task(name, 64, 10, precision=64)
    gpu = make_task(name, 64, 10, precision=64, device="cuda")
    ad = gpu._adapter
    assert ad.flat.is_cuda and ad.gflat.is_cuda and ad.host_grad.is_pinned() and ad.host_theta.is_pinned()
    theta = cpu.init_params(np.random.default_rng(0))
    np.testing.assert_array_equal(gpu.init_params(np.random.default_rng(0)), theta)  # drawn on the CPU
    X, y = _problem(40)
    loss, grad = gpu.local_loss_grad(theta, X, y, 80, 4)
    ref_loss, ref_grad = cpu.local_loss_grad(theta, X, y, 80, 4)
    assert grad.dtype == np.float64 and isinstance(grad, np.ndarray)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert loss == pytest.approx(ref_loss, rel=1e-9)
    assert gpu.accuracy(theta, X, y) == pytest.approx(cpu.accuracy(theta, X, y))


@pytest.mark.cuda
@needs_cuda
def test_cuda_one_device_to_host_copy_of_the_gradient() -> None:
    """Per gradient: θ goes host→device once, the gradient device→host once (plus the 8-byte loss)."""
    from torch.profiler import ProfilerActivity, profile

    task = make_task("cnn", 64, 10, device="cuda")
    theta = task.init_params(np.random.default_rng(0)).astype(np.float32)
    X, y = _problem(64)
    task.local_loss_grad(theta, X, y, 640, 10)  # warm up; the batch is cached while X is the same
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        task.local_loss_grad(theta, X, y, 640, 10)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    dtoh = [n for n in names if "DtoH" in n or "Device -> Pinned" in n or "Device -> Pageable" in n]
    htod = [n for n in names if "HtoD" in n or "Pinned -> Device" in n or "Pageable -> Device" in n]
    assert 1 <= len(dtoh) <= 2, names  # the gradient, and the loss scalar
    assert len(htod) == 1, names  # θ


@pytest.mark.cuda
@needs_cuda
@pytest.mark.slow
@pytest.mark.process
def test_cuda_workers_train_through_grpc() -> None:
    import psrv

    result = psrv.run(task="cnn", algorithm="sgd", data="digits", workers=2, rounds=5, lr=0.1, device="cuda")
    assert np.isfinite(result.summary["final_loss"])
