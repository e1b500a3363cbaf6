"""RFC 4469 CATENATE against a real server: a new message made of TEXT literals and
URLs (RFC 5092) naming whole messages and sections in the same account, with MULTIAPPEND,
and NO [BADURL url] for URLs that cannot be used (nothing stored then)."""

from __future__ import annotations

import pytest

from imap_helpers import (
    DOMAIN,
    HOSTNAME,
    Lit,
    RawIMAP,
    close_quietly,
    message_files,
    module_server,
    multipart_message,
    new_user,
)

imap_server = module_server()


@pytest.fixture
def source(imap_server):
    """A user with a multipart message in INBOX: (user, uidvalidity, uid, sections)."""
    user = new_user(imap_server, "cat")
    mm = multipart_message()
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.append("INBOX", mm.data)
        assert r.status == "OK", str(r)
        validity, uid = r.codes()["APPENDUID"].split()
    finally:
        close_quietly(c)
    return user, int(validity), int(uid), mm


def last_message(c: RawIMAP, mailbox: str) -> bytes:
    r = c.select(mailbox, examine=True)
    n = r.numbers(b"EXISTS")[-1]
    return c.fetch(str(n), "BODY.PEEK[]")[n]["BODY[]"]


def test_capability(imap_server, source):
    c = RawIMAP.login(imap_server, source[0])
    try:
        caps = c.capabilities()
        assert "CATENATE" in caps
        assert "URLAUTH" not in caps
    finally:
        close_quietly(c)


def test_forward_with_new_header_and_attachment_by_url(imap_server, source):
    user, validity, uid, mm = source
    head = (b"From: " + user.encode() + b"\r\nTo: dave@remote.test\r\nSubject: Fwd\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"fw\"\r\n\r\n"
            b"--fw\r\n")
    tail = b"\r\n--fw--\r\n"
    base = f"/INBOX;UIDVALIDITY={validity}/;UID={uid}".encode()
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.command_parts([b"APPEND Drafts (\\Draft) CATENATE (TEXT ", Lit(head),
                             b' URL "' + base + b'/;SECTION=4.MIME" URL "' + base
                             + b'/;SECTION=4" TEXT ', Lit(tail), b")"])
        assert r.status == "OK" and "APPENDUID" in r.codes(), str(r)
        assert len(r.continuations) == 2
        got = last_message(c, "Drafts")
        assert got == head + mm.sections["4.MIME"] + mm.sections["4"] + tail
    finally:
        close_quietly(c)


@pytest.mark.parametrize("url,section", [
    ("/INBOX;UIDVALIDITY={v}/;UID={u}", ""),
    ("/INBOX/;UID={u}/;SECTION=HEADER", "HEADER"),
    ("/inbox/;UID={u}/;SECTION=3.TEXT", "3.TEXT"),
    ("/INBOX/;UID={u}/;SECTION=2.1", "2.1"),
    ("imap://{user}@" + HOSTNAME + "/INBOX;UIDVALIDITY={v}/;UID={u}/;SECTION=1", "1"),
])
def test_url_forms(imap_server, source, url, section):
    user, validity, uid, mm = source
    url = url.format(v=validity, u=uid, user=user.replace("@", "%40"))
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.command_parts([f'APPEND INBOX CATENATE (URL "{url}" TEXT '.encode(), Lit(b"."),
                             b")"], non_sync=True)
        assert r.status == "OK", str(r)
        assert last_message(c, "INBOX") == mm.sections[section] + b"."
    finally:
        close_quietly(c)


def test_multiappend_with_catenate(imap_server, source):
    user, validity, uid, mm = source
    plain = b"Subject: plain\r\n\r\nplain\r\n"
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.command_parts([b"APPEND Sent ", Lit(plain), b' CATENATE (URL "/INBOX/;UID=%d/;'
                             b'SECTION=HEADER" TEXT ' % uid, Lit(b"new body\r\n"), b") ",
                             Lit(plain)], non_sync=True)
        assert r.status == "OK", str(r)
        assert r.codes()["APPENDUID"].split()[1] == b"1:3"
        c.select("Sent", examine=True)
        assert c.fetch("2", "BODY.PEEK[]")[2]["BODY[]"] == mm.sections["HEADER"] + b"new body\r\n"
    finally:
        close_quietly(c)


@pytest.mark.parametrize("url", [
    "/INBOX;UIDVALIDITY=1/;UID={u}",            # UIDVALIDITY does not match
    "/INBOX/;UID=999",                          # no such message
    "/NoSuchFolder/;UID=1",
    "imap://carol%40" + DOMAIN + "@" + HOSTNAME + "/INBOX/;UID=1",   # another user's
    "imap://elsewhere.test/INBOX/;UID={u}",     # another server
    "/INBOX/;UID={u}/;URLAUTH=anonymous:internal:0123456789abcdef",
])
def test_bad_url_is_badurl_and_stores_nothing(imap_server, source, url):
    user, validity, uid, mm = source
    url = url.format(u=uid)
    if "UIDVALIDITY=1/" in url and validity == 1:
        url = url.replace("UIDVALIDITY=1/", "UIDVALIDITY=2/")
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.command_parts([b"APPEND INBOX CATENATE (TEXT ", Lit(b"x"),
                             f' URL "{url}" TEXT '.encode(), Lit(b"y"), b")"])
        assert r.status == "NO" and r.code == b"BADURL " + url.encode(), str(r)
        # The literal after the failed URL was refused instead of asked for.
        assert len(r.continuations) == 1, str(r)
        assert c.command("NOOP").status == "OK"
        r = c.command("STATUS INBOX (MESSAGES)")
        assert r.with_prefix(b"STATUS ") == [b"INBOX (MESSAGES 1)"], str(r)
    finally:
        close_quietly(c)
    assert len(message_files(imap_server.maildir(user))) == 1
    assert list((imap_server.maildir(user) / "tmp").iterdir()) == []
