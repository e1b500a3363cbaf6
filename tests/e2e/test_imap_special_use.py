"""CREATE-SPECIAL-USE (RFC 6154 3) against the real server: CREATE name (USE (\\Archive)),
the attribute in LIST with RETURN (SPECIAL-USE) and the (SPECIAL-USE) selection, kept
across a restart, following RENAME and going with DELETE; the default folders keep their
attributes; refused attributes are NO [USEATTR] and create nothing; garbage is BAD."""

from __future__ import annotations

import re

from imap_helpers import (SPECIAL_USE, RawIMAP, close_quietly, imap_login, imaplib_ok,
                          module_server, new_user, parse_data)

ALICE = "alice@example.test"
imap_server = module_server()


def uses(c: RawIMAP, command: bytes = b'LIST "" "*" RETURN (SPECIAL-USE)') -> dict[str, set[str]]:
    """{mailbox: its attributes} from a LIST."""
    r = c.ok(command)
    out = {}
    for rest in r.with_prefix(b"LIST "):
        attrs, _, name = parse_data(rest)[:3]
        out[bytes(name).decode()] = {bytes(a).decode() for a in attrs}
    return out


def test_create_with_use_persists(make_server):
    server = make_server()
    c = RawIMAP.login(server, ALICE)
    try:
        assert "CREATE-SPECIAL-USE" in c.capabilities()
        r = c.command(b"CREATE MyArchive (USE (\\Archive))")
        assert r.status == "OK", str(r)
        r = c.command(b'CREATE "Work.Old Mail" (USE (\\Trash))')   # parents made too
        assert r.status == "OK", str(r)
        listed = uses(c)
        assert "\\Archive" in listed["MyArchive"]
        assert "\\Trash" in listed["Work.Old Mail"]
        for name, use in SPECIAL_USE.items():          # the defaults are still there
            assert use in listed[name], (name, listed)
        selected = uses(c, b'LIST (SPECIAL-USE) "" "*"')
        assert set(selected) == {*SPECIAL_USE, "MyArchive", "Work.Old Mail"}, selected
        assert not uses(c, b'LIST (SPECIAL-USE) "" "Work"')   # the parent has no use
    finally:
        c.close()

    server.stop()
    server.start()
    conn = imap_login(server, ALICE)
    try:
        typ, data = conn.list('""', "*")
        assert typ == "OK", data
        lines = {re.search(rb'"\." "?([^"]+)"?$', d).group(1): d for d in data}
        assert b"\\Archive" in lines[b"MyArchive"], data
        assert b"\\Trash" in lines[b"Work.Old Mail"], data
        imaplib_ok(conn.select("MyArchive"), "SELECT")
    finally:
        close_quietly(conn)


def test_rename_and_delete(imap_server):
    c = RawIMAP.login(imap_server, new_user(imap_server, "sur"))
    try:
        c.ok(b"CREATE Keep (USE (\\Junk))")
        c.ok(b"CREATE Keep.Sub (USE (\\Drafts))")
        c.ok(b"RENAME Keep Kept")
        listed = uses(c)
        assert "\\Junk" in listed["Kept"] and "\\Drafts" in listed["Kept.Sub"], listed
        assert "Keep" not in listed
        c.ok(b"DELETE Kept.Sub")
        c.ok(b"CREATE Kept.Sub")                      # a new folder: no use
        assert not {"\\Drafts"} & uses(c)["Kept.Sub"]
        c.ok(b"CREATE Again (USE (\\Sent))")
        c.ok(b"DELETE Again")
        c.ok(b"CREATE Again")
        assert "\\Sent" not in uses(c)["Again"]
    finally:
        c.close()


def test_refused_and_bad(imap_server):
    c = RawIMAP.login(imap_server, new_user(imap_server, "sub"))
    try:
        for text in (b"CREATE X1 (USE (\\Bogus))", b"CREATE X2 (USE (\\All))",
                     b"CREATE X3 (USE (\\Flagged))", b"CREATE X4 (USE (\\Sent \\Trash))"):
            r = c.command(text)
            assert r.status == "NO" and r.code == b"USEATTR", str(r)
        for text in (b"CREATE X5 (USE)", b"CREATE X6 (USE (Sent))", b"CREATE X7 (FOO)",
                     b"CREATE X8 (USE (\\Sent)", b"CREATE X9 ()", b"CREATE X10 (USE \\Sent)",
                     b"CREATE X11 (USE (\\Sent)) trailing",
                     b"CREATE X12 (USE (" + b"\\Sent " * 100 + b"))"):
            r = c.command(text)
            assert r.status == "BAD", str(r)
        r = c.command(b"CREATE INBOX (USE (\\Archive))")
        assert r.status == "NO", str(r)
        listed = uses(c)
        assert not [n for n in listed if n.startswith("X")], listed
        r = c.command(b"CREATE Plain (USE ())")   # an empty list: no use
        assert r.status == "OK", str(r)
        assert not uses(c)["Plain"] & {"\\Archive", "\\Sent", "\\Trash", "\\Junk", "\\Drafts"}
        assert c.command(b"NOOP").status == "OK"
    finally:
        c.close()


def test_imaplib_create_with_use(imap_server):
    """imaplib sending CREATE's parameter list as one more argument."""
    conn = imap_login(imap_server, new_user(imap_server, "sui"))
    try:
        typ, data = conn._simple_command("CREATE", "Lib", "(USE (\\Archive))")
        assert typ == "OK", data
        typ, data = conn.list('""', "Lib")
        assert typ == "OK" and b"\\Archive" in data[0], data
    finally:
        close_quietly(conn)
