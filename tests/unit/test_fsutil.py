"""fsutil.write_durably: the one way small files are replaced; and the log bridge that
carries the disk modules' standard-library log records into the server's log."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from mailserver import logbridge
from mailserver.fsutil import write_durably


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    assert write_durably(target, b"new", mode=0o640)
    assert target.read_bytes() == b"new"
    assert os.stat(target).st_mode & 0o777 == 0o640
    assert _leftovers(tmp_path) == []


def test_keep_existing_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    assert write_durably(target, b"first", keep_existing=True)
    assert not write_durably(target, b"second", keep_existing=True)
    assert target.read_bytes() == b"first"
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "list"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_durably(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_given_temporary_name_is_used_and_must_be_free(tmp_path: Path) -> None:
    target, tmp = tmp_path / "dovecot-uidlist", tmp_path / "dovecot-uidlist.tmp"
    tmp.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        write_durably(target, b"x", tmp=tmp)
    assert tmp.read_bytes() == b"someone else's" and not target.exists()
    tmp.unlink()
    assert write_durably(target, b"x", tmp=tmp)
    assert target.read_bytes() == b"x" and not tmp.exists()


def test_standard_logging_reaches_the_twisted_log() -> None:
    events: list[dict] = []
    logbridge.install()
    logbridge.install()   # idempotent: one handler, one event per record
    globalLogPublisher.addObserver(events.append)
    try:
        logging.getLogger("mailserver.maildir.index").warning("index %s damaged", "/x")
        logging.getLogger("mailserver.maildir.index").debug("not forwarded")
    finally:
        globalLogPublisher.removeObserver(events.append)
    ours = [e for e in events if e.get("log_namespace") == "mailserver.maildir.index"]
    assert len(ours) == 1
    assert ours[0]["log_level"] == LogLevel.warn and ours[0]["text"] == "index /x damaged"
