"""CONTEXT=SEARCH and CONTEXT=SORT (RFC 5267 4) against the real server over TLS: update
contexts told of flag changes by other sessions, of new mail delivered over SMTP (ADDTO
after EXISTS) and of expunges (REMOVEFROM before EXPUNGE), in IDLE and between commands;
positions in a sorted context; PARTIAL; CANCELUPDATE; NOUPDATE past the limit; tag reuse;
imaplib as a client; bad input."""

from __future__ import annotations

import re

from imap_helpers import (RawIMAP, close_quietly, deliver, imap_login, imaplib_ok,
                          module_server, new_user)

imap_server = module_server()

SUBJECTS = ["delta", "alpha", "echo", "charlie", "bravo"]
WAIT = 20.0   # seconds allowed for a change to be told (never a measured bound)


def mailbox_with(server, prefix: str) -> str:
    user = new_user(server, prefix)
    for subject in SUBJECTS:
        deliver(server, user, subject=subject)
    return user


def expand(text: bytes) -> list[int]:
    out: list[int] = []
    for item in text.split(b","):
        a, _, b = item.partition(b":")
        out += range(int(a), int(b or a) + 1)
    return out


class Holder:
    """A client's copy of a context, kept as RFC 5267 4.3.2-4.3.4 say."""

    def __init__(self, tag: bytes, start: list[int]) -> None:
        self.tag = tag
        self.result = list(start)

    def apply(self, response: bytes) -> bool:
        m = re.fullmatch(rb'\* ESEARCH \(TAG "' + re.escape(self.tag) + rb'"\)(?: UID)? (.*)',
                         response)
        if not m:
            return False
        for kind, payload in re.findall(rb"(ADDTO|REMOVEFROM) \(([^)]*)\)", m.group(1)):
            words = payload.split()
            for position, numbers in zip(map(int, words[::2]), map(expand, words[1::2])):
                if kind == b"ADDTO":
                    if position == 0:
                        self.result = sorted(self.result + numbers)
                    else:
                        self.result[position - 1:position - 1] = numbers
                elif position == 0:
                    self.result = [n for n in self.result if n not in numbers]
                else:
                    assert self.result[position - 1:position - 1 + len(numbers)] == numbers
                    del self.result[position - 1:position - 1 + len(numbers)]
        return True

    def follow(self, c: RawIMAP, expected: list[int]) -> bytes:
        """Read responses until the context is `expected`; everything read."""
        seen = b""
        while self.result != expected:
            line, more = c.wait_for(rb'^\* ESEARCH \(TAG "' + re.escape(self.tag) + rb'"\)', WAIT)
            seen += more
            assert line is not None, f"context {self.result} never became {expected}: {seen!r}"
            self.apply(line)
        return seen


def test_capabilities(imap_server):
    user = new_user(imap_server, "ctxcap")
    c = RawIMAP.login(imap_server, user)
    try:
        assert {"CONTEXT=SEARCH", "CONTEXT=SORT", "ESORT", "SORT", "ESEARCH"} <= c.capabilities()
    finally:
        c.close()


def test_search_context_follows_other_sessions(imap_server):
    user = mailbox_with(imap_server, "ctxs")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    other = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        r = c.command(b"SEARCH RETURN (UPDATE ALL COUNT) UNSEEN", tag=b"B01")
        assert r.status == "OK" and r.untagged == [b'ESEARCH (TAG "B01") ALL 1:5 COUNT 5'], str(r)
        held = Holder(b"B01", [1, 2, 3, 4, 5])
        other.ok("STORE 2,4 +FLAGS (\\Seen)")
        held.follow(c, [1, 3, 5])          # told with no command running (4.3.2)
        other.ok("STORE 4 -FLAGS (\\Seen)")
        held.follow(c, [1, 3, 4, 5])
        # An expunge: REMOVEFROM goes before the EXPUNGE it is about (4.3.4).
        other.ok("STORE 3 +FLAGS.SILENT (\\Deleted)")
        other.ok("EXPUNGE")
        r = c.ok("NOOP")
        tells = [u for u in r.untagged if u.startswith((b"ESEARCH", b"3 EXPUNGE"))]
        assert tells == [b'ESEARCH (TAG "B01") REMOVEFROM (0 3)', b"3 EXPUNGE"], str(r)
        # New mail over SMTP, while in IDLE: ADDTO after EXISTS (4.3.3).
        tag, line = c.idle_start()
        assert line.startswith(b"+"), line
        deliver(imap_server, user, subject="foxtrot")
        seen = Holder(b"B01", [1, 3, 4]).follow(c, [1, 3, 4, 5])
        assert seen.index(b"* 5 EXISTS") < seen.index(b"ADDTO (0 5)"), seen
        c.send(b"DONE\r\n")
        assert c.read_result(tag).status == "OK"
        # The session's own STORE: told before the tagged reply.
        r = c.ok("STORE 1 +FLAGS (\\Seen)")
        assert r.untagged[-1] == b'ESEARCH (TAG "B01") REMOVEFROM (0 1)', str(r)
    finally:
        c.close()
        other.close()


def test_sort_context_positions(imap_server):
    user = mailbox_with(imap_server, "ctxsort")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    other = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        r = c.command(b"UID SORT RETURN (UPDATE ALL) (SUBJECT) UTF-8 UNDELETED", tag=b"S1")
        assert r.untagged == [b'ESEARCH (TAG "S1") UID ALL 2,5,4,1,3'], str(r)
        held = Holder(b"S1", [2, 5, 4, 1, 3])
        tag, _ = c.idle_start()
        for subject in ("baker", "zulu", "able"):
            deliver(imap_server, user, subject=subject)
        held.follow(c, [8, 2, 6, 5, 4, 1, 3, 7])
        other.ok("NOOP")   # it learns of UIDs 6-8
        other.ok("UID STORE 2,6,1 +FLAGS (\\Deleted)")
        held.follow(c, [8, 5, 4, 3, 7])
        c.send(b"DONE\r\n")
        assert c.read_result(tag).status == "OK"
        # Message numbers, and an expunge of messages the context no longer holds.
        r = c.command(b"SORT RETURN (UPDATE) (REVERSE SUBJECT) UTF-8 ALL", tag=b"S2")
        assert r.untagged == [b'ESEARCH (TAG "S2")'], str(r)
        other.ok("EXPUNGE")
        r = c.ok("NOOP")
        # zulu echo delta charlie bravo baker alpha able: 7 3 1 4 5 6 2 8; uids 1, 2, 6
        # (delta, alpha, baker) go: delta at 3, then baker and alpha both at 5.
        tells = [u for u in r.untagged if u.startswith(b"ESEARCH") or u.endswith(b"EXPUNGE")]
        assert tells == [b'ESEARCH (TAG "S2") REMOVEFROM (3 1 5 6,2)',
                         b"1 EXPUNGE", b"1 EXPUNGE", b"4 EXPUNGE"], str(r)
    finally:
        c.close()
        other.close()


def test_partial_cancel_and_limits(imap_server):
    user = mailbox_with(imap_server, "ctxlim")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    other = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        r = c.command(b"SEARCH RETURN (PARTIAL 2:3 UPDATE) ALL", tag=b"P1")
        assert r.untagged == [b'ESEARCH (TAG "P1") PARTIAL (2:3 2:3)'], str(r)
        r = c.command(b"UID SORT RETURN (PARTIAL 4:9) (SUBJECT) UTF-8 ALL", tag=b"P2")
        assert r.untagged == [b'ESEARCH (TAG "P2") UID PARTIAL (4:9 1,3)'], str(r)
        r = c.command(b"SEARCH RETURN (PARTIAL 6:4294967295) ALL", tag=b"P3")
        assert r.untagged == [b'ESEARCH (TAG "P3") PARTIAL (6:4294967295 NIL)'], str(r)
        assert c.command(b"SEARCH RETURN (UPDATE) ALL", tag=b"P1").status == "BAD"  # in use
        for i in range(2, 6):
            r = c.command(b"UID SEARCH RETURN (UPDATE) FLAGGED", tag=b"F%d" % i)
            assert r.status == "OK" and not r.codes(), str(r)
        r = c.command(b"SEARCH RETURN (UPDATE COUNT) ALL", tag=b"F6")
        assert r.status == "OK", str(r)
        assert r.untagged == [b'NO [NOUPDATE "F6"] Too many update contexts',
                              b'ESEARCH (TAG "F6") COUNT 5'], str(r)
        assert c.ok('CANCELUPDATE "F2" "F3"')
        assert c.command('CANCELUPDATE "F2"').status == "NO"
        r = c.command(b"SORT RETURN (UPDATE) (DATE) UTF-8 FLAGGED", tag=b"F6")
        assert r.status == "OK" and not r.codes(), str(r)   # room again
        other.ok("STORE 1 +FLAGS (\\Flagged)")
        got, seen = c.wait_for(rb'^\* ESEARCH \(TAG "F6"\) ADDTO \(1 1\)$', WAIT)
        assert got is not None, seen
        assert b'"F2"' not in seen and b'"F3"' not in seen and b'"P1"' not in seen, seen
        c.ok("UNSELECT")   # updates cease with the selection
        c.ok("SELECT INBOX")
        other.ok("STORE 2 +FLAGS (\\Flagged)")
        r = c.ok("NOOP")
        assert not r.with_prefix(b"ESEARCH"), str(r)
        assert c.command('CANCELUPDATE "F4"').status == "NO"
    finally:
        c.close()
        other.close()


def test_imaplib_client(imap_server):
    user = mailbox_with(imap_server, "ctxlib")
    conn = imap_login(imap_server, user)
    other = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        imaplib_ok(conn.select("INBOX"), "SELECT")
        imaplib_ok(conn.uid("SEARCH", "RETURN", "(UPDATE COUNT)", "UNSEEN"), "UID SEARCH")
        typ, data = conn.response("ESEARCH")
        assert data[-1].endswith(b"UID COUNT 5"), data
        other.ok("UID STORE 3 +FLAGS (\\Seen)")
        other.ok("UID STORE 3 +FLAGS (\\Flagged)")   # told after the first: a fence
        tells: list[bytes] = []
        for _ in range(200):
            imaplib_ok(conn.noop(), "NOOP")
            tells += [d for d in conn.response("ESEARCH")[1] if d]
            typ, fetches = conn.response("FETCH")
            if any(b"Flagged" in f for f in fetches if f):
                break
        assert any(t.endswith(b"UID REMOVEFROM (0 3)") for t in tells), tells
    finally:
        close_quietly(conn)
        other.close()


def test_bad_input_and_the_session_goes_on(imap_server):
    user = mailbox_with(imap_server, "ctxbad")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        for command in [b"CANCELUPDATE", b"CANCELUPDATE B01", b'CANCELUPDATE "B01" x',
                        b"CANCELUPDATE " + b'"t" ' * 101, b'CANCELUPDATE ("B01")',
                        b"SEARCH RETURN (UPDATE UPDATE) ALL",
                        b"SEARCH RETURN (PARTIAL) ALL", b"SEARCH RETURN (PARTIAL 3) ALL",
                        b"SEARCH RETURN (PARTIAL 0:3) ALL", b"SEARCH RETURN (PARTIAL -1:3) ALL",
                        b"SEARCH RETURN (PARTIAL 1:99999999999) ALL",
                        b"SEARCH RETURN (ALL PARTIAL 1:2) ALL",
                        b"SORT RETURN (UPDATE CONTEXT CONTEXT) (DATE) UTF-8 ALL",
                        b"SORT RETURN (UPDATE) (" + b"DATE " * 33 + b") UTF-8 ALL"]:
            r = c.command(command)
            assert r.status == "BAD", f"{command[:80]!r}: {r}"
        assert c.command('CANCELUPDATE "B01"').status == "NO"
        r = c.command(b"SEARCH RETURN (CONTEXT COUNT) ALL", tag=b"H1")   # a hint only
        assert r.untagged == [b'ESEARCH (TAG "H1") COUNT 5'], str(r)
        assert c.ok("SEARCH 1:2").search() == [1, 2]
        c.ok("UNSELECT")
        assert c.command('CANCELUPDATE "H1"').status == "BAD"   # selected state only
    finally:
        c.close()
