"""SEARCHRES (RFC 5182) and ESORT (RFC 5267 3) against the real server over TLS: SAVE and
"$" in every command that takes a sequence set, "$" as UIDs whatever the command, its
lifetime (empty at first, reset by SELECT/EXAMINE/CLOSE/UNSELECT, emptied by a NO, kept by
a BAD, expunged messages leaving it), MIN/MAX with SAVE, pipelining, SORT RETURN (...) in
sorted order, imaplib as a client, and bad input."""

from __future__ import annotations

import re

from imap_helpers import (RawIMAP, close_quietly, deliver, imap_login, imaplib_ok,
                          module_server, new_user, quote)

imap_server = module_server()

SUBJECTS = ["delta", "alpha", "echo", "charlie", "bravo", "foxtrot"]


def mailbox_with(server, prefix: str) -> str:
    user = new_user(server, prefix)
    for subject in SUBJECTS:
        deliver(server, user, subject=subject)
    return user


def fetched(r) -> list[int]:
    return sorted(r.fetches())


def uids_of(r) -> list[int]:
    return sorted(int(bytes(v["UID"])) for v in r.fetches().values())


def esearch(r, tag: bytes) -> bytes:
    lines = [u for u in r.untagged if u.startswith(b'ESEARCH (TAG "' + tag + b'")')]
    assert len(lines) == 1, str(r)
    return lines[0]


def test_capabilities(imap_server):
    user = new_user(imap_server, "srcap")
    c = RawIMAP.login(imap_server, user)
    try:
        assert {"SEARCHRES", "ESORT", "ESEARCH"} <= c.capabilities()
    finally:
        c.close()


def test_save_and_dollar_in_every_command(imap_server):
    user = mailbox_with(imap_server, "srall")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        c.ok("CREATE Saved")
        c.ok("STORE 2,4,5 +FLAGS (\\Flagged)")
        r = c.ok("SEARCH RETURN (SAVE) FLAGGED")
        assert not r.with_prefix(b"SEARCH") and not r.with_prefix(b"ESEARCH"), str(r)
        assert fetched(c.ok("FETCH $ (FLAGS)")) == [2, 4, 5]
        assert uids_of(c.ok("UID FETCH $ (FLAGS)")) == [2, 4, 5]   # "$" is UIDs (2.1)
        assert c.ok("SEARCH $").search() == [2, 4, 5]
        assert c.ok("UID SEARCH UID $ NOT 4").search() == [2, 5]
        assert c.ok("SEARCH OR $ 6").search() == [2, 4, 5, 6]
        r = c.ok("STORE $ +FLAGS (\\Answered)")
        assert sorted(r.fetches()) == [2, 4, 5]
        c.ok("UID STORE $ -FLAGS.SILENT (\\Answered)")
        r = c.ok("COPY $ Saved")
        assert r.codes()["COPYUID"].endswith(b" 2,4:5 1:3"), str(r)
        r = c.ok("UID COPY $ Saved")
        assert r.codes()["COPYUID"].endswith(b" 2,4:5 4:6"), str(r)
        # MOVE: the moved messages are expunged and leave "$".
        c.ok("SEARCH RETURN (SAVE) 5:6")
        r = c.ok("MOVE $ Saved")
        assert r.numbers(b"EXPUNGE") == [5, 5], str(r)
        assert c.ok("UID SEARCH $").search() == []
        assert c.ok("STATUS Saved (MESSAGES)").with_prefix(b"STATUS")[0].endswith(
            b"(MESSAGES 8)")
        # UID SEARCH saves UIDs; a plain FETCH $ gets the message numbers of those UIDs.
        c.ok("UID SEARCH RETURN (SAVE) UID 3:4")
        assert fetched(c.ok("FETCH $ (UID)")) == [3, 4]
        c.ok("UID STORE $ +FLAGS.SILENT (\\Deleted)")
        r = c.ok("UID EXPUNGE $")
        assert r.numbers(b"EXPUNGE") == [3, 3], str(r)
        r = c.ok("FETCH $ (UID)")   # expunged: nothing left, still OK (2.1)
        assert not r.fetches(), str(r)
        r = c.ok("THREAD ORDEREDSUBJECT UTF-8 $")
        assert r.with_prefix(b"THREAD") == [b""], str(r)
    finally:
        c.close()


def test_dollar_lifetime(imap_server):
    user = mailbox_with(imap_server, "srlife")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        r = c.ok("FETCH $ (UID)")   # before any SAVE: the empty set
        assert not r.untagged, str(r)
        for reset in ("SELECT INBOX", "EXAMINE INBOX", "UNSELECT", "CLOSE"):
            c.ok("SEARCH RETURN (SAVE) 1:3")
            assert c.ok("SEARCH $").search() == [1, 2, 3]
            c.ok(reset)
            if not reset.startswith(("SELECT", "EXAMINE")):
                assert c.command("FETCH $ (UID)").status == "BAD"   # nothing selected
                c.ok("SELECT INBOX")
            assert c.ok("SEARCH $").search() == [], reset
        # NO empties it (RFC 5182 2.1), BAD leaves it alone.
        c.ok("SEARCH RETURN (SAVE) 2:3")
        assert c.command("SEARCH RETURN (SAVE) NOSUCHKEY").status == "BAD"
        assert c.command("SEARCH RETURN (SAVE SAVE) ALL").status == "BAD"
        assert c.ok("SEARCH $").search() == [2, 3]
        r = c.command("SEARCH RETURN (SAVE) CHARSET KOI8-R ALL")
        assert r.status == "NO" and "BADCHARSET" in r.codes(), str(r)
        assert c.ok("SEARCH $").search() == []
        c.ok("SEARCH RETURN (SAVE) 2:3")
        r = c.command("SEARCH CHARSET KOI8-R ALL")   # a NO without SAVE changes nothing
        assert r.status == "NO"
        assert c.ok("SEARCH $").search() == [2, 3]
        c.ok("SEARCH 1")   # nor does a SEARCH without SAVE
        assert c.ok("SEARCH $").search() == [2, 3]
    finally:
        c.close()


def test_expunge_by_another_session_leaves_dollar(imap_server):
    user = mailbox_with(imap_server, "srexp")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    other = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        c.ok("SEARCH RETURN (SAVE) 2:4")
        other.ok("STORE 3 +FLAGS.SILENT (\\Deleted)")
        other.ok("EXPUNGE")
        # FETCH may not announce the expunge (RFC 3501 7.4.1): "$" still names it.
        r = c.ok("FETCH $ (UID)")
        assert not r.numbers(b"EXPUNGE"), str(r)
        r = c.ok("NOOP")
        assert r.numbers(b"EXPUNGE") == [3], str(r)
        assert c.ok("SEARCH $").search() == [2, 3]   # UIDs 2 and 4, renumbered
        assert c.ok("UID SEARCH $").search() == [2, 4]
    finally:
        c.close()
        other.close()


def test_min_max_and_partial_with_save(imap_server):
    user = mailbox_with(imap_server, "srmin")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        r = c.ok("SEARCH RETURN (SAVE MIN) 2:5")
        assert esearch(r, r.tag) == b'ESEARCH (TAG "%s") MIN 2' % r.tag
        assert c.ok("SEARCH $").search() == [2]
        c.ok("SEARCH RETURN (MAX SAVE) 2:5")
        assert c.ok("SEARCH $").search() == [5]
        c.ok("SEARCH RETURN (MIN MAX SAVE) 2:5")
        assert c.ok("SEARCH $").search() == [2, 5]
        c.ok("SEARCH RETURN (MIN COUNT SAVE) 2:5")    # with COUNT: all found (2.4)
        assert c.ok("SEARCH $").search() == [2, 3, 4, 5]
        c.ok("SEARCH RETURN (MAX ALL SAVE) 3:4")
        assert c.ok("SEARCH $").search() == [3, 4]
        c.ok("SEARCH RETURN (SAVE) SUBJECT nothing-like-this")
        assert c.ok("SEARCH $").search() == []
    finally:
        c.close()


def test_pipelined_save_and_use(imap_server):
    """RFC 5182 2.2.3: sent in one go, each command sees what the one before saved."""
    user = mailbox_with(imap_server, "srpipe")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        c.send(b"p1 SEARCH RETURN (SAVE) SUBJECT alpha\r\n"
               b"p2 STORE $ +FLAGS (\\Flagged)\r\n"
               b"p3 UID SEARCH RETURN (SAVE) OR SUBJECT echo SUBJECT bravo\r\n"
               b"p4 FETCH $ (UID FLAGS)\r\n"
               b"p5 SEARCH $ FLAGGED\r\n")
        results = {t: c.read_result(t) for t in (b"p1", b"p2", b"p3", b"p4", b"p5")}
        assert all(r.status == "OK" for r in results.values()), results
        assert sorted(results[b"p2"].fetches()) == [2]
        assert sorted(results[b"p4"].fetches()) == [3, 5]
        assert results[b"p5"].search() == []
    finally:
        c.close()


def test_esort(imap_server):
    user = mailbox_with(imap_server, "esort")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        # delta alpha echo charlie bravo foxtrot: by subject 2,5,4,1,3,6
        r = c.ok("SORT RETURN (MIN MAX COUNT ALL) (SUBJECT) UTF-8 ALL")
        assert esearch(r, r.tag) == b'ESEARCH (TAG "%s") MIN 2 MAX 6 ALL 2,5,4,1,3,6 COUNT 6' \
            % r.tag
        assert not r.with_prefix(b"SORT "), str(r)
        r = c.ok("UID SORT RETURN () (REVERSE SUBJECT) UTF-8 NOT 6")
        assert esearch(r, r.tag) == b'ESEARCH (TAG "%s") UID ALL 3,1,4:5,2' % r.tag
        r = c.ok("SORT RETURN (PARTIAL 2:4) (SUBJECT) UTF-8 ALL")
        assert esearch(r, r.tag) == b'ESEARCH (TAG "%s") PARTIAL (2:4 5,4,1)' % r.tag
        r = c.ok("SORT RETURN (COUNT MIN) (SUBJECT) UTF-8 SUBJECT zzz")
        assert esearch(r, r.tag) == b'ESEARCH (TAG "%s") COUNT 0' % r.tag
        r = c.ok("SORT RETURN (SAVE MIN) (SUBJECT) UTF-8 NOT SUBJECT alpha")
        assert esearch(r, r.tag) == b'ESEARCH (TAG "%s") MIN 5' % r.tag
        assert c.ok("SEARCH $").search() == [5]      # the first sorted, not the lowest
        r = c.ok("UID SORT RETURN (SAVE) (REVERSE SUBJECT) UTF-8 SUBJECT o")
        assert not r.with_prefix(b"ESEARCH") and not r.with_prefix(b"SORT"), str(r)
        assert c.ok("UID SEARCH $").search() == [3, 5, 6]   # echo, bravo, foxtrot
        assert c.ok("SORT (SUBJECT) UTF-8 ALL").with_prefix(b"SORT ") == [b"2 5 4 1 3 6"]
    finally:
        c.close()


def test_imaplib_client(imap_server):
    user = mailbox_with(imap_server, "srlib")
    conn = imap_login(imap_server, user)
    try:
        imaplib_ok(conn.select("INBOX"), "SELECT")
        imaplib_ok(conn.store("1,3", "+FLAGS", "(\\Flagged)"), "STORE")
        imaplib_ok(conn.uid("SEARCH", "RETURN", "(SAVE)", "FLAGGED"), "UID SEARCH SAVE")
        data = imaplib_ok(conn.fetch("$", "(UID)"), "FETCH $")
        assert sorted(re.findall(rb"UID (\d+)", b" ".join(data))) == [b"1", b"3"]
        typ, data = conn.uid("SORT", "RETURN", "(ALL)", "(SUBJECT)", "UTF-8", "ALL")
        assert typ == "OK", data
        typ, esearch_data = conn.response("ESEARCH")
        assert esearch_data[-1].endswith(b"UID ALL 2,5,4,1,3,6"), esearch_data
    finally:
        close_quietly(conn)


def test_bad_input_and_the_session_goes_on(imap_server):
    user = mailbox_with(imap_server, "srbad")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        for command in [b"SEARCH RETURN (SAVE ALL", b"SEARCH RETURN (SAVE) $$",
                        b"SEARCH $1", b"FETCH $,1 (UID)", b"FETCH $:3 (UID)",
                        b"FETCH ($) (UID)", b"SORT RETURN (BOGUS) (DATE) UTF-8 ALL",
                        b"SORT RETURN (PARTIAL 0:1) (DATE) UTF-8 ALL",
                        b"SORT RETURN (PARTIAL 1:4294967296) (DATE) UTF-8 ALL",
                        b"SORT RETURN (PARTIAL 1:*) (DATE) UTF-8 ALL",
                        b"SORT RETURN (ALL PARTIAL 1:5) (DATE) UTF-8 ALL",
                        b"SORT RETURN (MIN) UTF-8 ALL",
                        b"SORT RETURN (MIN) (DATE) UTF-8",
                        b"SORT RETURN (" + b"MIN " * 40 + b") (DATE) UTF-8 ALL",
                        b"SEARCH RETURN (" + b"PARTIAL 1:2 " * 5000 + b") ALL",
                        b"STORE $ +FLAGS (\\Bogus)", b"COPY $"]:
            r = c.command(command)
            assert r.status == "BAD", f"{command[:80]!r}: {r}"
        r = c.command(b"SORT RETURN (MIN) (DATE) KOI8-R ALL")
        assert r.status == "NO" and "BADCHARSET" in r.codes(), str(r)
        r = c.command(b"COPY $ " + quote("No such box"))
        assert r.status == "NO" and "TRYCREATE" in r.codes(), str(r)
        assert c.ok("SEARCH 1:2").search() == [1, 2]
    finally:
        c.close()
