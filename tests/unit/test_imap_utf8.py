"""UTF8=ACCEPT (RFC 6855): mailbox names both ways, LIST patterns, APPEND's UTF8 data
item (also in CATENATE), and SEARCH CHARSET, through a real session and store."""

from __future__ import annotations

import re

import pytest
from twisted.internet.defer import inlineCallbacks

from mailserver.imap.listing import wire_text
from mailserver.imap.utf8 import decode_utf8_mailbox, mailbox_name, wire_name
from mailserver.maildir import InvalidFolderName
from tests.unit.imap_session_harness import SessionCase

UTF8_MESSAGE = ("From: Jörg <jörg@例え.jp>\r\nTo: b@example.org\r\nSubject: Grüße 日本\r\n"
                "\r\nÄpfel\r\n").encode()


def test_names_from_an_enabled_client() -> None:
    assert decode_utf8_mailbox("Entwürfe".encode()) == "Entwürfe"
    assert decode_utf8_mailbox(b"R&D") == "R&D"              # no modified UTF-7 any more
    assert decode_utf8_mailbox(b"inbox") == "INBOX"
    for bad in (b"\xff", b"a\x00b", b"a\tb", "a\u0085b".encode(), "a\u2028".encode(),
                b"a\x7fb"):
        with pytest.raises(InvalidFolderName):
            decode_utf8_mailbox(bad)
    assert mailbox_name(b"Entw&APw-rfe", False) == "Entwürfe"
    assert mailbox_name(b"Entw&APw-rfe", True) == "Entw&APw-rfe"


def test_names_to_the_client() -> None:
    assert wire_name("Entwürfe", True) == '"Entwürfe"'.encode()
    assert wire_name("Entwürfe", False) == b"Entw&APw-rfe"
    assert wire_name("R&D", True) == b"R&D"
    assert wire_name("R&D", False) == b"R&-D"
    assert wire_name('a "b"', True) == b'"a \\"b\\""'
    assert wire_name("inbox", True) == b"INBOX"


def test_list_patterns() -> None:
    assert wire_text(b"R&-D%") == "R&-D%"
    assert wire_text(b"R&D%", utf8=True) == "R&-D%"
    assert wire_text("Entw*".encode(), utf8=True) == "Entw*"
    assert wire_text("日本*".encode(), utf8=True) == "&ZeVnLA-*"


class UTF8Session(SessionCase):

    @inlineCallbacks
    def enable(self):
        out = yield self.command(b"en", b"ENABLE UTF8=ACCEPT")
        self.assertIn(b"* ENABLED UTF8=ACCEPT\r\n", out)
        out = yield self.command(b"en2", b"ENABLE UTF8=ACCEPT")   # nothing new
        self.assertIn(b"* ENABLED\r\n", out)

    @inlineCallbacks
    def test_names_after_enable(self):
        out = yield self.command(b"c", b"CREATE Entw&APw-rfe")
        self.assertIn(b"c OK", out)
        out = yield self.command(b"l", b'LIST "" "Entw*"')
        self.assertIn(b'* LIST (\\HasNoChildren) "." Entw&APw-rfe\r\n', out)
        yield self.enable()
        out = yield self.command(b"l", b'LIST "" "Entw*"')
        self.assertIn('* LIST (\\HasNoChildren) "." "Entwürfe"\r\n'.encode(), out)
        out = yield self.command(b"s", '''STATUS "Entwürfe" (MESSAGES)'''.encode())
        self.assertIn('* STATUS "Entwürfe" (MESSAGES 0)'.encode(), out)
        out = yield self.command(b"c2", b'CREATE "R&D"')
        self.assertIn(b"c2 OK", out)
        self.assertTrue((self.user_path / ".R&-D").is_dir())
        out = yield self.command(b"c3", 'CREATE "bad\u0085"'.encode())
        self.assertIn(b"c3 NO", out)
        out = yield self.command(b"c4", b'CREATE "\xff\xfe"')
        self.assertIn(b"c4 NO", out)
        out = yield self.command(b"n", b"NOOP")
        self.assertIn(b"n OK", out)

    @inlineCallbacks
    def test_append_utf8_data(self):
        yield self.enable()
        out = yield self.command(b"a", b"APPEND INBOX (\\Seen) UTF8 (~{%d+}\r\n" % len(UTF8_MESSAGE)
                                 + UTF8_MESSAGE + b")")
        self.assertRegex(out, rb"a OK \[APPENDUID \d+ 1\]")
        out = yield self.command(b"a2", b"APPEND INBOX UTF8 ({%d+}\r\n" % len(UTF8_MESSAGE)
                                 + UTF8_MESSAGE + b") UTF8 (~{3+}\r\nx\r\n)")
        self.assertRegex(out, rb"a2 OK \[APPENDUID \d+ 2:3\]")
        out = yield self.command(b"a3", b"APPEND INBOX CATENATE (TEXT {6+}\r\nA: b\r\n"
                                 b" UTF8 (~{%d+}\r\n" % len(UTF8_MESSAGE) + UTF8_MESSAGE + b"))")
        self.assertRegex(out, rb"a3 OK \[APPENDUID \d+ 4\]")
        yield self.select()
        self.pump()
        out = yield self.command(b"f", b"FETCH 1,2,4 BODY.PEEK[]")
        self.assertEqual(out.count(UTF8_MESSAGE), 3, out)
        self.assertIn(b"A: b\r\n" + UTF8_MESSAGE, out)
        # Stored as sent: the file holds the UTF-8 header fields unchanged.
        files = sorted((self.user_path / "cur").iterdir())
        self.assertIn(UTF8_MESSAGE, [f.read_bytes() for f in files])

    @inlineCallbacks
    def test_append_utf8_refused(self):
        out = yield self.command(b"a", b"APPEND INBOX UTF8 (~{3+}\r\nx\r\n)")
        self.assertIn(b"a BAD", out)      # RFC 6855 4: not enabled
        out = yield self.command(b"n", b"NOOP")
        self.assertIn(b"n OK", out)
        yield self.enable()
        for tag, text in ((b"b", b"APPEND INBOX UTF8 (~{3+}\r\nx\r\n"),
                          (b"c", b"APPEND INBOX UTF8 ~{3+}\r\nx\r\n"),
                          (b"d", b"APPEND INBOX UTF8 (x)"),
                          (b"e", b"APPEND INBOX UTF8 (~{3+}\r\nx\r\n))")):
            out = yield self.command(tag, text)
            self.assertIn(tag + b" BAD", out)
        out = yield self.command(b"n2", b"NOOP")
        self.assertIn(b"n2 OK", out)
        self.assertEqual(list((self.user_path / "cur").iterdir()), [])
        self.assertEqual(list((self.user_path / "tmp").iterdir()), [])

    @inlineCallbacks
    def test_search_charset(self):
        yield self.append(UTF8_MESSAGE)
        yield self.select()
        out = yield self.command(b"s", 'SEARCH CHARSET UTF-8 SUBJECT "Grüße"'.encode())
        self.assertIn(b"* SEARCH 1\r\n", out)
        yield self.enable()
        out = yield self.command(b"s2", 'SEARCH CHARSET UTF-8 SUBJECT "Grüße"'.encode())
        self.assertIn(b"s2 BAD", out)
        out = yield self.command(b"s3", 'UID SEARCH RETURN (COUNT) charset utf-8 ALL'.encode())
        self.assertIn(b"s3 BAD", out)
        out = yield self.command(b"s4", 'SEARCH SUBJECT "Grüße"'.encode())
        self.assertIn(b"* SEARCH 1\r\n", out)
        self.assertTrue(re.search(rb"s4 OK", out))
