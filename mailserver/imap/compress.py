"""COMPRESS=DEFLATE (RFC 4978) for the IMAP session.

After the tagged OK of `COMPRESS DEFLATE` both directions are raw deflate (RFC 1951, no
zlib header: wbits -15) inside TLS.  Output goes through `DeflateTransport`, an ITransport
wrapper put in place of the session's transport, so the session writes as before; the
compressor is flushed (Z_SYNC_FLUSH) once per reactor turn, after the turn's writes, so a
response is never held back and many small lines still share one flush.  Input is
inflated by `Inflater` at most INFLATE_PIECE octets at a time (zlib's max_length), each
piece handed to the session's line and literal assembly before the next is made: a small
compressed stream that inflates to gigabytes (a deflate bomb) costs no more memory than
plain input, and a line that grows past the line limit ends the session with BYE.
"""

from __future__ import annotations

import zlib
from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from zope.interface import directlyProvides, implementer, providedBy

from mailserver.imap.parser import Arguments, BadCommand

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

COMPRESS_CAPABILITY = b"COMPRESS=DEFLATE"   # RFC 4978 1
INFLATE_PIECE = 16 * 1024                  # inflated octets handed on at a time
PUMP_TURN = 256 * 1024                     # inflated octets run per reactor turn
WBITS = -15                                # raw deflate (RFC 4978 4)


@implementer(ITransport, IConsumer, IPushProducer)
class DeflateTransport:
    """The session's transport once DEFLATE is active: what is written is compressed
    into the original transport, flushed at the end of the reactor turn."""

    def __init__(self, transport: Any, clock: "IReactorTime | None" = None,
                 level: int = 6) -> None:
        self.transport = transport
        self._clock = clock if clock is not None else reactor
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, WBITS)
        self._flush_call: Any = None
        self.closed = False
        # Whatever the original is (ISSLTransport, ITCPTransport) the wrapper says too.
        directlyProvides(self, *providedBy(transport))

    def write(self, data: bytes) -> None:
        if not data or self.closed:
            return
        out = self._deflate.compress(data)
        if out:
            self.transport.write(out)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self.flush)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def flush(self) -> None:
        """End the current write batch: everything written so far goes out
        decompressible (Z_SYNC_FLUSH, RFC 4978 4)."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        if self.closed:
            return
        out = self._deflate.flush(zlib.Z_SYNC_FLUSH)
        if out:
            self.transport.write(out)

    def loseConnection(self) -> None:
        self.flush()
        self.closed = True
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.closed = True
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        self.transport.abortConnection()

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        pause = getattr(self.transport, "pauseProducing", None)
        if pause is not None:
            pause()

    def resumeProducing(self) -> None:
        resume = getattr(self.transport, "resumeProducing", None)
        if resume is not None:
            resume()

    def stopProducing(self) -> None:
        stop = getattr(self.transport, "stopProducing", None)
        if stop is not None:
            stop()

    def __getattr__(self, name: str) -> Any:
        # Anything else a transport offers (getPeerCertificate, setTcpNoDelay, ...).
        if name.startswith("__") or name == "transport":
            raise AttributeError(name)
        return getattr(self.transport, name)


class Inflater:
    """Raw inflate of the client's stream, handed out a bounded piece at a time."""

    def __init__(self, piece: int = INFLATE_PIECE) -> None:
        self._inflate = zlib.decompressobj(WBITS)
        self._input: deque[bytes] = deque()
        self._piece = piece
        self._full = False

    def feed(self, data: bytes) -> None:
        if data:
            self._input.append(data)

    def read(self) -> bytes:
        """At most `piece` inflated octets; b"" when the input so far is used up.
        zlib.error for a stream that is not deflate (or goes on after its end)."""
        z = self._inflate
        while True:
            if z.eof:
                if z.unused_data or self._input:
                    raise zlib.error("data after the end of the deflate stream")
                return b""
            if z.unconsumed_tail:
                out = z.decompress(z.unconsumed_tail, self._piece)
            elif self._input:
                out = z.decompress(self._input.popleft(), self._piece)
            elif self._full:   # a full piece: zlib may hold more output without input
                out = z.decompress(b"", self._piece)
            else:
                return b""
            self._full = len(out) == self._piece
            if out:
                return out
            if not (z.unconsumed_tail or self._input):
                return b""


class CompressCommands:
    """COMPRESS for an IMAPSession (authenticated and selected states), and the path
    compressed input takes into the session's input assembly."""

    _inflater: Inflater | None = None
    _compress_clock: "IReactorTime | None" = None   # tests give a Clock

    if TYPE_CHECKING:  # what the session provides
        _buffer: bytes
        _closing: bool
        _input_held: bool
        _literal_left: int
        _queue: list[Any]
        transport: Any

        def tagged(self, tag: bytes, status: bytes, text: bytes) -> None: ...

        def untagged(self, line: bytes) -> None: ...

        def _hold_input(self, until: defer.Deferred) -> None: ...

        def _drop_queue(self) -> None: ...

        def _close(self) -> None: ...

        def _drain_input(self) -> None: ...

    def cmd_auth_COMPRESS(self, tag: bytes, args: Arguments) -> None:  # RFC 4978 3
        from mailserver.imap.server import CommandFailed

        args.space()
        mechanism = args.atom().upper()
        args.end()
        if self._inflater is not None:
            raise CommandFailed(b"[COMPRESSIONACTIVE] DEFLATE is active already")
        if mechanism != b"DEFLATE":
            raise BadCommand("unknown compression mechanism")
        self.tagged(tag, b"OK", b"DEFLATE active")
        # Compressed from the octet after the OK's CRLF; the client compresses from the
        # first command after COMPRESS, which it sends only after this OK.  Commands it
        # pipelined behind COMPRESS anyway went out uncompressed: they are not run.
        clock = self._compress_clock if self._compress_clock is not None else reactor
        self.transport = DeflateTransport(self.transport, clock)
        self._inflater = Inflater()
        self._drop_queue()
        leftover, self._buffer = self._buffer, b""
        if leftover:
            self._inflater.feed(leftover)
            clock.callLater(0, self._pump_compressed)

    def _compressed_input(self, data: bytes) -> None:
        assert self._inflater is not None
        self._inflater.feed(data)
        self._pump_compressed()

    def _resume_input(self) -> None:
        """Carry on reading input after a hold: what is buffered, then what still waits
        to be inflated."""
        if self._inflater is not None:
            self._pump_compressed()
        else:
            self._drain_input()

    def _pump_compressed(self) -> None:
        """Inflate and run what the client sent, PUMP_TURN octets per reactor turn: a
        few KB of deflated input may hold millions of commands, and other sessions must
        get their turn meanwhile (RFC 4978 6).  Reading waits until the rest is done."""
        self._drain_input()
        budget = PUMP_TURN
        while self._inflater is not None and not self._closing and not self._input_held:
            if budget <= 0:
                turn: defer.Deferred[None] = defer.Deferred()
                self._hold_input(turn)
                clock = self._compress_clock if self._compress_clock is not None else reactor
                clock.callLater(0, turn.callback, None)
                return
            try:
                piece = self._inflater.read()
            except zlib.error:
                self.untagged(b"BYE Corrupt compressed input")
                self._close()
                return
            if not piece:
                return
            budget -= len(piece)
            self._buffer = self._buffer + piece if self._buffer else piece
            if self._line_overflows():
                self.untagged(b"BYE Decompressed input exceeds the line limit")
                self._close()
                return
            self._drain_input()

    def _line_overflows(self) -> bool:
        """Whether the buffered input holds a line longer than the session takes (after
        the rest of a literal being read, which goes where the literal goes)."""
        from mailserver.imap.server import MAX_LINE

        start = self._literal_left
        limit = MAX_LINE + 2   # the line, CR and LF
        if len(self._buffer) - start < limit:
            return False
        return self._buffer.find(b"\n", start, start + limit) < 0
