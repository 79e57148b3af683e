"""psrv's worker step against a plain local PyTorch training step on the same model and batch.

    python scripts/bench_worker_step.py                      # cnn (MNIST, batch 64) and wide (d ≈ 1e7)
    python scripts/bench_worker_step.py --models cnn --repeats 200 --device cpu

For each model, in one process and one run:

- ``plain``: what a user's own training loop does per step on the same batch: ``zero_grad``,
  forward, loss, backward, ``torch.optim.SGD.step`` (the batch already a tensor on the device).
- ``psrv/<algorithm>``: what a worker does per round after the model arrives (as in
  ``worker.client.run_worker``): draw the minibatch (``worker.client._Gradients``), the task's
  gradient (``local_loss_grad``: θ in, forward + backward, the gradient out as float64), the
  algorithm's step (trigger, error feedback, compression) and the encoding of the upload
  (``codec.upload_to_wire``). θ comes as the float32 array a broadcast carries. The server's step
  is not part of it (the plain step's ``optimizer.step`` is: the plain step is a whole local step).

Both are timed in interleaved repeats after ``--warmup`` untimed ones; the table gives medians.
``overhead`` = (psrv step − plain step) / plain step. The breakdown times the worker step's stages
one by one in the same repeats: ``batch`` (drawing and indexing the rows), ``theta in`` (θ into the
model's parameters: cast, host-to-device copy), ``fwd+bwd`` (the model's forward and backward
passes, as psrv runs them), ``grad out`` (the gradient to a float64 host array: device-to-host
copy and cast), ``algorithm`` and ``encode``; ``plain fwd+bwd`` is the plain step without its
optimizer step. ``psrv-only`` sums the stages other than fwd+bwd (the time psrv adds around the
model's own compute, less sensitive to noise than the difference of two whole steps) and ``of
plain`` gives it as a share of the plain step. torch and BLAS use ``--threads`` threads (a worker
uses one), and malloc is set up as in a worker process (:func:`psrv.memory.tune_malloc`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's psrv, not an installed one

import numpy as np  # noqa: E402
import threadpoolctl  # noqa: E402
import torch  # noqa: E402

from psrv import codec, data, memory  # noqa: E402
from psrv.algorithms import RoundInfo, make_algorithm  # noqa: E402
from psrv.tasks import make_task  # noqa: E402
from psrv.tasks.torch_task import resolve_device  # noqa: E402
from worker.client import _Gradients  # noqa: E402

STAGES = ("batch", "theta in", "fwd+bwd", "grad out", "algorithm", "encode")
# dense; LAQ with t_bar = 0, so every round uploads (the costlier round: a skipped round saves the
# encoding); top-k with error feedback (its default ratio)
ALGORITHMS = {"sgd": {}, "laq": {"t_bar": 0}, "topk-ef": {}}
LR = 0.01
WORKERS = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(model: str, width: int, device: str) -> tuple[object, data.Dataset, str]:
    """(task, the worker's shard, a description) of ``model`` as a 10-worker run would have it."""
    if model == "cnn":
        train, _ = data.load_split("mnist", 0.2, 0)
        task = make_task("cnn", train.n_features, train.n_classes, device=device)
        desc = "cnn (LeNet-5) on MNIST digits"
    elif model == "wide":
        train, _ = data.load_split("synthetic", 0.2, 0)
        task = make_task("wide", train.n_features, train.n_classes, device=device, width=width)
        desc = f"wide (width {width}) on synthetic"
    else:
        raise SystemExit(f"unknown model {model!r}: cnn or wide")
    return task, data.shard(train, 0, WORKERS, "iid", 0), desc


class Bench:
    """Plain and psrv steps on one model; every timing in seconds, one list per quantity."""

    def __init__(self, task: object, ds: data.Dataset, batch: int, algorithms: list[str]):
        self.task, self.ds, self.batch = task, ds, batch
        ad = task._adapter  # noqa: SLF001 - the benchmark looks inside on purpose
        self.ad, self.device = ad, ad.device
        rng = np.random.default_rng(0)
        self.theta = task.init_params(rng).astype(np.float32)  # as a float32 broadcast carries it
        self.mb = SimpleNamespace(num_workers=WORKERS, total_samples=WORKERS * len(ds))
        self.algos = {}
        for name in algorithms:
            algo = make_algorithm(name, {"lr": LR, "batch": batch, **ALGORITHMS.get(name, {})})
            self.algos[name] = (algo, algo.init(task.dim), np.random.default_rng(1))
        # the plain loop: its own copy of the model, the same θ, the batch on the device once
        import copy

        self.model = copy.deepcopy(ad.model)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(self.theta).to(self.device), self.model.parameters())
        for p in self.model.parameters():
            p.grad = None
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        rows = np.random.default_rng(2).choice(len(ds), batch, replace=False)
        X = np.ascontiguousarray(ds.X[rows], dtype=np.float32)
        self.x = torch.from_numpy(X).to(self.device)
        self.y = torch.from_numpy(ds.y[rows].astype(np.int64)).to(self.device)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.times: dict[str, list[float]] = {}

    def _add(self, key: str, seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)

    def plain(self, record: bool) -> None:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=False)
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        _sync(self.device)
        t1 = time.perf_counter()
        self.opt.step()
        float(loss.detach())  # a training loop reads its loss; psrv reports it with every upload
        _sync(self.device)
        t2 = time.perf_counter()
        if record:
            self._add("plain", t2 - t0)
            self._add("plain fwd+bwd", t1 - t0)

    def psrv(self, name: str, record: bool) -> None:
        """The worker step, whole (as run_worker does it)."""
        algo, state, rng = self.algos[name]
        t0 = time.perf_counter()
        grads = _Gradients(self.task, self.ds, self.mb, self.batch, rng)
        loss, grad = grads.loss_grad(self.theta)
        info = RoundInfo(0, WORKERS, (), self.theta, grads.grad_at)
        decision = algo.step(state, grad, info, rng)
        if decision.payload is not None:
            codec.upload_to_wire("w0", 0, loss, decision.payload)
        t1 = time.perf_counter()
        self.algos[name] = (algo, decision.state, rng)
        if record:
            self._add(f"psrv/{name}", t1 - t0)

    def staged(self, name: str, record: bool) -> None:
        """The same step, stage by stage (the adapter's own pieces), each timed."""
        algo, state, rng = self.algos[name]
        ad, dev = self.ad, self.device
        t = [time.perf_counter()]
        grads = _Gradients(self.task, self.ds, self.mb, self.batch, rng)
        t.append(time.perf_counter())
        ad._load(self.theta)  # noqa: SLF001
        _sync(dev)
        t.append(time.perf_counter())
        loss = ad._backward(grads.X, grads.y, grads.total)  # noqa: SLF001
        _sync(dev)
        t.append(time.perf_counter())
        grad = ad._grad_out()  # noqa: SLF001
        t.append(time.perf_counter())
        info = RoundInfo(0, WORKERS, (), self.theta, grads.grad_at)
        decision = algo.step(state, grad, info, rng)
        t.append(time.perf_counter())
        if decision.payload is not None:
            codec.upload_to_wire("w0", 0, loss, decision.payload)
        t.append(time.perf_counter())
        self.algos[name] = (algo, decision.state, rng)
        if record:
            for stage, a, b in zip(STAGES, t, t[1:], strict=False):
                self._add(f"{name}:{stage}", b - a)

    def run(self, repeats: int, warmup: int) -> None:
        for i in range(warmup + repeats):
            record = i >= warmup
            self.plain(record)
            for name in self.algos:
                self.psrv(name, record)
                self.staged(name, record)

    def median_ms(self, key: str) -> float:
        return 1e3 * statistics.median(self.times[key])


def report(b: Bench, desc: str, batch: int) -> list[str]:
    plain = b.median_ms("plain")
    lines = [
        f"### {desc}: d = {b.task.dim:,}, batch {batch}, device {b.device}",
        "",
        f"plain step (zero_grad, forward, backward, SGD step): **{plain:.3f} ms** "
        f"(of which forward + backward {b.median_ms('plain fwd+bwd'):.3f} ms)",
        "",
        "| psrv step | median ms | extra ms | overhead | " + " | ".join(STAGES) + " | psrv-only | of plain |",
        "|---|---:|---:|---:|" + "---:|" * len(STAGES) + "---:|---:|",
    ]
    for name in b.algos:
        step = b.median_ms(f"psrv/{name}")
        stages = " | ".join(f"{b.median_ms(f'{name}:{s}'):.3f}" for s in STAGES)
        own = sum(b.median_ms(f"{name}:{s}") for s in STAGES if s != "fwd+bwd")
        lines.append(
            f"| {name} | {step:.3f} | {step - plain:+.3f} | {100 * (step - plain) / plain:+.1f}% | {stages} "
            f"| {own:.3f} | {100 * own / plain:.1f}% |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,wide", help="comma-separated: cnn, wide")
    ap.add_argument("--batch", type=int, default=64, help="minibatch rows per step")
    ap.add_argument("--width", type=int, default=3072, help="wide's width (3072: d = 10,260,490)")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS), help="psrv algorithms to time")
    ap.add_argument("--repeats", type=int, default=100, help="timed repeats per model (wide: a tenth)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed repeats first (wide: a fifth)")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (a worker uses 1)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = ap.parse_args(argv)
    try:
        device = str(resolve_device(args.device))
    except ValueError as exc:
        ap.error(str(exc))
    memory.tune_malloc()  # as a worker process does (psrv.memory)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with threadpoolctl.threadpool_limits(args.threads, user_api="blas"):
            return _run(args, argv, device)
    finally:
        torch.set_num_threads(threads)  # as it was (the smoke test calls main in pytest's process)


def _run(args: argparse.Namespace, argv: list[str] | None, device: str) -> int:
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    out = [
        f"bench_worker_step: {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__} ({args.threads} thread(s)), numpy {np.__version__}, "
        f"python {platform.python_version()}",
        f"command: python scripts/bench_worker_step.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "",
    ]
    print("\n".join(out), flush=True)
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        task, ds, desc = build(model, args.width, device)
        small = model == "wide" and task.dim > 1_000_000
        repeats = max(1, args.repeats // 10) if small else args.repeats
        warmup = max(1, args.warmup // 5) if small else args.warmup
        bench = Bench(task, ds, args.batch, algorithms)
        bench.run(repeats, warmup)
        lines = [*report(bench, desc, args.batch), "", f"({repeats} timed repeats after {warmup} warm-up)", ""]
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
