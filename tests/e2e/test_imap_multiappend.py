"""RFC 3502 MULTIAPPEND against a real server: several messages in one APPEND with
synchronising and non-synchronising literals, APPENDUID with a uid set (RFC 4315), all
or nothing when one message is refused, and the bound on messages per command."""

from __future__ import annotations

import re

import pytest

from imap_helpers import (
    Lit,
    RawIMAP,
    close_quietly,
    message_files,
    module_server,
    new_user,
)

MAX_MESSAGE_SIZE = 64 * 1024
imap_server = module_server(max_message_size=MAX_MESSAGE_SIZE)


def msg(n: int, size: int = 0) -> bytes:
    return (f"From: a@remote.test\r\nSubject: message {n}\r\n"
            f"Message-ID: <multi-{n}@remote.test>\r\n\r\nbody {n}\r\n").encode() + b"x" * size


@pytest.fixture
def user(imap_server):
    return new_user(imap_server, "multi")


def stored(server, user: str) -> list[bytes]:
    return sorted(p.read_bytes() for p in message_files(server.maildir(user)))


def test_capability(imap_server, user):
    c = RawIMAP.login(imap_server, user)
    try:
        assert "MULTIAPPEND" in c.capabilities()
    finally:
        close_quietly(c)


@pytest.mark.parametrize("non_sync", [False, True], ids=["synchronising", "literal+"])
def test_three_messages_in_one_command(imap_server, user, non_sync):
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.command_parts([b"APPEND INBOX (\\Seen) ", Lit(msg(1)), b" ", Lit(msg(2)),
                             b' (\\Flagged) "02-Jan-2024 08:00:00 +0100" ', Lit(msg(3))],
                            non_sync=non_sync)
        assert r.status == "OK", str(r)
        assert len(r.continuations) == (0 if non_sync else 3), str(r)
        validity, uids = r.codes()["APPENDUID"].split()
        assert uids == b"1:3", str(r)
        c.select("INBOX")
        rows = c.fetch("1:3", "(UID FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert [b"message %d" % n in rows[n]["BODY[HEADER.FIELDS (SUBJECT)]"]
                for n in (1, 2, 3)] == [True] * 3
        flags = {n: {bytes(f) for f in rows[n]["FLAGS"]} - {b"\\Recent"} for n in (1, 2, 3)}
        assert flags == {1: {b"\\Seen"}, 2: set(), 3: {b"\\Flagged"}}
        assert rows[3]["INTERNALDATE"] == b"02-Jan-2024 07:00:00 +0000"
    finally:
        close_quietly(c)


def test_refused_message_stores_none(imap_server, user):
    c = RawIMAP.login(imap_server, user)
    try:
        # The third literal is over the size limit: refused before it is sent (tagged NO
        # instead of a continuation), and the two before it are not kept.
        r = c.command_parts([b"APPEND INBOX ", Lit(msg(1)), b" ", Lit(msg(2)), b" ",
                             Lit(msg(3, MAX_MESSAGE_SIZE))])
        assert r.status == "NO" and r.code == b"TOOBIG", str(r)
        assert len(r.continuations) == 2, str(r)
        assert c.command("NOOP").status == "OK"
        # An empty message cancels the whole command (RFC 3502 6.3.11).
        r = c.command_parts([b"APPEND INBOX ", Lit(msg(1)), b" ", Lit(b"")], non_sync=True)
        assert r.status == "NO", str(r)
        # A bad flag on a later message: BAD, nothing kept.
        r = c.command_parts([b"APPEND INBOX ", Lit(msg(1)), b" (\\Nonsense) ", Lit(msg(2))],
                            non_sync=True)
        assert r.status == "BAD", str(r)
        assert c.command("STATUS INBOX (MESSAGES)").with_prefix(b"STATUS ") == [
            b"INBOX (MESSAGES 0)"]
    finally:
        close_quietly(c)
    assert stored(imap_server, user) == []
    assert list((imap_server.maildir(user) / "tmp").iterdir()) == []


def test_other_sessions_see_the_messages(imap_server, user):
    watcher = RawIMAP.login(imap_server, user, select="INBOX")
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.command_parts([b"APPEND INBOX ", Lit(msg(1)), b" ", Lit(msg(2))], non_sync=True)
        assert r.status == "OK", str(r)
        r = watcher.command("NOOP")
        assert 2 in r.numbers(b"EXISTS"), str(r)
    finally:
        close_quietly(c)
        close_quietly(watcher)


def test_message_count_is_bounded(imap_server, user):
    c = RawIMAP.login(imap_server, user)
    try:
        parts: list[bytes] = [b"APPEND INBOX"]
        for n in range(101):
            parts += [b" ", Lit(msg(n))]
        r = c.command_parts(parts, non_sync=True)
        assert r.status == "NO" and r.code == b"LIMIT", str(r)
        assert c.command("NOOP").status == "OK"
    finally:
        close_quietly(c)
    assert stored(imap_server, user) == []


def test_imaplib_single_append_still_works(imap_server, user):
    from imap_helpers import imap_login, imaplib_ok

    conn = imap_login(imap_server, user)
    try:
        data = imaplib_ok(conn.append("INBOX", "(\\Seen)", None, msg(7)))
        assert re.search(rb"\[APPENDUID \d+ 1\]", data[0]), data
    finally:
        close_quietly(conn)
