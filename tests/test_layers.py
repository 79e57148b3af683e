"""Imports point one way (core <- codec <- {server, worker}): the import-linter contracts in
pyproject.toml, checked on the package as it is."""

from __future__ import annotations

from tests.helpers.tools import run_tool


def test_import_contracts_are_kept() -> None:
    res = run_tool("lint-imports", "--no-cache", install_hint="pip install import-linter; it is in the dev extra")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout
