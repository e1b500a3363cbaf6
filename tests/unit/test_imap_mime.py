"""MIME structure with offsets, ENVELOPE and BODYSTRUCTURE (RFC 3501 7.4.2)."""

import os
import tempfile
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.trial import unittest

from mailserver.imap.mime import (MessageBytes, body_structure, envelope, find_part,
                                  header_fields, imap_string, parse_structure)

MESSAGE = (
    b"From: A <a@x.test>\r\nTo: b@y.test, \"C D\" <c@z.test>\r\nSubject: hi\r\n"
    b"X-Dup: 1\r\nX-Dup: 2\r\nX-8bit: caf\xc3\xa9\r\n"
    b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n"
    b"preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\nworld\r\n"
    b"--XX\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n"
    b"--XX--\r\nepilogue\r\n")


def test_structure_offsets():
    root = parse_structure(MESSAGE)
    first = find_part(root, [1])
    assert MESSAGE[first.body_start:first.end] == b"hello\r\nworld"
    assert MESSAGE[first.start:first.body_start].startswith(b"Content-Type: text/plain")
    inner = find_part(root, [2, 1])
    assert MESSAGE[inner.body_start:inner.end] == b"inner body"
    assert find_part(root, [3]) is None


def test_bodystructure_and_envelope():
    root = parse_structure(MESSAGE)
    bs = body_structure(root)
    assert bs.startswith(b'(("TEXT" "PLAIN" ("charset" "utf-8") NIL NIL "7BIT" 12 2 ')
    assert b'"MESSAGE" "RFC822"' in bs and bs.endswith(b'"MIXED" ("boundary" "XX") NIL NIL NIL)')
    assert body_structure(root, extended=False).endswith(b'"MIXED")')
    env = envelope(root)
    assert env.startswith(b'(NIL "hi" (("A" NIL "a" "x.test"))')
    assert b'("C D" NIL "c" "z.test")' in env


def test_header_fields_keep_order_repeats_and_8bit():
    root = parse_structure(MESSAGE)
    got = header_fields(MESSAGE, root, [b"X-DUP", b"x-8bit"], negate=False)
    assert got == b"X-Dup: 1\r\nX-Dup: 2\r\nX-8bit: caf\xc3\xa9\r\n\r\n"
    not_got = header_fields(MESSAGE, root, [b"content-type"], negate=True)
    assert b"Content-Type" not in not_got and not_got.startswith(b"From: A")


def test_lf_only_files_are_seen_with_crlf():
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(b"Subject: x\n\nline1\nline2\n")
    try:
        with open(f.name, "rb") as fh, MessageBytes(fh) as mb:
            assert bytes(mb.data) == b"Subject: x\r\n\r\nline1\r\nline2\r\n"
    finally:
        os.unlink(f.name)


def test_imap_string_quoting():
    assert imap_string(None) == b"NIL"
    assert imap_string(b"plain") == b'"plain"'
    assert imap_string(b'q"uote') == b'"q\\"uote"'
    assert imap_string(b"caf\xc3\xa9") == b"{5}\r\ncaf\xc3\xa9"


# -- the CRLF form of files with bare LFs --------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"Subject: a\r\n\r\nline one\nline two\r\n",          # CRLF first, a bare LF later
    b"Subject: a\n\nbody\n",                               # LF only (Dovecot's default)
    b"Subject: a\r\n\r\nbody\r\n",                         # CRLF only: mapped as is
    b"Subject: a\r\n\r\n" + b"x" * (1024 * 1024 - 15) + b"\r\n\n",   # CRLF across 1 MiB
    b"\nSubject: a\r\n\r\nb\rc\r\n",                        # leading LF, a bare CR kept
])
def test_message_bytes_size_agrees_with_pop3_and_status_size(tmp_path, raw):
    """FETCH, POP3 and STATUS SIZE share one cached size per message: all three must
    count the same CRLF form, whatever mix of line ends the file has."""
    from mailserver.imap.mime import MessageBytes, has_bare_lf
    from mailserver.maildir.sizes import crlf_size_of_path
    from mailserver.pop3.wire import crlf_size_of_path as pop3_size

    path = tmp_path / "m"
    path.write_bytes(raw)
    with open(path, "rb") as f, MessageBytes(f) as msg:
        data = bytes(msg.data)
    assert len(data) == crlf_size_of_path(path) == pop3_size(path)
    assert not has_bare_lf(data)
    assert data.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")



class NamedCRLF(unittest.TestCase):
    """A name whose W= equals its S= says the file has CRLF line ends only (what this
    server writes): FETCH maps it without counting its LFs; any other is counted."""

    @defer.inlineCallbacks
    def test_a_file_named_crlf_is_mapped_without_counting_its_line_ends(self):
        from mailserver.imap import fetch, mime
        from mailserver.maildir import MaildirStore

        root = Path(self.mktemp())
        store = MaildirStore(root / "maildirs", hostname="mx.example.test")
        folder = store.account(store.create_user("example.org", "alice")).folder("INBOX")
        crlf = b"Subject: a\r\n\r\nbody\r\n"
        lf = b"Subject: a\n\nbody\n"
        cur = folder.path / "cur"
        (cur / f"1700000000.M1P1.mx,S={len(crlf)},W={len(crlf)}:2,").write_bytes(crlf)
        (cur / f"1700000001.M2P1.mx,S={len(lf)},W={len(crlf)}:2,").write_bytes(lf)
        (cur / "1700000002.M3P1.other:2,").write_bytes(lf)
        counted: list[int] = []
        real = mime.has_bare_lf
        self.patch(mime, "has_bare_lf", lambda buf: counted.append(len(buf)) or real(buf))
        yield folder.refresh()
        self.addCleanup(folder.close)
        session = type("Session", (), {"folder": folder})()
        served = []
        for uid in (1, 2, 3):
            msg = fetch._Message(session, uid)
            served.append(bytes(msg.data))
            msg.close()
        self.assertEqual(served, [crlf, crlf, crlf])        # each served in CRLF form
        self.assertEqual(counted, [len(lf), len(lf)])       # only those that may have LFs
