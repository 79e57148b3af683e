"""``buf lint`` (buf.yaml: the STANDARD rules and a comment on every service, RPC, message and enum)
finds nothing in protos/. buf comes with the dev extra (``buf-bin``); without it the test skips."""

from __future__ import annotations

from tests.helpers.tools import run_tool


def test_buf_lint_is_clean() -> None:
    res = run_tool("buf", "lint", install_hint="pip install buf-bin")
    assert res.returncode == 0 and not res.stdout.strip(), f"buf lint:\n{res.stdout}{res.stderr}"
