"""IMAP4rev2 (RFC 9051) against the real server: advertised beside IMAP4rev1; after
ENABLE IMAP4rev2 no \\Recent and no RECENT, SEARCH answered with ESEARCH (TAG ...),
UTF-8 mailbox names, SELECT with a LIST response and OK [CLOSED]; STATUS DELETED for
both revisions; a client that does not enable it sees IMAP4rev1 as before."""

from __future__ import annotations

import unicodedata

from imap_helpers import (RawIMAP, close_quietly, deliver, flags_of, imap_login, imaplib_ok,
                          module_server, new_user, parse_data)

imap_server = module_server()


def enable_rev2(c: RawIMAP) -> None:
    r = c.ok(b"ENABLE IMAP4rev2")
    assert r.with_prefix(b"ENABLED") == [b" IMAP4rev2"], str(r)


def test_advertised_with_rev1(imap_server):
    c = RawIMAP.connect(imap_server)
    try:
        caps = c.capabilities()
        assert {"IMAP4rev1", "IMAP4rev2", "LITERAL+"} <= caps, caps
        assert "LITERAL-" not in caps   # RFC 7888: not both; LITERAL+ is the superset
    finally:
        c.close()
    conn = imap_login(imap_server)
    try:
        assert "IMAP4REV2" in conn.capabilities and "IMAP4REV1" in conn.capabilities
        typ, data = conn._simple_command("ENABLE", "IMAP4rev2")
        assert typ == "OK"
        assert conn.untagged_responses.get("ENABLED") == [b"IMAP4rev2"]
    finally:
        close_quietly(conn)


def test_no_recent_after_enable(imap_server):
    user = new_user(imap_server, "r2rec")
    deliver(imap_server, user, subject="one")
    deliver(imap_server, user, subject="two")
    c = RawIMAP.login(imap_server, user)
    try:
        enable_rev2(c)
        assert c.command(b"ENABLE IMAP4rev2").with_prefix(b"ENABLED") == [b""]  # once only
        r = c.select("INBOX")
        assert r.numbers(b"EXISTS") == [2], str(r)
        assert r.numbers(b"RECENT") == [], str(r)
        assert "UNSEEN" not in r.codes(), str(r)
        assert {"UIDVALIDITY", "UIDNEXT", "PERMANENTFLAGS"} <= set(r.codes()), str(r)
        lists = r.with_prefix(b"LIST ")
        assert len(lists) == 1, str(r)           # RFC 9051 6.3.2
        attrs, delim, name = parse_data(lists[0])
        assert bytes(name) == b"INBOX" and bytes(delim) == b".", lists
        fetched = c.fetch("1:*", "(FLAGS)")
        assert all("\\Recent" not in flags_of(v["FLAGS"]) for v in fetched.values()), fetched
        r = c.ok(b"SEARCH RECENT")
        assert r.with_prefix(b"ESEARCH") == [b' (TAG "' + r.tag + b'")'], str(r)
        # New mail while selected: EXISTS, no RECENT.
        deliver(imap_server, user, subject="three")
        r = c.ok(b"NOOP")
        for _ in range(20):
            if r.numbers(b"EXISTS"):
                break
            r = c.ok(b"NOOP")
        assert r.numbers(b"EXISTS") == [3] and r.numbers(b"RECENT") == [], str(r)
    finally:
        c.close()
    # The messages stay \Recent for a rev1 session: the rev2 one did not take them.
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.select("INBOX")
        assert r.numbers(b"RECENT") == [3], str(r)
    finally:
        c.close()


def test_search_answers_esearch(imap_server):
    user = new_user(imap_server, "r2s")
    for subject in ("a", "b", "c"):
        deliver(imap_server, user, subject=subject)
    c = RawIMAP.login(imap_server, user)
    try:
        enable_rev2(c)
        c.select("INBOX")
        r = c.ok(b"SEARCH ALL")
        assert r.with_prefix(b"SEARCH") == [], str(r)
        assert r.with_prefix(b"ESEARCH ") == [b'(TAG "' + r.tag + b'") ALL 1:3'], str(r)
        r = c.ok(b"UID SEARCH SUBJECT b")
        assert r.with_prefix(b"ESEARCH ") == [b'(TAG "' + r.tag + b'") UID ALL 2'], str(r)
        r = c.ok(b"SEARCH SUBJECT nothing-matches")
        assert r.with_prefix(b"ESEARCH ") == [b'(TAG "' + r.tag + b'")'], str(r)
        r = c.ok(b"SEARCH RETURN (COUNT MIN) ALL")
        assert r.with_prefix(b"ESEARCH ") == [b'(TAG "' + r.tag + b'") MIN 1 COUNT 3'], str(r)
        # CHARSET stays allowed (RFC 9051 6.4.4), unlike after ENABLE UTF8=ACCEPT.
        r = c.ok(b"SEARCH CHARSET UTF-8 SUBJECT c")
        assert r.with_prefix(b"ESEARCH ") == [b'(TAG "' + r.tag + b'") ALL 3'], str(r)
        r = c.ok(b"SEARCH RETURN (SAVE) SUBJECT a")
        assert r.with_prefix(b"ESEARCH") == [], str(r)       # SAVE alone answers nothing
        assert set(c.fetch("$", "(UID)")) == {1}
    finally:
        c.close()


def test_utf8_names(imap_server):
    user = new_user(imap_server, "r2u")
    plain = RawIMAP.login(imap_server, user)
    c = RawIMAP.login(imap_server, user)
    try:
        enable_rev2(c)
        c.ok('CREATE "Entwürfe"'.encode())
        c.ok(b'CREATE "R&D"')
        # A denormalised name reaches the same (NFC) mailbox.
        decomposed = unicodedata.normalize("NFD", "Entwürfe")
        assert decomposed != "Entwürfe"
        r = c.ok(b'SELECT "' + decomposed.encode() + b'"')
        lists = r.with_prefix(b"LIST ")
        assert [bytes(parse_data(x)[2]) for x in lists] == ["Entwürfe".encode()], str(r)
        r = c.ok(b'LIST "" "*"')
        names = {bytes(parse_data(x)[2]) for x in r.with_prefix(b"LIST ")}
        assert {"Entwürfe".encode(), b"R&D", b"INBOX"} <= names, names
        r = c.ok('STATUS "Entwürfe" (MESSAGES)'.encode())
        assert r.with_prefix(b"STATUS ") == ['"Entwürfe" (MESSAGES 0)'.encode()], str(r)
        # The rev1 session sees modified UTF-7.
        r = plain.ok(b'LIST "" "*"')
        names = {bytes(parse_data(x)[2]) for x in r.with_prefix(b"LIST ")}
        assert {b"Entw&APw-rfe", b"R&-D"} <= names, names
        assert c.command(b'CREATE "bad\x01name"').status in ("NO", "BAD")
    finally:
        c.close()
        plain.close()


def test_oldname_on_normalised_create_and_rename(imap_server):
    """RFC 9051 6.3.4: CREATE of a denormalised name answers with the NFC name and the
    name as sent in OLDNAME; 6.3.6: RENAME's LIST carries the old name.  A rev1 session
    gets neither."""
    user = new_user(imap_server, "r2old")
    plain = RawIMAP.login(imap_server, user)
    c = RawIMAP.login(imap_server, user)
    try:
        enable_rev2(c)
        decomposed = unicodedata.normalize("NFD", "Brouillés")
        r = c.ok(b'CREATE "' + decomposed.encode() + b'"')
        assert r.with_prefix(b"LIST ") == [
            ('() "." "Brouillés" ("OLDNAME" ("' + decomposed + '"))').encode()], str(r)
        r = c.ok('CREATE "Entwürfe"'.encode())        # already NFC: nothing to say
        assert r.with_prefix(b"LIST ") == [], str(r)
        r = c.ok('RENAME "Entwürfe" "Archiv.Entwürfe"'.encode())
        assert r.with_prefix(b"LIST ") == [
            '() "." "Archiv.Entwürfe" ("OLDNAME" ("Entwürfe"))'.encode()], str(r)
        r = plain.ok(b'CREATE "Old"')
        r = plain.ok(b'RENAME "Old" "New"')
        assert r.with_prefix(b"LIST ") == [], str(r)
    finally:
        c.close()
        plain.close()


def test_closed_on_reselect_and_status_deleted(imap_server):
    user = new_user(imap_server, "r2c")
    deliver(imap_server, user, subject="x")
    deliver(imap_server, user, subject="y")
    c = RawIMAP.login(imap_server, user)
    plain = RawIMAP.login(imap_server, user)
    try:
        enable_rev2(c)
        c.select("INBOX")
        c.ok(b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        r = c.select("Trash", examine=True)
        assert r.untagged[0].startswith(b"OK [CLOSED]"), str(r)
        r = c.ok(b"STATUS INBOX (MESSAGES DELETED UNSEEN)")
        assert r.with_prefix(b"STATUS ") == [b"INBOX (MESSAGES 2 DELETED 1 UNSEEN 2)"], str(r)
        # STATUS DELETED is accepted from a rev1 client too; LIST-STATUS as well.
        r = plain.ok(b"STATUS INBOX (DELETED)")
        assert r.with_prefix(b"STATUS ") == [b"INBOX (DELETED 1)"], str(r)
        r = plain.ok(b'LIST "" INBOX RETURN (STATUS (DELETED))')
        assert r.with_prefix(b"STATUS ") == [b"INBOX (DELETED 1)"], str(r)
    finally:
        c.close()
        plain.close()


def test_rev1_unchanged(imap_server):
    user = new_user(imap_server, "r2old")
    deliver(imap_server, user, subject="one")
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.select("INBOX")
        assert r.numbers(b"RECENT") == [1] and r.with_prefix(b"LIST") == [], str(r)
        assert r.codes().get("UNSEEN") == b"1", str(r)
        assert "\\Recent" in flags_of(c.fetch("1", "(FLAGS)")[1]["FLAGS"])
        r = c.ok(b"SEARCH ALL")
        assert r.search() == [1] and r.with_prefix(b"ESEARCH") == [], str(r)
        r = c.select("INBOX")
        assert "CLOSED" not in r.codes(), str(r)
    finally:
        c.close()
    conn = imap_login(imap_server, user)
    try:
        imaplib_ok(conn.select("INBOX"), "SELECT")
        assert imaplib_ok(conn.search(None, "ALL"), "SEARCH") == [b"1"]
    finally:
        close_quietly(conn)


def test_imaplib_after_enable(imap_server):
    user = new_user(imap_server, "r2lib")
    deliver(imap_server, user, subject="hello")
    conn = imap_login(imap_server, user)
    try:
        typ, _ = conn._simple_command("ENABLE", "IMAP4rev2")
        assert typ == "OK"
        typ, data = conn.select("INBOX")
        assert typ == "OK" and data == [b"1"], data
        assert "RECENT" not in conn.untagged_responses
        typ, data = conn._simple_command("SEARCH", "ALL")
        assert typ == "OK"
        typ, data = conn._untagged_response(typ, data, "ESEARCH")
        assert data and data[0].endswith(b"ALL 1"), data
        typ, data = conn.fetch("1", "(FLAGS)")
        assert typ == "OK" and b"\\Recent" not in data[0], data
    finally:
        close_quietly(conn)
