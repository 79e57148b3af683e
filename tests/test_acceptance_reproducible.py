"""Same seed, same result: worker processes register in whatever order the OS starts them, yet two
runs with one seed give bit-identical models and per-round figures for every stochastic algorithm
(each worker's rng is seeded from its shard, not from its registration index)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from psrv.options import DataConfig
from psrv.runner import run_local
from psrv.server import ServerConfig
from tests.helpers.timeouts import PATIENT

pytestmark = [pytest.mark.slow, pytest.mark.process]

DIGITS = DataConfig(data="digits", test_fraction=0.2, seed=5)
#: the deterministic parts of a round's record (timings differ from run to run)
KEYS = ("round", "uploads", "skips", "deadline_misses", "payload_bits", "bytes_up", "loss", "step_sq")


def _run(tmp: Path, algorithm: str, options: dict[str, float], compressor: str = "") -> tuple[np.ndarray, list]:
    cfg = ServerConfig(
        algorithm=algorithm,
        compressor=compressor,
        options=options,
        num_workers=3,  # registering in any of 6 orders (each worker process: ~2.5 s of CPU, mostly importing torch)
        rounds=12,
        seed=5,
        **PATIENT,  # a passed deadline would make the two runs differ
    )
    summary = run_local(cfg, DIGITS, tmp)
    assert summary["deadline_misses"] == 0 and summary["worker_exit_codes"] == [0] * 3
    records = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]
    per_worker = [[(w["id"], w["status"], w["bits"]) for w in r["workers"]] for r in records]
    return np.load(tmp / "model.npy"), [[r[k] for k in KEYS] for r in records] + per_worker


@pytest.mark.parametrize(
    "algorithm, options, compressor",
    [
        # one of each way a worker draws from its rng: minibatches (sgd), minibatches with a lazy rule
        # and error feedback (sasg), a stochastic compressor (qsgd), a random sample of rows (riag);
        # slaq, lasg and topk-ef draw their minibatches as sgd does (worker.client._Gradients)
        ("sgd", {"lr": 0.05, "batch": 20}, ""),
        ("sasg", {"lr": 0.05, "batch": 20}, ""),
        ("gd", {"lr": 0.05}, "qsgd"),
        ("riag", {"lr": 0.05, "s": 2}, ""),
    ],
)
def test_two_runs_with_one_seed_are_bit_identical(
    tmp_path: Path, algorithm: str, options: dict[str, float], compressor: str
) -> None:
    model_a, rec_a = _run(tmp_path / "a", algorithm, options, compressor)
    model_b, rec_b = _run(tmp_path / "b", algorithm, options, compressor)
    assert model_a.tobytes() == model_b.tobytes()
    assert rec_a == rec_b
