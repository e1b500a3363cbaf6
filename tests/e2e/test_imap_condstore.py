"""CONDSTORE and QRESYNC (RFC 7162) against a real server: the enabling commands,
CHANGEDSINCE after another session's STORE, UNCHANGEDSINCE conflicts, QRESYNC
resynchronisation with VANISHED (EARLIER) across a restart, VANISHED instead of EXPUNGE,
and changes another process makes on disk."""

from __future__ import annotations

import os
import re
import time

from imap_helpers import (
    RawIMAP,
    as_int,
    crlf,
    flags_of,
    module_server,
    new_user,
)

imap_server = module_server()

MAX_MODSEQ = 2 ** 63 - 1


def msg(n: int | str) -> bytes:
    return crlf(f"From: <x@remote.test>\nTo: <u@example.test>\nSubject: message {n}\n"
                f"Message-ID: <cs{n}@remote.test>\nDate: Mon, 01 Jan 2024 00:00:00 +0000\n\n"
                f"Body {n}.\n")


def user_with_messages(server, count: int) -> str:
    user = new_user(server, "cs")
    c = RawIMAP.login(server, user)
    try:
        for i in range(1, count + 1):
            assert c.append("INBOX", msg(i)).status == "OK"
    finally:
        c.close()
    return user


def highest(result) -> int:
    codes = result.codes()
    assert "HIGHESTMODSEQ" in codes, str(result)
    return int(codes["HIGHESTMODSEQ"])


def modseq_of(row: dict) -> int:
    value = row["MODSEQ"]
    assert isinstance(value, list) and len(value) == 1, row
    return as_int(value[0])


def vanished(result, earlier: bool) -> set[int]:
    """The uids of the VANISHED responses (with or without EARLIER) of a result."""
    out: set[int] = set()
    for line in result.untagged:
        m = re.fullmatch(rb"VANISHED (\(EARLIER\) )?([0-9:,]+)", line, re.I)
        if m and bool(m.group(1)) == earlier:
            for part in m.group(2).split(b","):
                a, _, b = part.partition(b":")
                out.update(range(int(a), int(b or a) + 1))
    return out


def search_with_modseq(result) -> tuple[list[int], int | None]:
    """The numbers of a SEARCH response and its (MODSEQ n), if any (RFC 7162 3.1.5)."""
    (line,) = result.with_prefix(b"SEARCH")
    m = re.fullmatch(rb"((?: \d+)*)(?: \(MODSEQ (\d+)\))?", line)
    assert m, f"SEARCH response {line!r}"
    return [int(x) for x in m.group(1).split()], int(m.group(2)) if m.group(2) else None


def by_uid(result) -> dict[int, dict]:
    return {as_int(v["UID"]): v for v in result.fetches().values()}


# -- enabling --------------------------------------------------------------------------------

def test_enable_and_select_report_highestmodseq(imap_server):
    user = user_with_messages(imap_server, 2)
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.ok("ENABLE CONDSTORE")
        assert r.with_prefix(b"ENABLED") == [b" CONDSTORE"], str(r)
        r = c.select("INBOX")
        h = highest(r)
        assert 0 < h <= MAX_MODSEQ
        assert "NOMODSEQ" not in r.codes()
        # Once enabled, a STORE's untagged FETCH carries the new MODSEQ, above HIGHESTMODSEQ.
        r = c.ok("STORE 1 +FLAGS (\\Flagged)")
        row = r.fetches()[1]
        assert as_int(row["UID"]) == 1 and modseq_of(row) > h, str(r)
        r = c.ok("STATUS INBOX (HIGHESTMODSEQ MESSAGES)")
        status = r.with_prefix(b"STATUS ")[0]
        assert re.search(rb"HIGHESTMODSEQ %d\b" % modseq_of(row), status), str(r)
        # .SILENT still reports the MODSEQ (RFC 7162 3.1.3).
        r = c.ok("STORE 2 +FLAGS.SILENT (\\Seen)")
        row = r.fetches()[2]
        assert "FLAGS" not in row and modseq_of(row) > h, str(r)
    finally:
        c.close()


def test_enabling_commands_while_selected(imap_server):
    user = user_with_messages(imap_server, 2)
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.select("INBOX")
        h = highest(r)  # every SELECT reports it (RFC 7162 3.1.2.1)
        r = c.ok("STORE 1 +FLAGS (\\Seen)")
        assert "MODSEQ" not in r.fetches()[1], f"MODSEQ before CONDSTORE was enabled:\n{r}"
        # The first enabling command with a mailbox selected reports HIGHESTMODSEQ.
        r = c.ok("FETCH 1:2 (MODSEQ)")
        assert highest(r) > h, str(r)
        rows = r.fetches()
        assert modseq_of(rows[1]) > modseq_of(rows[2]), str(r)
        r = c.ok("FETCH 2 (MODSEQ)")
        assert "HIGHESTMODSEQ" not in r.codes(), f"reported twice:\n{r}"
    finally:
        c.close()
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.ok("SELECT INBOX (CONDSTORE)")
        assert highest(r) > 0
        r = c.ok("STORE 2 +FLAGS (\\Answered)")
        assert "MODSEQ" in r.fetches()[2], str(r)
    finally:
        c.close()


# -- CHANGEDSINCE, UNCHANGEDSINCE, SEARCH MODSEQ --------------------------------------------

def test_changedsince_shows_another_sessions_store(imap_server):
    user = user_with_messages(imap_server, 5)
    a = RawIMAP.login(imap_server, user)
    b = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        a.ok("ENABLE CONDSTORE")
        h = highest(a.select("INBOX"))
        b.ok("STORE 2,4 +FLAGS ($Done)")
        r = a.ok("UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % h)
        rows = by_uid(r)
        assert set(rows) == {2, 4}, str(r)
        for row in rows.values():
            assert "$Done" in flags_of(row["FLAGS"]) and modseq_of(row) > h, str(r)
        # The unsolicited FETCHes a carried along also had MODSEQ (RFC 7162 3.1).
        r = a.ok("FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % max(modseq_of(v) for v in rows.values()))
        assert r.fetches() == {}, str(r)
        # SEARCH MODSEQ, with the highest value of what matched.
        r = a.ok("UID SEARCH MODSEQ %d" % (h + 1))
        assert search_with_modseq(r) == ([2, 4], max(modseq_of(v) for v in rows.values())), \
            str(r)
        r = a.ok('SEARCH MODSEQ "/flags/\\\\draft" all %d UNSEEN' % (h + 1))
        assert search_with_modseq(r)[0] == [2, 4], str(r)
        r = a.ok("SEARCH MODSEQ %d" % MAX_MODSEQ)
        assert search_with_modseq(r) == ([], None), f"MODSEQ with no match:\n{r}"
    finally:
        a.close()
        b.close()


def test_unchangedsince_conflict_reports_modified(imap_server):
    user = user_with_messages(imap_server, 3)
    a = RawIMAP.login(imap_server, user)
    b = RawIMAP.login(imap_server, user)
    try:
        a.ok("ENABLE CONDSTORE")
        b.ok("ENABLE CONDSTORE")
        a.select("INBOX")
        b.select("INBOX")
        rows = a.fetch("1:3", "(MODSEQ)")
        known = {n: modseq_of(v) for n, v in rows.items()}
        r = b.ok("STORE 1 (UNCHANGEDSINCE %d) +FLAGS (\\Seen)" % known[1])
        assert r.code is None, str(r)
        # a still thinks message 1 is at its old mod-sequence: its conditional STORE fails
        # for 1 and goes through for 2.
        r = a.command("UID STORE 1:2 (UNCHANGEDSINCE %d) +FLAGS.SILENT (\\Deleted)"
                      % max(known[1], known[2]))
        assert r.status == "OK" and r.codes().get("MODIFIED") == b"1", str(r)
        rows = a.fetch("1:2", "(FLAGS)")
        assert "\\Deleted" not in flags_of(rows[1]["FLAGS"]), rows
        assert "\\Deleted" in flags_of(rows[2]["FLAGS"]), rows
        # UNCHANGEDSINCE 0 always fails (RFC 7162 3.1.3).
        r = a.command("STORE 3 (UNCHANGEDSINCE 0) +FLAGS (\\Flagged)")
        assert r.status == "OK" and r.codes().get("MODIFIED") == b"3", str(r)
        assert "\\Flagged" not in flags_of(a.fetch("3", "(FLAGS)")[3]["FLAGS"])
    finally:
        a.close()
        b.close()


def test_bad_modseq_input_gets_bad_and_the_session_goes_on(imap_server):
    user = user_with_messages(imap_server, 1)
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        for command in ("FETCH 1 (FLAGS) (CHANGEDSINCE %d)" % (MAX_MODSEQ + 1),
                        "FETCH 1 (FLAGS) (CHANGEDSINCE x)",
                        "FETCH 1 (FLAGS) (CHANGEDSINCE)",
                        "FETCH 1 (FLAGS) (FOO 1)",
                        "UID FETCH 1 (FLAGS) (CHANGEDSINCE 1 VANISHED)",  # QRESYNC not on
                        "STORE 1 (UNCHANGEDSINCE -1) +FLAGS (\\Seen)",
                        "STORE 1 (UNCHANGEDSINCE 99999999999999999999) +FLAGS (\\Seen)",
                        "STORE 1 (BOGUS) +FLAGS (\\Seen)",
                        "SEARCH MODSEQ 9223372036854775808",
                        "SEARCH MODSEQ abc",
                        "SELECT INBOX (QRESYNC (1 1))",  # QRESYNC not enabled
                        "SELECT INBOX (FOO)",
                        "ENABLE (CONDSTORE)"):
            r = c.command(command)
            assert r.status == "BAD", str(r)
        r = c.ok("FETCH 1 (FLAGS) (CHANGEDSINCE %d)" % MAX_MODSEQ)
        assert r.fetches() == {}, str(r)
        c.ok("NOOP")
        assert c.fetch("1", "(UID)")[1]["UID"] == b"1"
    finally:
        c.close()


# -- QRESYNC ------------------------------------------------------------------------------------

def test_vanished_replaces_expunge_once_qresync_is_enabled(imap_server):
    user = user_with_messages(imap_server, 5)
    a = RawIMAP.login(imap_server, user)
    b = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        r = a.ok("ENABLE QRESYNC")
        assert r.with_prefix(b"ENABLED") == [b" QRESYNC"], str(r)
        h = highest(a.select("INBOX"))
        b.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        b.ok("EXPUNGE")
        r = a.ok("NOOP")
        assert vanished(r, earlier=False) == {2}, str(r)
        assert r.numbers(b"EXPUNGE") == [], str(r)
        a.ok("STORE 4 +FLAGS.SILENT (\\Deleted)")  # message 4 is uid 5 now
        r = a.ok("EXPUNGE")
        assert vanished(r, earlier=False) == {5} and r.numbers(b"EXPUNGE") == [], str(r)
        assert highest(r) > h, f"EXPUNGE's OK without HIGHESTMODSEQ:\n{r}"
        # UID FETCH (CHANGEDSINCE ... VANISHED): what vanished in the set, then changes.
        r = a.ok("UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % h)
        assert vanished(r, earlier=True) == {2, 5}, str(r)
        assert by_uid(r) == {}, str(r)  # 2 and 5 changed, and they are gone
        r = a.ok("UID FETCH 3:4 (FLAGS) (CHANGEDSINCE %d VANISHED)" % h)
        assert vanished(r, earlier=True) == set(), str(r)
        # A SELECT with a mailbox selected closes it first (RFC 7162 3.2.11).
        r = a.select("INBOX")
        assert "CLOSED" in r.codes(), str(r)
    finally:
        a.close()
        b.close()


def test_qresync_select_after_expunges_and_a_restart(imap_server):
    user = user_with_messages(imap_server, 8)
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("ENABLE QRESYNC")
        r = c.select("INBOX")
        uidvalidity, h = int(r.codes()["UIDVALIDITY"]), highest(r)
        c.ok("UID STORE 2,3,7 +FLAGS.SILENT (\\Deleted)")
        c.ok("UID EXPUNGE 2,3,7")
        c.ok("UID STORE 5 +FLAGS.SILENT ($Important)")
    finally:
        c.close()
    # Another process changes a flag while the server is down (Dovecot renames the file).
    maildir = imap_server.maildir(user)
    imap_server.stop()
    (name,) = [n for n in os.listdir(maildir / "cur") if "cs8@" in (maildir / "cur" / n).read_text()]
    base = name.partition(":2,")[0]
    os.rename(maildir / "cur" / name, maildir / "cur" / (base + ":2,F"))
    imap_server.start()
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("ENABLE QRESYNC")
        r = c.ok(f"SELECT INBOX (QRESYNC ({uidvalidity} {h} 1:8))")
        assert highest(r) > h, str(r)
        assert vanished(r, earlier=True) == {2, 3, 7}, str(r)
        rows = by_uid(r)
        assert set(rows) == {5, 8}, str(r)
        assert "$Important" in flags_of(rows[5]["FLAGS"]), str(r)
        assert "\\Flagged" in flags_of(rows[8]["FLAGS"]), str(r)
        assert all(modseq_of(v) > h for v in rows.values()), str(r)
        assert r.numbers(b"EXISTS") == [5], str(r)
        # Nothing new since: an up-to-date client gets nothing; known-uids narrow it.
        now = highest(r)
        r = c.ok(f"EXAMINE INBOX (QRESYNC ({uidvalidity} {now}))")
        assert vanished(r, earlier=True) == set() and r.fetches() == {}, str(r)
        r = c.ok(f"EXAMINE INBOX (QRESYNC ({uidvalidity} {h} 1:4))")
        assert vanished(r, earlier=True) == {2, 3} and r.fetches() == {}, str(r)
        # Another UIDVALIDITY: no resync data, the client starts over.
        r = c.ok(f"SELECT INBOX (QRESYNC ({uidvalidity + 1} {h}))")
        assert vanished(r, earlier=True) == set() and r.fetches() == {}, str(r)
    finally:
        c.close()


def test_qresync_after_the_index_is_lost(imap_server):
    """Without the expunge memory, every uid of the known range that no longer exists is
    reported (RFC 7162 allows uids that never existed); mod-sequences go on upwards."""
    user = user_with_messages(imap_server, 6)
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("ENABLE QRESYNC")
        r = c.select("INBOX")
        uidvalidity, h = int(r.codes()["UIDVALIDITY"]), highest(r)
        c.ok("UID STORE 4 +FLAGS.SILENT (\\Deleted)")
        c.ok("UID EXPUNGE 4")
        h = highest(c.select("INBOX"))
    finally:
        c.close()
    maildir = imap_server.maildir(user)
    imap_server.stop()
    for name in os.listdir(maildir):
        if name.startswith("mailserver.index.sqlite3"):
            os.unlink(maildir / name)
    imap_server.start()
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("ENABLE QRESYNC")
        r = c.ok(f"SELECT INBOX (QRESYNC ({uidvalidity} {h} 1:6 (1:3 1:3)))")
        assert highest(r) > h, str(r)
        assert vanished(r, earlier=True) == {4}, str(r)
        assert set(by_uid(r)) == {1, 2, 3, 5, 6}, str(r)  # all of them, to be safe
    finally:
        c.close()


def test_flag_change_by_another_process_gets_a_modseq(imap_server):
    user = user_with_messages(imap_server, 3)
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("ENABLE CONDSTORE")
        h = highest(c.select("INBOX"))
        maildir = imap_server.maildir(user)
        (name,) = [n for n in os.listdir(maildir / "cur")
                   if "cs2@" in (maildir / "cur" / n).read_text()]
        os.rename(maildir / "cur" / name, maildir / "cur" / (name.partition(":2,")[0] + ":2,S"))
        deadline = time.monotonic() + 10
        seen: dict = {}
        while time.monotonic() < deadline:
            r = c.ok("NOOP")
            seen.update(by_uid(r))
            if 2 in seen:
                break
            time.sleep(0.2)
        assert 2 in seen and modseq_of(seen[2]) > h, seen
        assert "\\Seen" in flags_of(seen[2]["FLAGS"])
        r = c.ok("UID FETCH 1:* (UID) (CHANGEDSINCE %d)" % h)
        assert set(by_uid(r)) == {2}, str(r)
    finally:
        c.close()


def test_idle_pushes_modseq_and_vanished(imap_server):
    user = user_with_messages(imap_server, 3)
    a = RawIMAP.login(imap_server, user)
    b = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        a.ok("ENABLE QRESYNC")
        h = highest(a.select("INBOX"))
        tag, line = a.idle_start()
        assert line.startswith(b"+"), line
        b.ok("UID STORE 1 +FLAGS.SILENT ($Seen2)")
        found, seen = a.wait_for(rb"^\* \d+ FETCH ", 10)
        assert found is not None, seen
        m = re.search(rb"MODSEQ \((\d+)\)", found)
        assert b"UID 1" in found and m and int(m.group(1)) > h, found
        b.ok("UID STORE 2 +FLAGS.SILENT (\\Deleted)")
        b.ok("EXPUNGE")
        found, seen = a.wait_for(rb"^\* VANISHED ", 10)
        assert found == b"* VANISHED 2", seen
        assert b"EXPUNGE" not in seen, seen
        a.send(b"DONE\r\n")
        r = a.read_result(tag)
        assert r.status == "OK", str(r)
    finally:
        a.close()
        b.close()
