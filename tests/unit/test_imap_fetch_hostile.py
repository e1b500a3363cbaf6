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


def test_lines_that_only_begin_with_the_delimiter_are_content():
    """Found with bytes.find now; each such line was looked at in Python (2.7 s of the
    reactor for 7 million in one message)."""
    body = (b"--b\r\n\r\n" + b"--bx\r\n" * 10000 + b"--b   \r\nsecond\r\n"
            + b"--b" + b" " * 100000 + b"x\r\n" + b"--b--\r\n")
    root = mime.parse_structure(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + body)
    assert len(root.children) == 2
    first, second = root.children
    assert first.end - first.body_start == len(b"--bx\r\n") * 10000 - 2
    # the second part runs to the close delimiter, over the line of blanks and "x"
    assert second.end - second.start == len(b"second\r\n--b" + b" " * 100000 + b"x")
    # the last line as the delimiter, without its line break
    root = mime.parse_structure(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
                                b"--b\r\n\r\none\r\n--b")
    assert len(root.children) == 1


def test_parts_past_the_limit_stay_within_reach():
    """Past MAX_PARTS the rest was dropped: parts 5,001 to 10,000 answered BODY[n] with
    nothing.  The last part now runs over the rest, as in Dovecot."""
    message = (b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
               + b"".join(b"--b\r\n\r\np%d\r\n" % i for i in range(2 * mime.MAX_PARTS))
               + b"--b--\r\n")
    root = mime.parse_structure(message)
    assert len(root.children) == mime.MAX_PARTS
    last = root.children[-1]
    held = message[last.body_start:last.end]
    assert held.startswith(b"p%d\r\n" % (mime.MAX_PARTS - 1))
    assert b"p%d\r\n" % (2 * mime.MAX_PARTS - 1) in held
    assert mime.body_structure(root, True).count(b"\"TEXT\" \"PLAIN\"") == mime.MAX_PARTS


def test_quoted_printable_blanks_at_line_ends_are_not_data():
    # RFC 2045 6.7 rule 3; "= " then the line break is still a soft line break
    decoder = mime.QuotedPrintableDecoder()
    out = decoder.feed(b"a=3Db  \r\nc= \r\nd\t\nlast") + decoder.flush()
    assert out == b"a=b\r\ncd\nlast"
    # also when a long line is cut inside its blanks, the line break in the next piece
    encoded = b"x" * 65530 + b" " * 10 + b"\r\nnext\r\n"
    for cut in (65534, 65540, 65541):
        decoder = mime.QuotedPrintableDecoder()
        out = decoder.feed(encoded[:cut]) + decoder.feed(encoded[cut:]) + decoder.flush()
        assert out == b"x" * 65530 + b"\r\nnext\r\n", cut


class NoNulInLiterals(SessionCase):
    @inlineCallbacks
    def test_sections_send_0x80_for_nul_as_dovecot_does(self):
        # RFC 3501 4.3: a literal holds no NUL; BINARY's literal8 keeps it
        yield self.append(b"From: a@b.test\r\nSubject: nul\x00here\r\n\r\nbody\x00nul\r\n")
        yield self.select()
        for items in (b"BODY.PEEK[]", b"RFC822", b"RFC822.HEADER", b"BODY.PEEK[TEXT]<2.5>",
                      b"BODY.PEEK[HEADER.FIELDS (SUBJECT)]"):
            out = yield self.command(b"f", b"FETCH 1 (" + items + b")")
            self.assertIn(b"f OK", out)
            self.assertNotIn(b"\x00", out, items)
            self.assertIn(b"\x80", out, items)
        out = yield self.command(b"f", b"FETCH 1 (BINARY.PEEK[])")
        self.assertIn(b"~{", out)
        self.assertIn(b"body\x00nul", out)

    @inlineCallbacks
    def test_header_fields_kept_in_the_index_with_nul_go_out_without(self):
        # an index row written before: it holds the NUL
        yield self.append(b"From: a@b.test\r\nX-Foo: nul\x00here\r\n\r\nbody\r\n")
        yield self.select()
        self.session.folder.cache_put(1, "hf:X-FOO", b"X-Foo: nul\x00here\r\n\r\n")
        out = yield self.command(b"f", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (X-FOO)])")
        self.assertIn(b"X-Foo: nul\x80here", out)


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

