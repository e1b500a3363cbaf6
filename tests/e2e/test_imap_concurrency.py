"""Several sessions on one folder, IDLE, deliveries by SMTP and by other processes, and
UIDs across a restart, against a real server."""

from __future__ import annotations

import time

import pytest

from imap_helpers import (
    RawIMAP,
    as_int,
    crlf,
    deliver,
    drop_into_new,
    flags_of,
    module_server,
    new_user,
)

imap_server = module_server()


def msg(n: int | str) -> bytes:
    return crlf(f"From: <x@remote.test>\nTo: <u@example.test>\nSubject: message {n}\n"
                f"Message-ID: <c{n}@remote.test>\nDate: Mon, 01 Jan 2024 00:00:00 +0000\n\n"
                f"Body {n}.\n")


def user_with_messages(server, count: int, prefix: str = "conc") -> str:
    user = new_user(server, prefix)
    c = RawIMAP.login(server, user)
    try:
        for i in range(1, count + 1):
            r = c.append("INBOX", msg(i))
            assert r.status == "OK", str(r)
    finally:
        c.close()
    return user


@pytest.fixture
def two_sessions(imap_server):
    user = user_with_messages(imap_server, 3)
    a = RawIMAP.login(imap_server, user, select="INBOX")
    b = RawIMAP.login(imap_server, user, select="INBOX")
    yield user, a, b
    a.close()
    b.close()


def test_expunge_in_one_session_reported_to_the_other(two_sessions):
    _, a, b = two_sessions
    a.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
    r = a.ok("EXPUNGE")
    assert r.numbers(b"EXPUNGE") == [2], str(r)
    r = b.ok("NOOP")
    assert r.numbers(b"EXPUNGE") == [2], f"other session's EXPUNGE not reported at NOOP:\n{r}"
    rows = b.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    assert sorted(rows) == [1, 2], rows
    r = b.ok("NOOP")
    assert not r.numbers(b"EXPUNGE"), f"EXPUNGE reported twice:\n{r}"


def test_flag_change_reported_to_the_other(two_sessions):
    _, a, b = two_sessions
    a.ok("STORE 3 +FLAGS (\\Flagged $Forwarded)")
    r = b.ok("NOOP")
    rows = r.fetches()
    assert 3 in rows and "FLAGS" in rows[3], f"no * 3 FETCH (FLAGS ...) at NOOP:\n{r}"
    assert {"\\Flagged", "$Forwarded"} <= flags_of(rows[3]["FLAGS"]), str(r)


def test_smtp_delivery_shows_up_at_noop(imap_server, two_sessions):
    user, a, b = two_sessions
    deliver(imap_server, user, subject="new one")
    r = b.ok("NOOP")
    assert r.numbers(b"EXISTS") == [4], f"no * 4 EXISTS after an SMTP delivery:\n{r}"
    r = a.ok("NOOP")
    assert r.numbers(b"EXISTS") == [4], str(r)
    rows = a.fetch("4", "(UID FLAGS)")
    assert as_int(rows[4]["UID"]) > 0


def test_file_dropped_into_new_shows_up_at_noop(imap_server, two_sessions):
    user, a, b = two_sessions
    drop_into_new(imap_server.maildir(user), msg("dropped"))
    r = b.ok("NOOP")
    assert r.numbers(b"EXISTS") == [4], f"message written to new/ by another process:\n{r}"
    rows = b.fetch("4", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    assert b"<cdropped@remote.test>" in rows[4]["BODY[HEADER.FIELDS (MESSAGE-ID)]"], rows


def test_recent_given_to_only_one_session(imap_server, two_sessions):
    user, a, b = two_sessions
    # Both selected when the message arrives: exactly one of them gets \Recent.
    deliver(imap_server, user, subject="recent")
    ra, rb = a.ok("NOOP"), b.ok("NOOP")
    assert ra.numbers(b"EXISTS") == [4] and rb.numbers(b"EXISTS") == [4], f"{ra}\n{rb}"
    recent_a = "\\Recent" in flags_of(a.fetch("4", "FLAGS")[4]["FLAGS"])
    recent_b = "\\Recent" in flags_of(b.fetch("4", "FLAGS")[4]["FLAGS"])
    assert recent_a != recent_b, f"\\Recent in session a: {recent_a}, in b: {recent_b}"
    # Arrived while nobody has it selected: the first SELECT gets it, the second does not.
    user2 = user_with_messages(imap_server, 2, "recent")
    c1 = RawIMAP.login(imap_server, user2)
    c2 = RawIMAP.login(imap_server, user2)
    try:
        r1 = c1.select("INBOX")
        r2 = c2.select("INBOX")
        assert r1.numbers(b"RECENT") == [2], str(r1)
        assert r2.numbers(b"RECENT") == [0], f"\\Recent given to two sessions:\n{r2}"
        assert c1.command("SEARCH RECENT").search() == [1, 2]
        assert c2.command("SEARCH RECENT").search() == []
    finally:
        c1.close()
        c2.close()


# -- IDLE ------------------------------------------------------------------------------------

def test_idle_reports_smtp_delivery_within_a_second(imap_server):
    user = user_with_messages(imap_server, 1, "idle")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        tag, line = c.idle_start()
        assert line == b"+ idling", f"IDLE continuation: {line!r}"
        deliver(imap_server, user, subject="while idling")
        delivered = time.monotonic()
        got, seen = c.wait_for(rb"^\* 2 EXISTS$", 1.0)
        assert got is not None, (f"no '* 2 EXISTS' within 1 s of the SMTP delivery "
                                 f"({time.monotonic() - delivered:.2f}s); got {seen!r}")
        c.send(b"DONE\r\n")
        r = c.read_result(tag)
        assert r.status == "OK", f"DONE:\n{r}"
        assert c.command("NOOP").status == "OK"
    finally:
        c.close()


def test_idle_reports_other_sessions_changes_at_once(imap_server):
    """One store object per folder: another session's change reaches the IDLE-ing client."""
    user = user_with_messages(imap_server, 2, "idle2")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    other = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        tag, line = c.idle_start()
        assert line.startswith(b"+"), line
        other.ok("STORE 1 +FLAGS (\\Flagged)")
        got, seen = c.wait_for(rb"^\* 1 FETCH .*Flagged", 1.0)
        assert got is not None, f"flag change not pushed during IDLE: {seen!r}"
        other.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        other.ok("EXPUNGE")
        got, seen = c.wait_for(rb"^\* 2 EXPUNGE$", 1.0)
        assert got is not None, f"EXPUNGE not pushed during IDLE: {seen!r}"
        c.send(b"DONE\r\n")
        assert c.read_result(tag).status == "OK"
    finally:
        c.close()
        other.close()


def test_idle_without_done_gets_bad(imap_server):
    user = user_with_messages(imap_server, 1, "idle3")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        tag, line = c.idle_start()
        assert line.startswith(b"+"), line
        c.send(b"x NOOP\r\n")
        r = c.read_result(tag)
        assert r.status == "BAD", f"a line other than DONE during IDLE:\n{r}"
        assert c.command("NOOP").status == "OK", "session did not go on after IDLE ended with BAD"
        # IDLE also works in the authenticated state (nothing selected).
        c.ok("UNSELECT")
        tag, line = c.idle_start()
        assert line.startswith(b"+"), line
        c.send(b"done\r\n")
        assert c.read_result(tag).status == "OK", "DONE is case-insensitive"
    finally:
        c.close()


# -- restart -------------------------------------------------------------------------------

def test_uids_and_uidvalidity_survive_a_restart(make_server):
    server = make_server()
    user = "alice@example.test"
    c = RawIMAP.login(server, user)
    try:
        for i in range(1, 4):
            assert c.append("INBOX", msg(i)).status == "OK"
        c.ok("CREATE Keep")
        assert c.append("Keep", msg("keep")).status == "OK"
        deliver(server, user, subject="smtp", msgid="<csmtp@remote.test>")
        before = {}
        for box in ("INBOX", "Keep"):
            r = c.select(box)
            c.ok("STORE 1 +FLAGS.SILENT (\\Seen)")
            codes = r.codes()
            rows = c.fetch("1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            before[box] = (codes["UIDVALIDITY"], codes["UIDNEXT"],
                           {as_int(v["UID"]): (v["BODY[HEADER.FIELDS (MESSAGE-ID)]"],
                                               flags_of(v["FLAGS"]) - {"\\Recent"})
                            for v in rows.values()})
    finally:
        c.close()
    server.stop()
    server.start()
    c = RawIMAP.login(server, user)
    try:
        for box in ("INBOX", "Keep"):
            r = c.select(box)
            codes = r.codes()
            rows = c.fetch("1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            after = (codes["UIDVALIDITY"], codes["UIDNEXT"],
                     {as_int(v["UID"]): (v["BODY[HEADER.FIELDS (MESSAGE-ID)]"],
                                         flags_of(v["FLAGS"]) - {"\\Recent"})
                      for v in rows.values()})
            assert after == before[box], f"{box} changed across a restart:\n{before[box]}\n{after}"
        r = c.append("INBOX", msg("after"))
        assert r.status == "OK" and "APPENDUID" in r.codes(), str(r)
        uid = int(r.codes()["APPENDUID"].split()[1])
        assert uid == int(before["INBOX"][1]), f"UIDNEXT {before['INBOX'][1]!r}, new uid {uid}"
    finally:
        c.close()
