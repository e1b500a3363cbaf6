"""STATUS=SIZE (RFC 8438) against the real server: STATUS and LIST-STATUS report at least
(here: exactly) the sum of the RFC822.SIZE FETCH gives, for messages delivered by SMTP,
appended, and dropped into the Maildir as Dovecot or procmail write them (LF line ends,
with and without ",W="); it follows APPEND and EXPUNGE; bad input is BAD."""

from __future__ import annotations

import re

from imap_helpers import (RawIMAP, close_quietly, deliver, drop_into_new, imap_login,
                          imaplib_ok, module_server, new_user)

imap_server = module_server()


def fetched_sizes(c: RawIMAP, mailbox: str = "INBOX") -> list[int]:
    c.select(mailbox)
    sizes = [int(bytes(v["RFC822.SIZE"])) for v in c.fetch("1:*", "(RFC822.SIZE)").values()]
    c.ok(b"UNSELECT")
    return sizes


def status_size(c: RawIMAP, mailbox: str = "INBOX") -> tuple[int, int]:
    r = c.ok(f'STATUS "{mailbox}" (MESSAGES SIZE)')
    m = re.fullmatch(rb'STATUS "?[^"]+"? \(MESSAGES (\d+) SIZE (\d+)\)', r.untagged[-1])
    assert m, str(r)
    return int(m.group(1)), int(m.group(2))


def test_capability_and_imaplib(imap_server):
    user = new_user(imap_server, "ss")
    sent = [deliver(imap_server, user, subject=f"m{i}") for i in range(3)]
    conn = imap_login(imap_server, user)
    try:
        assert "STATUS=SIZE" in conn.capabilities
        data = imaplib_ok(conn.status("INBOX", "(MESSAGES SIZE)"), "STATUS")
        m = re.search(rb"\(MESSAGES 3 SIZE (\d+)\)", data[0])
        assert m, data
        imaplib_ok(conn.select("INBOX", readonly=True))
        typ, rows = conn.fetch("1:*", "(RFC822.SIZE)")
        sizes = [int(x) for x in re.findall(rb"RFC822\.SIZE (\d+)", b" ".join(
            r if isinstance(r, bytes) else r[0] for r in rows))]
        assert len(sizes) == 3 and int(m.group(1)) == sum(sizes), (data, rows)
        assert int(m.group(1)) >= sum(len(s) for s in sent)
    finally:
        close_quietly(conn)


def test_foreign_files_are_counted_as_fetch_counts_them(imap_server):
    user = new_user(imap_server, "sf")
    maildir = imap_server.maildir(user)
    deliver(imap_server, user, subject="ours")
    dovecot = b"Subject: dovecot\nFrom: a@b.test\n\nline one\nline two\n"
    drop_into_new(maildir, dovecot, name="1700000000.M1P1.dovecothost,S=%d,W=%d"
                  % (len(dovecot), len(dovecot.replace(b"\n", b"\r\n"))))
    procmail = b"Subject: procmail\n\n" + b"text\n" * 500
    drop_into_new(maildir, procmail, name="1700000001.M2P2.procmailhost")
    mixed = b"Subject: mixed\r\n\r\nbare\nlf\r\n"   # CRLF first line, a bare LF later
    drop_into_new(maildir, mixed, name="1700000002.M3P3.otherhost")
    c = RawIMAP.login(imap_server, user)
    try:
        count, size = status_size(c)        # STATUS first: it measures what it must
        assert count == 4
        assert size == sum(fetched_sizes(c)), "STATUS SIZE is not the sum of RFC822.SIZE"
        assert status_size(c) == (count, size)
    finally:
        c.close()
    other = new_user(imap_server, "sg")   # FETCH first, then STATUS
    drop_into_new(imap_server.maildir(other), procmail, name="1700000003.M4P4.procmailhost")
    drop_into_new(imap_server.maildir(other), mixed, name="1700000004.M5P5.otherhost")
    c = RawIMAP.login(imap_server, other)
    try:
        sizes = fetched_sizes(c)
        assert status_size(c) == (2, sum(sizes))
    finally:
        c.close()


def test_list_status_and_changes(imap_server):
    user = new_user(imap_server, "sl")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok(b"CREATE Box")
        assert status_size(c, "Box") == (0, 0)
        message = b"Subject: appended\r\n\r\n" + b"x" * 1000 + b"\r\n"
        assert c.append("Box", message).status == "OK"
        assert c.append("Box", message + b"more\r\n").status == "OK"
        r = c.ok(b'LIST "" "*" RETURN (STATUS (SIZE MESSAGES))')
        statuses = dict(re.fullmatch(rb'STATUS "?([^" ]+)"? \((.*)\)', u).groups()
                        for u in r.with_prefix(b"") if u.startswith(b"STATUS "))
        assert statuses[b"Box"] == b"SIZE %d MESSAGES 2" % (2 * len(message) + 6), str(r)
        assert statuses[b"INBOX"] == b"SIZE 0 MESSAGES 0", str(r)
        c.select("Box")
        c.ok(b"STORE 1 +FLAGS (\\Deleted)")
        c.ok(b"EXPUNGE")
        c.ok(b"UNSELECT")
        assert status_size(c, "Box") == (1, len(message) + 6)
    finally:
        c.close()


def test_bad_input_keeps_the_session(imap_server):
    user = new_user(imap_server, "sb")
    c = RawIMAP.login(imap_server, user)
    try:
        for text in (b"STATUS INBOX (SIZE BOGUS)", b"STATUS INBOX (SIZE", b"STATUS INBOX SIZE",
                     b'LIST "" "*" RETURN (STATUS (SIZE X))'):
            assert c.command(text).status == "BAD", text
        assert c.command(b"STATUS NoSuchBox (SIZE)").status == "NO"
        assert status_size(c) == (0, 0)
    finally:
        c.close()
