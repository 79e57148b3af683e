"""Run a command-line tool from the dev extra on the repository, skipping when it is not installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_tool(name: str, *args: str, install_hint: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} is not installed ({install_hint})")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
