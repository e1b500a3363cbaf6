"""RFC 3516 BINARY: transfer decoding in pieces (mime), FETCH BINARY / BINARY.PEEK /
BINARY.SIZE through a real session and store, literal8 both ways, UNKNOWN-CTE."""

from __future__ import annotations

import base64
import binascii
import os
import random
import re

from twisted.internet.defer import inlineCallbacks

from mailserver.imap import mime
from tests.unit.imap_session_harness import SessionCase

PAYLOAD = bytes(range(256)) * 40 + b"\x00tail"          # NULs inside: literal8 territory
TEXT = "Grüße, café — 100 % fine.\r\nSecond line ends with spaces  \r\n".encode("utf-8")


def b64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def multipart(cte_3: bytes = b"x-uuencode") -> bytes:
    """1 base64 binary, 2 quoted-printable text, 3 unknown encoding, 4 7bit text."""
    qp = binascii.b2a_qp(TEXT.replace(b"\r\n", b"\n"), istext=True).replace(b"\n", b"\r\n")
    return (b"From: a@example.org\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\n"
            b"--B\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: BASE64\r\n\r\n" + b64_lines(PAYLOAD) +
            b"\r\n--B\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp +
            b"\r\n--B\r\nContent-Type: application/x-thing\r\n"
            b"Content-Transfer-Encoding: " + cte_3 + b"\r\n\r\nbegin 644 x\r\n`\r\nend\r\n"
            b"\r\n--B\r\nContent-Type: text/plain\r\n\r\nplain seven bit\r\n"
            b"--B--\r\n")


def literal_of(out: bytes, name: bytes) -> tuple[bytes, bytes]:
    """(marker, data) of the literal after `name` in a FETCH response: marker is b"~"
    for a literal8, b"" for a literal."""
    m = re.search(re.escape(name) + rb" (~?)\{(\d+)\}\r\n", out)
    assert m is not None, (name, out[:500])
    start = m.end()
    return m.group(1), out[start:start + int(m.group(2))]


# -- decoding in pieces -----------------------------------------------------------------------

class Decoding(SessionCase):
    def test_base64_any_split_gives_the_whole(self):
        rng = random.Random(7)
        for size in (0, 1, 2, 3, 4, 5, 57, 1000, 70001):
            raw = os.urandom(size)
            enc = b64_lines(raw)
            for _ in range(5):
                decoder = mime.Base64Decoder()
                out, pos = b"", 0
                while pos < len(enc):
                    step = rng.randint(1, 97)
                    out += decoder.feed(enc[pos:pos + step])
                    pos += step
                out += decoder.flush()
                self.assertEqual(out, raw)

    def test_base64_garbage_and_padding(self):
        # Characters outside the alphabet are skipped; "=" ends the data (RFC 2045 6.8).
        data = b"QU*JD\r\n RE\tV=GARBAGE"
        self.assertEqual(b"".join(mime.decoded_chunks(data, 0, len(data), b"base64")),
                         b"ABCDE")
        self.assertEqual(mime.decoded_facts(data, 0, len(data), b"base64"), (5, False))

    def test_quoted_printable_any_split_gives_the_whole(self):
        rng = random.Random(3)
        for trial in range(40):
            raw = bytes(rng.choice(b"ab= \t\r\n\x00\xfe") for _ in range(rng.randint(0, 9000)))
            enc = binascii.b2a_qp(raw)
            if trial % 2:
                enc = enc.replace(b"=\n", b"")   # lines longer than the decoder holds back
            # (binascii keeps blanks at line ends, which RFC 2045 6.7 rule 3 deletes)
            one = mime.QuotedPrintableDecoder()
            whole = one.feed(enc) + one.flush()
            decoder = mime.QuotedPrintableDecoder()
            out, pos = b"", 0
            while pos < len(enc):
                step = rng.randint(1, 6000)
                out += decoder.feed(enc[pos:pos + step])
                pos += step
            self.assertEqual(out + decoder.flush(), whole)

    def test_encodings(self):
        self.assertIsNone(mime.decoder_for(b"x-uuencode"))
        for name in (b"7bit", b"8bit", b"binary", b"base64", b"quoted-printable"):
            self.assertIsNotNone(mime.decoder_for(name))
        root = mime.parse_structure(multipart())
        self.assertEqual(mime.transfer_encoding(mime.find_part(root, [1])), b"base64")
        self.assertEqual(mime.transfer_encoding(mime.find_part(root, [4])), b"7bit")

    def test_large_part_is_decoded_in_bounded_pieces(self):
        raw = os.urandom(3 * 1024 * 1024)
        enc = b64_lines(raw)
        pieces = list(mime.decoded_chunks(enc, 0, len(enc), b"base64"))
        self.assertGreater(len(pieces), 40)
        self.assertLessEqual(max(map(len, pieces)), mime.DECODE_CHUNK)
        self.assertEqual(b"".join(pieces), raw)


# -- FETCH BINARY through a session --------------------------------------------------------------

class FetchBinary(SessionCase):
    @inlineCallbacks
    def setUp(self):
        super().setUp()
        self.uid = yield self.append(multipart())
        yield self.select()

    @inlineCallbacks
    def test_base64_part_decoded_as_literal8(self):
        out = yield self.command(b"f1", b"UID FETCH %d (BINARY.PEEK[1] BINARY.SIZE[1])" % self.uid)
        marker, data = literal_of(out, b"BINARY[1]")
        self.assertEqual(marker, b"~")       # NULs: literal8 (RFC 3516 4.3)
        self.assertEqual(data, PAYLOAD)
        self.assertIn(b"BINARY.SIZE[1] %d" % len(PAYLOAD), out)
        self.assertIn(b"f1 OK", out)

    @inlineCallbacks
    def test_quoted_printable_and_identity_parts(self):
        out = yield self.command(b"f2", b"FETCH 1 (BINARY.PEEK[2] BINARY.PEEK[4] BINARY.SIZE[2])")
        marker, data = literal_of(out, b"BINARY[2]")
        self.assertEqual((marker, data), (b"", TEXT))   # no NUL: a plain literal
        self.assertEqual(literal_of(out, b"BINARY[4]"), (b"", b"plain seven bit"))
        self.assertIn(b"BINARY.SIZE[2] %d" % len(TEXT), out)

    @inlineCallbacks
    def test_partial_counts_decoded_octets(self):
        out = yield self.command(b"f3", b"FETCH 1 (BINARY.PEEK[1]<250.20> BINARY.PEEK[2]<5.300>)")
        self.assertEqual(literal_of(out, b"BINARY[1]<250>")[1], PAYLOAD[250:270])
        self.assertEqual(literal_of(out, b"BINARY[2]<5>")[1], TEXT[5:])
        out = yield self.command(b"f4", b"FETCH 1 BINARY.PEEK[1]<999999.10>")
        self.assertEqual(literal_of(out, b"BINARY[1]<999999>")[1], b"")

    @inlineCallbacks
    def test_unknown_encoding_is_no_unknown_cte(self):
        out = yield self.command(b"f5", b"FETCH 1 BINARY.PEEK[3]")
        self.assertRegex(out, rb"f5 NO \[UNKNOWN-CTE\]")
        self.assertNotIn(b"* 1 FETCH", out)
        out = yield self.command(b"f6", b"FETCH 1 BINARY.SIZE[3]")
        self.assertRegex(out, rb"f6 NO \[UNKNOWN-CTE\]")
        out = yield self.command(b"f7", b"FETCH 1 BODY.PEEK[3]")   # BODY still works
        self.assertIn(b"begin 644 x", out)

    @inlineCallbacks
    def test_earlier_messages_are_answered_whole_before_unknown_cte(self):
        yield self.append(multipart(cte_3=b"base64"))
        out = yield self.command(b"f8", b"FETCH 2:1 (UID BINARY.PEEK[3])")
        self.assertRegex(out, rb"f8 NO \[UNKNOWN-CTE\]")
        # Message 1 fails; whatever was sent before the NO is complete responses only.
        before = out[:out.index(b"f8 NO")]
        self.assertTrue(before == b"" or before.endswith(b")\r\n"), before)

    @inlineCallbacks
    def test_binary_sets_seen_peek_does_not(self):
        out = yield self.command(b"f9", b"FETCH 1 (BINARY.PEEK[4] FLAGS)")
        self.assertNotIn(b"\\Seen", out)
        out = yield self.command(b"f10", b"FETCH 1 BINARY[4]")
        self.assertIn(b"\\Seen", out)   # the flag change comes with the response
        out = yield self.command(b"f11", b"FETCH 1 FLAGS")
        self.assertIn(b"\\Seen", out)

    @inlineCallbacks
    def test_binary_size_alone_does_not_set_seen(self):
        out = yield self.command(b"f12", b"FETCH 1 (BINARY.SIZE[1] FLAGS)")
        self.assertNotIn(b"\\Seen", out)

    @inlineCallbacks
    def test_whole_message_and_missing_part(self):
        out = yield self.command(b"f13", b"FETCH 1 (BINARY.PEEK[] BINARY.SIZE[] BINARY.PEEK[9])")
        self.assertEqual(literal_of(out, b"BINARY[]")[1], multipart())
        self.assertIn(b"BINARY.SIZE[] %d" % len(multipart()), out)
        self.assertEqual(literal_of(out, b"BINARY[9]")[1], b"")

    @inlineCallbacks
    def test_size_is_remembered_in_the_index(self):
        yield self.command(b"f14", b"FETCH 1 BINARY.SIZE[1]")
        folder = self.account.folder("INBOX")
        self.assertEqual(folder.cache_get(self.uid, "bin:1"), b"%d 1" % len(PAYLOAD))
        out = yield self.command(b"f15", b"FETCH 1 BINARY.SIZE[1]")
        self.assertIn(b"BINARY.SIZE[1] %d" % len(PAYLOAD), out)

    @inlineCallbacks
    def test_binary_rejects_section_text(self):
        out = yield self.command(b"f16", b"FETCH 1 BINARY[1.MIME]")
        self.assertIn(b"f16 BAD", out)
        out = yield self.command(b"f17", b"FETCH 1 BINARY.SIZE[1]<0.5>")
        self.assertIn(b"f17 BAD", out)


class FetchBinaryLarge(SessionCase):
    @inlineCallbacks
    def test_large_base64_attachment_streams(self):
        raw = os.urandom(2 * 1024 * 1024) + b"\x00"
        message = (b"Subject: big\r\nContent-Type: application/octet-stream\r\n"
                   b"Content-Transfer-Encoding: base64\r\n\r\n" + b64_lines(raw))
        yield self.append(message)
        yield self.select()
        self.transport.clear()
        self.send(b"b1 FETCH 1 BINARY.PEEK[1]\r\n")
        writes: list[int] = []
        original = self.transport.write

        def counting(data: bytes) -> None:
            writes.append(len(data))
            original(data)

        self.transport.write = counting  # type: ignore[method-assign]
        out = yield self.wait_for(rb"b1 OK")
        self.assertEqual(literal_of(out, b"BINARY[1]"), (b"~", raw))
        self.assertLessEqual(max(writes), mime.DECODE_CHUNK + 1024,
                             "the decoded part was written in one piece")


class AppendLiteral8(SessionCase):
    @inlineCallbacks
    def test_append_literal8_keeps_nul_octets(self):
        message = b"Subject: bin\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\x01\xff\r\n"
        out = yield self.command(b"a1", b"APPEND INBOX ~{%d+}\r\n" % len(message) + message)
        self.assertRegex(out, rb"a1 OK \[APPENDUID \d+ 1\]")
        yield self.select()
        out = yield self.command(b"f1", b"FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[1])")
        self.assertEqual(literal_of(out, b"BINARY[1]"), (b"~", b"\x00\x01\xff\r\n"))
        self.assertIn(b"BINARY.SIZE[1] 5", out)

    @inlineCallbacks
    def test_synchronising_literal8_gets_a_continuation(self):
        message = b"Subject: s\r\n\r\nbody\x00\r\n"
        self.transport.clear()
        self.send(b"a2 APPEND INBOX (\\Seen) ~{%d}\r\n" % len(message))
        out = yield self.wait_for(rb"\+ [^\r\n]*\r\n")
        self.assertTrue(out.startswith(b"+ "), out)
        self.send(message + b"\r\n")
        out = yield self.wait_for(rb"a2 OK")
        self.assertIn(b"APPENDUID", out)

    @inlineCallbacks
    def test_literal8_only_for_message_data(self):
        out = yield self.command(b"a3", b"APPEND ~{5+}\r\nINBOX {3+}\r\nabc")
        self.assertIn(b"a3 BAD", out)
