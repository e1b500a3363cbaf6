"""SORT and THREAD (RFC 5256) and SORT=DISPLAY (RFC 5957) against a real server: every
sort key with REVERSE, both threading algorithms, the UID forms, the search criteria that
follow, Python's imaplib as a client, a larger mailbox checked against an independent
ordering (twice: from the files, then from the index cache), and bad input.

Skipped while the server does not announce SORT in its CAPABILITY."""

from __future__ import annotations

import calendar
import email.utils
import random
import time

import pytest

from imap_helpers import (
    RawIMAP,
    close_quietly,
    imap_login,
    imaplib_ok,
    module_server,
    new_user,
)

imap_server = module_server()

CAPABILITIES = {"SORT", "SORT=DISPLAY", "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES"}


def message(subject: str, date: str | None, msgid: str, *, frm: str = "x@remote.test",
            to: str = "someone@example.test", cc: str | None = None,
            refs: str | None = None, body: str = "Hello.\r\n") -> bytes:
    head = [f"From: {frm}", f"To: {to}", f"Subject: {subject}", f"Message-ID: {msgid}"]
    if date is not None:
        head.append(f"Date: {date}")
    if cc is not None:
        head.append(f"Cc: {cc}")
    if refs is not None:
        head.append(f"References: {refs}")
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


# (INTERNALDATE for APPEND, message): sequence numbers 1-6 in this order.
MAILBOX = [
    ("05-Mar-2024 10:00:00 +0000",
     message("Re: Plan", "Tue, 05 Mar 2024 09:00:00 +0000", "<2@t>", refs="<1@t>",
             frm="Zed <zed@z.test>", to="Bob <bob@example.test>",
             body="A much longer body than the others.\r\n" * 20)),
    ("01-Mar-2024 10:00:00 +0000",
     message("Plan", "Fri, 01 Mar 2024 09:00:00 +0000", "<1@t>",
             frm="=?utf-8?q?=C3=81da?= <ada@a.test>", to="carol@example.test",
             cc="Dave <dave@example.test>")),
    ("20-Feb-2024 10:00:00 +0000",
     message("[list] budget", None, "<3@t>", frm="mike@m.test",
             to="undisclosed-recipients:;")),
    ("07-Mar-2024 10:00:00 +0000",
     message("RE: plan", "Wed, 06 Mar 2024 23:00:00 -0500", "<4@t>", refs="<1@t> <2@t>",
             frm="Carl <bob@c.test>", to="aaron@example.test", cc="erin@example.test")),
    ("08-Mar-2024 10:00:00 +0000",
     message("Budget (fwd)", "Fri, 08 Mar 2024 09:00:00 +0000", "<5@t>",
             frm="\"Ann\" <zoe@z.test>", to="Yan <yan@example.test>")),
    ("09-Mar-2024 10:00:00 +0000",
     message("Re: Lost", "Sat, 09 Mar 2024 09:00:00 +0000", "<6@t>", refs="<gone@t>",
             frm="lee@l.test", to="lee@l.test")),
]


def login(server, user: str) -> RawIMAP:
    c = RawIMAP.login(server, user)
    if not CAPABILITIES <= c.capabilities():
        close_quietly(c)
        pytest.skip("the server does not announce SORT and THREAD yet")
    return c


@pytest.fixture(scope="module")
def mailbox(imap_server):
    """A user whose INBOX holds MAILBOX; yields (server, user)."""
    user = new_user(imap_server, "sort")
    c = login(imap_server, user)
    try:
        for when, data in MAILBOX:
            r = c.append("INBOX", data, date=when)
            assert r.status == "OK", str(r)
    finally:
        close_quietly(c)
    return imap_server, user


@pytest.fixture
def conn(mailbox):
    server, user = mailbox
    c = login(server, user)
    c.ok(b"SELECT INBOX")
    yield c
    close_quietly(c)


def sort_numbers(c: RawIMAP, command: str, name: bytes = b"SORT") -> list[int]:
    r = c.ok(command)
    found = r.with_prefix(name)
    assert len(found) == 1, str(r)
    return [int(n) for n in found[0].split()]


def thread_text(c: RawIMAP, command: str) -> bytes:
    r = c.ok(command)
    found = [u for u in r.untagged if u == b"THREAD" or u.startswith(b"THREAD ")]
    assert len(found) == 1, str(r)
    return found[0][len(b"THREAD"):].strip()


def test_capabilities(imap_server):
    user = new_user(imap_server, "sortcap")
    c = login(imap_server, user)
    close_quietly(c)


@pytest.mark.parametrize("criteria,expected", [
    ("ARRIVAL", [3, 2, 1, 4, 5, 6]),
    ("REVERSE ARRIVAL", [6, 5, 4, 1, 2, 3]),
    # 3 has no Date: its INTERNALDATE (20 Feb); 4 is 7 Mar 04:00 UTC
    ("DATE", [3, 2, 1, 4, 5, 6]),
    ("SUBJECT", [3, 5, 6, 1, 2, 4]),       # budget x2, lost, plan x3: ties by sequence
    ("REVERSE SUBJECT", [1, 2, 4, 6, 3, 5]),
    ("SUBJECT REVERSE DATE", [5, 3, 6, 4, 1, 2]),
    ("FROM", [2, 4, 6, 3, 1, 5]),          # ada, bob, lee, mike, zed, zoe (local parts)
    # Ann, Áda (after "an": an accented a sorts as a + accent), Carl, lee@.., mike@.., Zed
    ("DISPLAYFROM", [5, 2, 4, 6, 3, 1]),
    ("REVERSE DISPLAYFROM", [1, 3, 6, 4, 2, 5]),
    ("TO", [4, 1, 2, 6, 3, 5]),            # aaron, bob, carol, lee, undisclosed..., yan
    ("DISPLAYTO", [4, 1, 2, 6, 3, 5]),     # aaron@..., Bob, carol@..., lee@..., und..., Yan
    ("CC", [1, 3, 5, 6, 2, 4]),            # four without Cc first, then dave, erin
    ("REVERSE CC", [4, 2, 1, 3, 5, 6]),
    ("SIZE", None),                        # checked below: 1 is the largest
])
def test_sort_keys(conn, criteria, expected):
    got = sort_numbers(conn, f"SORT ({criteria}) UTF-8 ALL")
    if expected is None:
        assert sorted(got) == [1, 2, 3, 4, 5, 6] and got[-1] == 1, got
    else:
        assert got == expected, criteria


def test_sort_with_search_criteria(conn):
    assert sort_numbers(conn, 'SORT (DATE) US-ASCII SUBJECT "plan"') == [2, 1, 4]
    assert sort_numbers(conn, "SORT (REVERSE ARRIVAL) UTF-8 2:4 NOT FROM zed") == [4, 2, 3]
    assert sort_numbers(conn, 'SORT (SUBJECT) UTF-8 SUBJECT "no such thing"') == []
    assert sort_numbers(conn, 'SORT (REVERSE SIZE) "UTF-8" ALL')[0] == 1


def test_thread(conn):
    # 2 (Plan, 1 Mar) has the reply 1, which 4 answers; 5 ("Budget (fwd)") is a forward
    # of 3's base subject and joins it; 6 answers a message that is not there.
    assert thread_text(conn, "THREAD REFERENCES UTF-8 ALL") == b"(3 5)(2 1 4)(6)"
    assert thread_text(conn, "THREAD ORDEREDSUBJECT UTF-8 ALL") == b"(3 5)(2 (1)(4))(6)"
    assert thread_text(conn, "THREAD REFERENCES UTF-8 1,4") == b"(1 4)"
    assert thread_text(conn, "THREAD REFERENCES UTF-8 4") == b"(4)"
    assert thread_text(conn, 'THREAD REFERENCES UTF-8 SUBJECT "nothing"') == b""


def test_uid_forms_answer_uids(mailbox):
    server, user = mailbox
    other = new_user(server, "sortuid")
    c = login(server, other)
    try:
        for when, data in MAILBOX:
            assert c.append("INBOX", data, date=when).status == "OK"
        c.ok(b"SELECT INBOX")
        c.ok(b"STORE 2 +FLAGS (\\Deleted)")
        c.ok(b"EXPUNGE")     # UIDs 1 3 4 5 6 are now sequence numbers 1-5
        assert sort_numbers(c, "UID SORT (SUBJECT) UTF-8 ALL") == [3, 5, 6, 1, 4]
        assert sort_numbers(c, "SORT (SUBJECT) UTF-8 ALL") == [2, 4, 5, 1, 3]
        assert sort_numbers(c, "UID SORT (DATE) UTF-8 UID 4:*") == [4, 5, 6]
        assert thread_text(c, "UID THREAD REFERENCES UTF-8 ALL") == b"(3 5)(1 4)(6)"
        assert thread_text(c, "THREAD REFERENCES UTF-8 ALL") == b"(2 4)(1 3)(5)"
    finally:
        close_quietly(c)


def test_imaplib_client(mailbox):
    server, user = mailbox
    conn = imap_login(server, user)
    try:
        imaplib_ok(conn.select("INBOX"), "SELECT")
        data = imaplib_ok(conn.sort("(REVERSE DATE)", "UTF-8", "ALL"), "SORT")
        assert data == [b"6 5 4 1 2 3"], data
        data = imaplib_ok(conn.uid("SORT", "(SUBJECT)", "UTF-8", "ALL"), "UID SORT")
        assert data[0].split() and len(data[0].split()) == 6, data
        data = imaplib_ok(conn.thread("REFERENCES", "UTF-8", "ALL"), "THREAD")
        assert data == [b"(3 5)(2 1 4)(6)"], data
    finally:
        close_quietly(conn)


def test_bad_input_and_the_session_goes_on(conn):
    for command in [b"SORT", b"SORT ()", b"SORT (DATE)", b"SORT (DATE) UTF-8",
                    b"SORT (NOSUCH) UTF-8 ALL", b"SORT (REVERSE) UTF-8 ALL",
                    b"SORT (REVERSE REVERSE DATE) UTF-8 ALL", b"SORT DATE UTF-8 ALL",
                    b"SORT (" + b" ".join([b"DATE"] * 33) + b") UTF-8 ALL",
                    b"SORT (DATE) UTF-8 BOGUS", b"SORT (DATE (SUBJECT)) UTF-8 ALL",
                    b"THREAD", b"THREAD NOSUCH UTF-8 ALL", b"THREAD REFERENCES UTF-8",
                    b"UID SORT (DATE) UTF-8"]:
        r = conn.command(command)
        assert r.status == "BAD", str(r)
    r = conn.command(b"SORT (DATE) ISO-8859-1 ALL")
    assert r.status == "NO" and r.code == b"BADCHARSET (UTF-8 US-ASCII)", str(r)
    r = conn.command(b"THREAD ORDEREDSUBJECT KOI8-R ALL")
    assert r.status == "NO" and r.code == b"BADCHARSET (UTF-8 US-ASCII)", str(r)
    assert sort_numbers(conn, "SORT (ARRIVAL) UTF-8 ALL") == [3, 2, 1, 4, 5, 6]


def test_not_valid_before_select(mailbox):
    server, user = mailbox
    c = login(server, user)
    try:
        r = c.command(b"SORT (DATE) UTF-8 ALL")
        assert r.status == "BAD", str(r)
        r = c.command(b"THREAD REFERENCES UTF-8 ALL")
        assert r.status == "BAD", str(r)
    finally:
        close_quietly(c)


# -- a larger mailbox, against an independent ordering ------------------------------------------

def reference_base(subject: str) -> str:
    """The base subject of the generated subjects (only "Re: " prefixes and spaces)."""
    s = subject
    while s.lower().startswith("re: "):
        s = s[4:]
    return s.strip().casefold()


def test_larger_mailbox_and_new_mail(imap_server):
    rng = random.Random(5256)
    user = new_user(imap_server, "sortbig")
    c = login(imap_server, user)
    try:
        rows = []  # (seq, base subject, sent, arrival, from local part)
        words = ["alpha", "Beta", "gamma", "DELTA", "epsilon"]
        for seq in range(1, 201):
            subject = ("Re: " * rng.randint(0, 2)) + f"{rng.choice(words)} {rng.randint(1, 9)}"
            sent = calendar.timegm((2024, 1, 1, 0, 0, 0)) + rng.randint(0, 30) * 3600
            arrival = calendar.timegm((2024, 2, 1, 0, 0, 0)) + rng.randint(0, 50) * 60
            local = rng.choice(["ann", "Bob", "carl", "dora"])
            date = email.utils.formatdate(sent, usegmt=True) if seq % 7 else None
            data = message(subject, date, f"<big{seq}@t>", frm=f"{local}@example.test")
            r = c.append("INBOX", data, date=_internaldate(arrival))
            assert r.status == "OK", str(r)
            rows.append((seq, reference_base(subject), sent if date else arrival, arrival,
                         local.casefold()))
        c.ok(b"SELECT INBOX")
        by_subject_then_reverse_date = [
            r[0] for r in sorted(sorted(rows, key=lambda r: (-r[2], r[0])),
                                 key=lambda r: r[1])]
        by_from_then_arrival = [r[0] for r in sorted(rows, key=lambda r: (r[4], r[3], r[0]))]
        for _ in range(2):  # from the files, then from the index cache
            assert sort_numbers(c, "SORT (SUBJECT REVERSE DATE) UTF-8 ALL") == \
                by_subject_then_reverse_date
            assert sort_numbers(c, "SORT (FROM ARRIVAL) UTF-8 ALL") == by_from_then_arrival
        threads = thread_text(c, "THREAD ORDEREDSUBJECT UTF-8 ALL")
        numbers = sorted(int(n) for n in threads.replace(b"(", b" ").replace(b")", b" ").split())
        assert numbers == list(range(1, 201))
        # A message arriving later is sorted in with the rest.
        assert c.append("INBOX", message("aaa first", None, "<late@t>", frm="aa@example.test"),
                        date="01-Jan-2020 00:00:00 +0000").status == "OK"
        c.ok(b"NOOP")
        assert sort_numbers(c, "SORT (SUBJECT) UTF-8 ALL")[0] == 201
        assert sort_numbers(c, "SORT (DATE) UTF-8 ALL")[0] == 201
    finally:
        close_quietly(c)


def _internaldate(ts: float) -> str:
    """APPEND's date-time for a UTC timestamp."""
    return time.strftime("%d-%b-%Y %H:%M:%S +0000", time.gmtime(ts))
