"""FETCH of hostile messages: what BODYSTRUCTURE, ENVELOPE and HEADER.FIELDS make of them
stays bounded, valid IMAP, and the octets the message holds."""

from __future__ import annotations

import re

from twisted.internet.defer import inlineCallbacks

from mailserver.imap import mime
from tests.unit.imap_session_harness import SessionCase


def test_white_space_in_content_type_is_linear():
    """A folded run of white space (every line short) once took seconds per 70 KB, the
    regular expression rescanning the run from each of its positions, in the reactor."""
    value = b"text/plain;" + b"\r\n " + b" " * 70 * 3000 + b"; charset=utf-8"
    assert mime.parse_content_type(value, ("text", "plain")) == \
        ("text", "plain", [("charset", "utf-8")])
    disposition = b"attachment;" + b" " * 200000 + b'filename="a.pdf"'
    head = b"Content-Disposition: " + disposition + b"\r\n\r\nx\r\n"
    assert b'("ATTACHMENT" ("filename" "a.pdf"))' in mime.body_structure(
        mime.parse_structure(head), True)


def test_bodystructure_addresses_are_bounded_all_told():
    addresses = b"a," * 5000
    inner = (b"From: " + addresses + b"\r\nTo: " + addresses + b"\r\nCc: " + addresses
             + b"\r\nSubject: x\r\n\r\nbody\r\n")
    parts = b"".join(b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + inner
                     for _ in range(100))
    message = (b"From: x@y.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
               + parts + b"--b--\r\n")
    out = mime.body_structure(mime.parse_structure(message), True)
    # (From's list is also Sender's and Reply-To's when they are absent)
    assert out.count(b'"MISSING_DOMAIN"') <= 3 * mime.MAX_STRUCTURE_ADDRESSES
    assert len(out) < len(message) / 2
    assert out.count(b'"MESSAGE" "RFC822"') == 100


def test_eight_bit_parameters_go_out_as_they_came_in():
    message = (b'From: x@y.test\r\nContent-Type: application/pdf; name="r\xc3\xa9sum\xc3\xa9.pdf"'
               b"\r\nContent-Language: d\xc3\xa9\r\n"
               b'Content-Disposition: attachment; filename="\xc3\xa9.pdf"\r\n\r\nbody\r\n')
    out = mime.body_structure(mime.parse_structure(message), True)
    assert b'("name" {12}\r\nr\xc3\xa9sum\xc3\xa9.pdf)' in out
    assert b'("ATTACHMENT" ("filename" {6}\r\n\xc3\xa9.pdf))' in out
    assert b"{3}\r\nd\xc3\xa9 NIL)" in out


def test_no_nul_in_a_literal():
    assert mime.imap_string(b"a\x00b") == b"{3}\r\na\x80b"
    envelope = mime.envelope_of({b"subject": b"a\x00b", b"from": b"x@y.test"}.get)
    assert b"\x00" not in envelope and b"{3}\r\na\x80b" in envelope


class HeaderFieldNames(SessionCase):
    @inlineCallbacks
    def test_names_are_echoed_as_the_astrings_they_were(self):
        yield self.append(b'From: a@example.org\r\nX-A: 1\r\nSubject: s\r\n\r\nbody\r\n')
        yield self.select()
        out = yield self.command(b"f", b'FETCH 1 (BODY.PEEK[HEADER.FIELDS ("a\\"b" "X A" X-A)])')
        self.assertIn(b'BODY[HEADER.FIELDS ("A\\"B" "X A" X-A)] {10}\r\nX-A: 1\r\n\r\n', out)
        out = yield self.command(b"f", b'FETCH 1 (BODY.PEEK[HEADER.FIELDS ("")])')
        self.assertIn(b'BODY[HEADER.FIELDS ("")] {2}\r\n\r\n', out)
        self.assertTrue(re.search(rb"f OK", out))
