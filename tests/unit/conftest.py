"""Fixtures shared by the unit tests."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mailserver import admin


@pytest.fixture
def run(capsys, monkeypatch):
    """run(config, *argv, stdin=None) -> (exit code, stdout, stderr) of mailserver-admin,
    in this process (a module may define its own `run` instead)."""
    def run(config: Path, *argv: str, stdin: str | None = None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = admin.main(["--config", str(config), *argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run
