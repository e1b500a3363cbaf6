"""UTF8=ACCEPT (RFC 6855) against the real server: after ENABLE UTF8=ACCEPT mailbox names
are UTF-8 both ways (imaplib's UTF-8 mode and raw sessions), APPEND takes UTF8 (~{n}...)
and stores messages with UTF-8 header fields (RFC 6532) as they are, SEARCH with a
CHARSET is BAD; a client that did not enable it keeps modified UTF-7 names, gets BAD for
the UTF8 data item and the stored octets as they are."""

from __future__ import annotations

from imap_helpers import (Lit, RawIMAP, close_quietly, imap_login, imaplib_ok, module_server,
                          new_user, parse_data)

imap_server = module_server()

MESSAGE = ("From: Jörg <jörg@bücher.example>\r\nTo: ä@example.test\r\n"
           "Subject: Grüße aus 日本\r\nMessage-ID: <1@bücher.example>\r\n\r\nÄpfel\r\n").encode()


def listed_names(c: RawIMAP, pattern: bytes = b'"*"') -> list[bytes]:
    r = c.ok(b'LIST "" ' + pattern)
    return [bytes(parse_data(rest)[2]) for rest in r.with_prefix(b"LIST ")]


def enable(c: RawIMAP) -> None:
    r = c.ok(b"ENABLE UTF8=ACCEPT")
    assert r.with_prefix(b"ENABLED") == [b" UTF8=ACCEPT"], str(r)


def test_names_both_ways(imap_server):
    user = new_user(imap_server, "u8")
    plain = RawIMAP.login(imap_server, user)
    conn = imap_login(imap_server, user)
    try:
        assert "UTF8=ACCEPT" in conn.capabilities
        plain.ok(b"CREATE Entw&APw-rfe")
        imaplib_ok(conn.enable("UTF8=ACCEPT"), "ENABLE")
        typ, data = conn.list('""', '"Entw*"')
        assert typ == "OK" and data == ['(\\HasNoChildren) "." "Entwürfe"'.encode()], data
        imaplib_ok(conn.create('"日本語"'), "CREATE")
        imaplib_ok(conn.create('"R&D"'), "CREATE")
        imaplib_ok(conn.select('"Entwürfe"'), "SELECT")
        typ, data = conn.status('"日本語"', "(MESSAGES)")
        assert typ == "OK" and data == ['"日本語" (MESSAGES 0)'.encode()], data
        # A client that did not enable it sees the same folders in modified UTF-7.
        names = listed_names(plain)
        assert {b"Entw&APw-rfe", b"&ZeVnLIqe-", b"R&-D"} <= set(names), names
        assert (imap_server.maildir(user) / ".&ZeVnLIqe-").is_dir()
        plain.ok(b'SELECT "&ZeVnLIqe-"')
    finally:
        close_quietly(conn)
        plain.close()


def test_bad_names_after_enable(imap_server):
    user = new_user(imap_server, "u8b")
    c = RawIMAP.login(imap_server, user)
    try:
        enable(c)
        for name in ('"a\u0085b"'.encode(), b'"\xff\xfe"', '"x\u2028"'.encode()):
            r = c.command(b"CREATE " + name)
            assert r.status == "NO", str(r)
        assert c.command(b'CREATE "unterminated').status == "BAD"
        assert c.command(b"NOOP").status == "OK"
        assert not [n for n in listed_names(c) if n not in (b"INBOX", b"Sent", b"Drafts",
                                                            b"Trash", b"Junk", b"Archive")]
    finally:
        c.close()


def test_append_utf8_and_search(imap_server):
    user = new_user(imap_server, "u8a")
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.command_parts([b"APPEND INBOX UTF8 (~", Lit(MESSAGE), b")"])
        assert r.status == "BAD" and not r.continuations, str(r)   # RFC 6855 4: not enabled
        r = c.command_parts([b"APPEND INBOX UTF8 (~", Lit(MESSAGE), b")"], non_sync=True)
        assert r.status == "BAD", str(r)
        assert c.command(b"NOOP").status == "OK"
        enable(c)
        r = c.command_parts([b"APPEND INBOX (\\Seen) UTF8 (~", Lit(MESSAGE), b")"])
        assert r.status == "OK" and r.code.startswith(b"APPENDUID"), str(r)
        r = c.command_parts([b'APPEND "INBOX" UTF8 (~', Lit(MESSAGE), b")"], non_sync=True)
        assert r.status == "OK", str(r)
        c.select("INBOX")
        bodies = c.fetch("1:2", "(BODY.PEEK[])")
        assert [bytes(v["BODY[]"]) for _, v in sorted(bodies.items())] == [MESSAGE, MESSAGE]
        stored = [p.read_bytes() for p in imap_server.messages(user)]
        assert stored == [MESSAGE, MESSAGE]
        r = c.command('SEARCH CHARSET UTF-8 SUBJECT "Grüße"'.encode())
        assert r.status == "BAD", str(r)                   # RFC 6855 3
        r = c.command('SEARCH SUBJECT "日本"'.encode())
        assert r.status == "OK" and r.search() == [1, 2], str(r)
    finally:
        c.close()


def test_clients_that_did_not_enable(imap_server):
    user = new_user(imap_server, "u8n")
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.append("INBOX", MESSAGE)            # 8-bit headers in a plain literal
        assert r.status == "OK", str(r)
        assert [p.read_bytes() for p in imap_server.messages(user)] == [MESSAGE]
        c.select("INBOX")
        items = c.fetch("1", "(BODY.PEEK[] ENVELOPE)")[1]
        assert bytes(items["BODY[]"]) == MESSAGE
        assert bytes(items["ENVELOPE"][1]) == "Grüße aus 日本".encode()
        r = c.command('SEARCH CHARSET UTF-8 SUBJECT "Grüße"'.encode())
        assert r.status == "OK" and r.search() == [1], str(r)
    finally:
        c.close()
