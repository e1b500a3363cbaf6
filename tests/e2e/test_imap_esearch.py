"""ESEARCH (RFC 4731) against the real server: SEARCH RETURN (MIN MAX ALL COUNT), RETURN ()
meaning ALL, UID SEARCH, no matches, the CONDSTORE MODSEQ return data, and bad input."""

from __future__ import annotations

from imap_helpers import RawIMAP, deliver, module_server, new_user

imap_server = module_server()


def test_esearch_return_options(imap_server):
    user = new_user(imap_server, "es")
    for i in range(5):
        deliver(imap_server, user, subject=f"m{i}")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        assert b"ESEARCH" in c.command(b"CAPABILITY").untagged[0]
        c.command(b"STORE 2,4 +FLAGS (\\Seen)")
        r = c.command(b"SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN", tag=b"t1")
        assert r.status == "OK" and r.untagged == [
            b'ESEARCH (TAG "t1") MIN 1 MAX 5 ALL 1,3,5 COUNT 3'], str(r)
        r = c.command(b"SEARCH RETURN () 1:3", tag=b"t2")   # () is ALL
        assert r.untagged == [b'ESEARCH (TAG "t2") ALL 1:3'], str(r)
        r = c.command(b"UID SEARCH RETURN (COUNT MIN) DELETED", tag=b"t3")
        assert r.untagged == [b'ESEARCH (TAG "t3") UID COUNT 0'], str(r)
        uids = c.command(b"UID SEARCH ALL").untagged[0].split()[1:]
        r = c.command(b"UID SEARCH RETURN (MAX) CHARSET UTF-8 SUBJECT m", tag=b"t4")
        assert r.untagged == [b'ESEARCH (TAG "t4") UID MAX ' + uids[-1]], str(r)
        r = c.command(b"SEARCH RETURN (ALL) MODSEQ 1", tag=b"t5")   # RFC 7162 3.1.5
        assert r.status == "OK" and r.untagged[-1].startswith(
            b'ESEARCH (TAG "t5") ALL 1:5 MODSEQ '), str(r)
        assert c.command(b"SEARCH RETURN ALL").status == "BAD"
        assert c.command(b"SEARCH RETURN (BOGUS) ALL").status == "BAD"
        assert c.command(b"SEARCH RETURN (SAVE SAVE) ALL").status == "BAD"
        assert c.command(b"SEARCH UNSEEN").untagged == [b"SEARCH 1 3 5"]
    finally:
        c.close()
