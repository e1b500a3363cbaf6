"""RFC 4978 COMPRESS=DEFLATE through a real session: raw deflate both ways after the
tagged OK, one sync flush per write batch, COMPRESSIONACTIVE, and deflate bombs and
corrupt input ending the session with BYE."""

from __future__ import annotations

import re
import zlib

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock

from mailserver.imap.compress import INFLATE_PIECE, DeflateTransport, Inflater
from mailserver.imap.server import MAX_LINE
from tests.unit.imap_session_harness import SessionCase

SYNC_MARK = b"\x00\x00\xff\xff"   # the end of a Z_SYNC_FLUSH block


class Client:
    """The client side of a compressed session."""

    def __init__(self) -> None:
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        self.inflate = zlib.decompressobj(-15)

    def pack(self, data: bytes) -> bytes:
        return self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)

    def unpack(self, data: bytes) -> bytes:
        return self.inflate.decompress(data)


class Compress(SessionCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.session._compress_clock = self.clock
        self.client = Client()

    @inlineCallbacks
    def start(self) -> bytes:
        out = yield self.command(b"z", b"COMPRESS DEFLATE")
        self.assertTrue(out.endswith(b"z OK DEFLATE active\r\n"), out)   # not compressed
        self.transport.clear()
        return out

    @inlineCallbacks
    def compressed_command(self, tag: bytes, text: bytes) -> bytes:
        """Send a command compressed; the decompressed answer up to its tagged line."""
        self.session.dataReceived(self.client.pack(tag + b" " + text + b"\r\n"))
        plain = b""
        for _ in range(2000):
            self.pump()
            self.clock.advance(0)
            plain += self.client.unpack(self.transport.value())
            self.transport.clear()
            if re.search(rb"(^|\r\n)" + re.escape(tag) + rb" (OK|NO|BAD)[^\r\n]*\r\n$", plain):
                return plain
            yield self.wait_a_little()
        self.fail(f"no answer to {tag!r}: {plain[-500:]!r}")

    def wait_a_little(self):
        from twisted.internet import reactor, task

        return task.deferLater(reactor, 0.005, lambda: None)

    @inlineCallbacks
    def test_both_directions_compressed(self):
        yield self.append(b"Subject: hello\r\n\r\n" + b"body line\r\n" * 200)
        yield self.start()
        out = yield self.compressed_command(b"a", b"SELECT INBOX")
        self.assertIn(b"* 1 EXISTS", out)
        self.assertIn(b"a OK [READ-WRITE]", out)
        out = yield self.compressed_command(b"b", b"FETCH 1 BODY.PEEK[TEXT]")
        self.assertIn(b"body line\r\n" * 200, out)
        self.assertIn(b"b OK", out)
        out = yield self.compressed_command(b"c", b"CAPABILITY")
        self.assertIn(b"COMPRESS=DEFLATE", out)

    @inlineCallbacks
    def test_one_flush_per_write_batch(self):
        yield self.start()
        # SELECT answers with several writes in one reactor turn: one sync flush for all.
        self.session.dataReceived(self.client.pack(b"a SELECT INBOX\r\n"))
        while self.session.state != "select" or self.session._busy:
            yield self.wait_a_little()
        before = self.transport.value()
        self.assertFalse(before.endswith(SYNC_MARK))   # held until the turn ends
        self.clock.advance(0)
        data = self.transport.value()
        self.assertEqual(data.count(SYNC_MARK), 1)
        self.assertTrue(data.endswith(SYNC_MARK))
        self.assertIn(b"a OK [READ-WRITE]", self.client.unpack(data))

    @inlineCallbacks
    def test_second_compress_is_compressionactive(self):
        yield self.start()
        out = yield self.compressed_command(b"b", b"COMPRESS DEFLATE")
        self.assertRegex(out, rb"b NO \[COMPRESSIONACTIVE\]")
        out = yield self.compressed_command(b"c", b"NOOP")
        self.assertIn(b"c OK", out)

    @inlineCallbacks
    def test_unknown_mechanism_and_state(self):
        out = yield self.command(b"a", b"COMPRESS LZMA")
        self.assertIn(b"a BAD", out)
        out = yield self.command(b"b", b"COMPRESS")
        self.assertIn(b"b BAD", out)
        session, transport = self.new_session()
        session.user, session.state = None, "unauth"
        out = yield self.command(b"c", b"COMPRESS DEFLATE", session, transport)
        self.assertIn(b"c BAD", out)                    # not before authentication
        self.assertNotIn(b"COMPRESS=DEFLATE", b" ".join(session.capability_list()))
        out = yield self.command(b"d", b"NOOP")         # the first session: still plain
        self.assertIn(b"d OK", out)

    @inlineCallbacks
    def test_deflate_bomb_line_ends_the_session(self):
        yield self.start()
        bomb = self.client.pack(b"a NOOP " + b"A" * (200 * 1024 * 1024))
        self.assertLess(len(bomb), 300 * 1024)
        peak = 0
        session = self.session
        original = session._drain_input

        def measuring() -> None:
            nonlocal peak
            peak = max(peak, len(session._buffer))
            original()

        session._drain_input = measuring  # type: ignore[method-assign]
        session.dataReceived(bomb)
        self.clock.advance(0)
        out = self.client.unpack(self.transport.value())
        self.assertRegex(out, rb"\* BYE [^\r\n]*\r\n$")
        self.assertTrue(self.transport.disconnecting)
        self.assertLessEqual(peak, MAX_LINE + 2 * INFLATE_PIECE)

    @inlineCallbacks
    def test_bomb_in_a_literal_goes_where_the_literal_goes(self):
        # A literal within the limits inflates into its sink piece by piece.
        yield self.start()
        body = b"Subject: zeros\r\n\r\n" + b"0" * (2 * 1024 * 1024) + b"\r\n"
        out = yield self.compressed_command(
            b"a", b"APPEND INBOX {%d+}\r\n" % len(body) + body)
        self.assertRegex(out, rb"a OK \[APPENDUID \d+ 1\]")
        out = yield self.compressed_command(b"b", b"STATUS INBOX (MESSAGES)")
        self.assertIn(b"(MESSAGES 1)", out)

    @inlineCallbacks
    def test_corrupt_input_ends_the_session(self):
        yield self.start()
        self.session.dataReceived(b"\xff\xff\xff\xff not deflate at all")
        self.clock.advance(0)
        out = self.client.unpack(self.transport.value())
        self.assertRegex(out, rb"\* BYE ")
        self.assertTrue(self.transport.disconnecting)

    @inlineCallbacks
    def test_catenate_url_copy_under_compression(self):
        uid = yield self.append(b"Subject: src\r\n\r\n" + b"x" * 100000 + b"\r\n")
        yield self.start()
        out = yield self.compressed_command(
            b"a", b'APPEND INBOX CATENATE (URL "/INBOX/;UID=%d" TEXT {3+}\r\nend)' % uid)
        self.assertIn(b"a OK", out)
        out = yield self.compressed_command(b"b", b"SELECT INBOX")
        out = yield self.compressed_command(b"c", b"FETCH 2 BINARY.SIZE[]")
        self.assertIn(b"BINARY.SIZE[] %d" % (100000 + 21), out)


class Pieces(SessionCase):
    def test_inflater_hands_out_bounded_pieces(self):
        inflater = Inflater(piece=1000)
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        inflater.feed(deflate.compress(b"z" * 10000) + deflate.flush(zlib.Z_SYNC_FLUSH))
        pieces = []
        while piece := inflater.read():
            pieces.append(piece)
        self.assertEqual(b"".join(pieces), b"z" * 10000)
        self.assertEqual(max(map(len, pieces)), 1000)

    def test_deflate_transport_keeps_the_transport_interfaces(self):
        from twisted.internet.interfaces import ISSLTransport
        from twisted.internet.testing import StringTransport
        from zope.interface import directlyProvides

        inner = StringTransport()
        directlyProvides(inner, ISSLTransport)
        clock = Clock()
        outer = DeflateTransport(inner, clock)
        self.assertTrue(ISSLTransport.providedBy(outer))
        outer.write(b"* OK one\r\n")
        outer.writeSequence([b"* OK two\r\n", b"t OK three\r\n"])
        outer.loseConnection()   # flushes first
        self.assertTrue(inner.disconnecting)
        self.assertEqual(zlib.decompressobj(-15).decompress(inner.value()),
                         b"* OK one\r\n* OK two\r\nt OK three\r\n")
        self.assertEqual(clock.getDelayedCalls(), [])


class CompressedInputTakesTurns(Compress):
    @inlineCallbacks
    def test_many_compressed_commands_run_over_several_turns(self):
        """A few KB of deflated input holding thousands of commands is run a slice per
        reactor turn, reading paused meanwhile, so other sessions get their turns."""
        yield self.start()
        count = 60000                           # 540 KB inflated, about 1 KB deflated
        self.session.dataReceived(self.client.pack(b"a NOOP\r\n" * count))
        self.assertGreater(self.transport.reading_paused, 0)   # the rest waits a turn
        self.assertTrue(self.clock.getDelayedCalls())
        plain = b""
        turns = 0
        while plain.count(b"a OK") < count and turns < 100:
            self.clock.advance(0)
            turns += 1
            plain += self.client.unpack(self.transport.value())
            self.transport.clear()
            self.pump()   # the client took the answers: the session may go on
            yield self.wait_a_little()   # ... its held input released from the reactor
        self.assertEqual(plain.count(b"a OK"), count)
        self.assertEqual(self.transport.reading_paused, 0)
