"""RFC 4469 CATENATE through a real session and store: TEXT literals and URLs (RFC 5092)
naming messages and parts in the same account, copied in order; BADURL for URLs that
cannot be used; URL parsing."""

from __future__ import annotations

import os
import re

from twisted.internet.defer import inlineCallbacks

from mailserver.imap.append import BadURL, MessageRef, parse_imap_url
from tests.unit.imap_session_harness import HOSTNAME, USER, SessionCase

SOURCE = (b"From: a@example.org\r\nSubject: source\r\nMIME-Version: 1.0\r\n"
          b"Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\n"
          b"--B\r\nContent-Type: text/plain\r\n\r\nfirst part\r\n"
          b"--B\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
          b"JVBERi0xLjQK\r\n--B--\r\n")
PART2 = b"JVBERi0xLjQK"
HEADER = b"From: a@example.org\r\nSubject: source\r\nMIME-Version: 1.0\r\n" \
         b"Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\n"


def lit(data: bytes) -> bytes:
    return b"{%d+}\r\n" % len(data) + data


def parse(url: bytes, selected: str | None = "INBOX") -> MessageRef:
    return parse_imap_url(url, user=USER, hostname=HOSTNAME, selected=selected)


class URLs(SessionCase):
    def test_forms(self):
        self.assertEqual(parse(b"/INBOX;UIDVALIDITY=7/;UID=3"), MessageRef("INBOX", 3, 7))
        self.assertEqual(parse(b"/Sent/;UID=3/;SECTION=1.2"), MessageRef("Sent", 3, None, b"1.2"))
        self.assertEqual(parse(b"/inbox/;UID=3/;SECTION=HEADER.FIELDS%20(TO%20FROM)/;PARTIAL=5.10"),
                         MessageRef("INBOX", 3, None, b"HEADER.FIELDS (TO FROM)", (5, 10)))
        self.assertEqual(parse(b"/a%20b/;uid=3/;partial=5"), MessageRef("a b", 3, partial=(5, None)))
        self.assertEqual(parse(b"/Entw%C3%BCrfe/;UID=1"), MessageRef("Entwürfe", 1))
        self.assertEqual(parse(b"/Entw&APw-rfe/;UID=1"), MessageRef("Entwürfe", 1))
        self.assertEqual(parse(b";UID=4/;SECTION=TEXT", selected="Sent"),
                         MessageRef("Sent", 4, None, b"TEXT"))
        self.assertEqual(parse(b"imap://alice%40example.org@mx.example.test/INBOX/;UID=2"),
                         MessageRef("INBOX", 2))
        self.assertEqual(parse(b"IMAP://MX.EXAMPLE.TEST:993/INBOX;UIDVALIDITY=1/;UID=2"),
                         MessageRef("INBOX", 2, 1))

    def test_refused(self):
        for url in (b"", b"INBOX/;UID=1", b"/INBOX", b"/INBOX/;UID=0", b"/;UID=1",
                    b"/INBOX/;UID=1/;SECTION=BOGUS", b"/INBOX/;UID=1/;SECTION=1.",
                    b"/INBOX/;UID=1/;URLAUTH=anonymous:internal:91354a47",
                    b"/INBOX/;UID=1;EXPIRE=2030-01-01T00:00:00Z",
                    b"imap://bob%40example.org@mx.example.test/INBOX/;UID=1",
                    b"imap://elsewhere.test/INBOX/;UID=1", b"imap://mx.example.test",
                    b"http://mx.example.test/INBOX/;UID=1", b"/INBOX/;UID=99999999999"):
            with self.assertRaises(BadURL, msg=url):
                parse(url)
        with self.assertRaises(BadURL):
            parse(b";UID=4", selected=None)


class Catenate(SessionCase):
    max_message_size = 200 * 1024

    @inlineCallbacks
    def setUp(self):
        super().setUp()
        self.uid = yield self.append(SOURCE)
        self.uidvalidity = self.account.folder("INBOX").uidvalidity

    @inlineCallbacks
    def fetch_last(self, mailbox: bytes = b"INBOX") -> bytes:
        out = yield self.command(b"sel", b"EXAMINE " + mailbox)
        exists = int(re.search(rb"\* (\d+) EXISTS", out).group(1))
        out = yield self.command(b"f", b"FETCH %d BODY.PEEK[]" % exists)
        m = re.search(rb"BODY\[\] \{(\d+)\}\r\n", out)
        return out[m.end():m.end() + int(m.group(1))]

    def url(self, tail: bytes = b"") -> bytes:
        return b'"/INBOX;UIDVALIDITY=%d/;UID=%d%s"' % (self.uidvalidity, self.uid, tail)

    @inlineCallbacks
    def test_text_url_text(self):
        head = b"Subject: forward\r\nContent-Type: application/pdf\r\n\r\n"
        out = yield self.command(b"c1", b"APPEND Drafts (\\Draft) CATENATE (TEXT " + lit(head)
                                 + b" URL " + self.url(b"/;SECTION=2") + b" TEXT "
                                 + lit(b"\r\n") + b")")
        self.assertRegex(out, rb"c1 OK \[APPENDUID \d+ 1\]")
        self.assertEqual((yield self.fetch_last(b"Drafts")), head + PART2 + b"\r\n")

    @inlineCallbacks
    def test_url_forms_and_sections(self):
        cases = [
            (b"", SOURCE),
            (b"/;SECTION=HEADER", HEADER),
            (b"/;SECTION=1", b"first part"),
            (b"/;SECTION=1.MIME", b"Content-Type: text/plain\r\n\r\n"),
            (b"/;SECTION=HEADER.FIELDS%20(SUBJECT)", b"Subject: source\r\n\r\n"),
            (b"/;PARTIAL=6.13", SOURCE[6:19]),
            (b"/;SECTION=1/;PARTIAL=6", b"part"),
        ]
        for i, (tail, expected) in enumerate(cases):
            out = yield self.command(b"c%d" % i, b"APPEND INBOX CATENATE (URL " + self.url(tail)
                                     + b" TEXT " + lit(b"|end") + b")")
            self.assertIn(b"c%d OK" % i, out)
            self.assertEqual((yield self.fetch_last()), expected + b"|end", tail)

    @inlineCallbacks
    def test_relative_to_selected_and_url_as_literal(self):
        yield self.select()
        url = b"/;UID=%d/;SECTION=1" % self.uid
        out = yield self.command(b"c1", b"APPEND INBOX CATENATE (URL " + lit(url[1:]) + b")")
        self.assertIn(b"c1 OK", out)
        self.assertEqual((yield self.fetch_last()), b"first part")

    @inlineCallbacks
    def test_url_only_command_without_literals(self):
        out = yield self.command(b"c1", b"APPEND Sent CATENATE (URL " + self.url(b"/;SECTION=1")
                                 + b" URL " + self.url(b"/;SECTION=2") + b")")
        self.assertIn(b"c1 OK", out)
        self.assertEqual((yield self.fetch_last(b"Sent")), b"first part" + PART2)

    @inlineCallbacks
    def test_large_url_part_stays_before_the_text_after_it(self):
        big = b"Subject: big\r\n\r\n" + os.urandom(48 * 1024).hex().encode() + b"\r\n"
        big_uid = yield self.append(big)
        url = b'"/INBOX/;UID=%d"' % big_uid
        # One write with everything: the TEXT octets arrive while the URL is copied.
        out = yield self.command(b"c1", b"APPEND INBOX CATENATE (TEXT " + lit(b"A:") + b" URL "
                                 + url + b" TEXT " + lit(b"Z\r\n") + b" URL " + url + b")")
        self.assertIn(b"c1 OK", out)
        self.assertEqual((yield self.fetch_last()), b"A:" + big + b"Z\r\n" + big)
        self.assertEqual(self.transport.reading_paused, 0)

    @inlineCallbacks
    def test_multiappend_with_catenate(self):
        plain = b"Subject: plain\r\n\r\nx\r\n"
        out = yield self.command(b"c1", b"APPEND INBOX " + lit(plain) + b" (\\Seen) CATENATE (URL "
                                 + self.url(b"/;SECTION=HEADER") + b" TEXT " + lit(b"body\r\n")
                                 + b") " + lit(plain))
        m = re.search(rb"c1 OK \[APPENDUID \d+ ([0-9:,]+)\]", out)
        self.assertEqual(m.group(1), b"2:4")
        yield self.select()
        out = yield self.command(b"f", b"FETCH 3 (FLAGS BODY.PEEK[])")
        self.assertIn(b"\\Seen", out)
        self.assertIn(HEADER + b"body\r\n", out)

    @inlineCallbacks
    def test_bad_urls_are_badurl(self):
        for n, url in enumerate([
                b'"/INBOX;UIDVALIDITY=%d/;UID=%d"' % (self.uidvalidity + 1, self.uid),
                b'"/INBOX/;UID=%d"' % (self.uid + 50),
                b'"/Nowhere/;UID=1"',
                b'"imap://bob%40example.org@mx.example.test/INBOX/;UID=1"',
                b'"/INBOX/;UID=1/;SECTION=MIME"']):
            out = yield self.command(b"b%d" % n, b"APPEND INBOX CATENATE (TEXT " + lit(b"x")
                                     + b" URL " + url + b" TEXT " + lit(b"y") + b")")
            code = re.search(rb"b%d NO \[BADURL ([^\]]*)\]" % n, out)
            self.assertIsNotNone(code, out)
            self.assertEqual(code.group(1), url.strip(b'"'))
        yield self.select()
        out = yield self.command(b"s", b"SEARCH ALL")
        self.assertIn(b"* SEARCH 1\r\n", out)
        self.assertEqual(os.listdir(self.user_path / "tmp"), [])

    @inlineCallbacks
    def test_badurl_refuses_the_next_synchronising_literal(self):
        self.transport.clear()
        self.send(b'b1 APPEND INBOX CATENATE (URL "/INBOX/;UID=77" TEXT {3}\r\n')
        out = yield self.wait_for(rb"b1 NO \[BADURL /INBOX/;UID=77\][^\r\n]*\r\n$")
        self.assertNotIn(b"+ ", out)
        out = yield self.command(b"n", b"NOOP")
        self.assertIn(b"n OK", out)
        self.assertEqual(os.listdir(self.user_path / "tmp"), [])

    @inlineCallbacks
    def test_catenated_message_over_the_limit(self):
        big = b"Subject: big\r\n\r\n" + b"x" * (120 * 1024) + b"\r\n"
        big_uid = yield self.append(big)
        url = b'"/INBOX/;UID=%d"' % big_uid
        out = yield self.command(b"t1", b"APPEND INBOX CATENATE (URL " + url + b" URL " + url + b")")
        self.assertRegex(out, rb"t1 NO \[TOOBIG\]")
        self.assertEqual(os.listdir(self.user_path / "tmp"), [])

    @inlineCallbacks
    def test_syntax(self):
        for n, text in enumerate([b"APPEND INBOX CATENATE ()", b"APPEND INBOX CATENATE (TEXT x)",
                                  b"APPEND INBOX CATENATE (BODY " + self.url() + b")",
                                  b"APPEND INBOX CATENATE (URL " + self.url(),
                                  b"APPEND INBOX CATENATE (URL ~" + lit(b"/INBOX/;UID=1") + b")"]):
            out = yield self.command(b"s%d" % n, text)
            self.assertIn(b"s%d BAD" % n, out)
        self.assertEqual(os.listdir(self.user_path / "tmp"), [])

    @inlineCallbacks
    def test_empty_result_is_refused(self):
        out = yield self.command(b"e1", b"APPEND INBOX CATENATE (TEXT {0+}\r\n)")
        self.assertRegex(out, rb"e1 NO ")
        self.assertEqual(os.listdir(self.user_path / "tmp"), [])
