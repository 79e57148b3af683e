"""The foundation issue's claim on the default task (MNIST logistic regression, M = 10,
same rounds and step size): LAQ reaches GD's loss within 1% with at most 10% of GD's
uplink bytes, and really skips uploads. An acceptance test (a claim, not one module): 10 worker
processes, 300 rounds, twice; the lazy-aggregation papers' claims are in test_acceptance_lazy.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from psrv.runner import DataConfig, run_local
from psrv.server import ServerConfig
from tests.helpers.timeouts import PATIENT

pytestmark = [pytest.mark.slow, pytest.mark.process]


def test_laq_reaches_gd_loss_with_a_tenth_of_the_uplink(tmp_path: Path) -> None:
    runs = {
        name: run_local(
            ServerConfig(algorithm=name, options={"lr": 0.02}, num_workers=10, rounds=300, **PATIENT),
            DataConfig(),
            tmp_path / name,
        )
        for name in ("gd", "laq")
    }
    gd, laq = runs["gd"], runs["laq"]
    assert laq["final_loss"] <= 1.01 * gd["final_loss"]
    assert laq["bytes_up"] <= 0.10 * gd["bytes_up"]
    assert laq["skips"] > 0 and gd["skips"] == 0
