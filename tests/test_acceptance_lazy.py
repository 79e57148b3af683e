"""Claims of the lazy-aggregation papers, measured through the whole stack (worker processes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from psrv.data import linreg_hetero_smoothness
from psrv.runner import DataConfig, run_local
from psrv.server import ServerConfig
from tests.helpers.timeouts import PATIENT

pytestmark = [pytest.mark.slow, pytest.mark.process]


def _uploads_per_worker(metrics: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in metrics.read_text().splitlines():
        for w in json.loads(line)["workers"]:
            counts[w["id"]] = counts.get(w["id"], 0) + (w["status"] == "upload")
    return counts


def test_smooth_workers_upload_less_laq_proposition1(tmp_path: Path) -> None:
    """Sun et al., NeurIPS 2019, Proposition 1: worker m uploads at most k/(d_m + 1) times, d_m growing as L_m
    shrinks; on the heterogeneous linear regression (L_m = 1.69^m) LAQ's upload counts rise with L_m."""
    M = 10
    cfg = ServerConfig(algorithm="laq", options={"lr": 0.06}, task="linreg", num_workers=M, rounds=200, **PATIENT)
    s = run_local(cfg, DataConfig(data="linreg-hetero", split="contiguous", test_fraction=0.0), tmp_path)
    counts = _uploads_per_worker(tmp_path / "metrics.jsonl")
    uploads = np.array([counts[f"w{m}"] for m in range(M)])
    smooth = np.array([linreg_hetero_smoothness(m) for m in range(M)])
    assert s["skips"] > 0
    assert uploads[:3].sum() < uploads[-3:].sum()  # the three smoothest against the three roughest
    ranks = np.argsort(np.argsort(uploads)), np.argsort(np.argsort(smooth))
    assert np.corrcoef(*ranks)[0, 1] > 0.8  # Spearman rank correlation
