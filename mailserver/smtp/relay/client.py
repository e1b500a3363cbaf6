"""A small SMTP client protocol: commands out (pipelined when wanted), replies in order.

twisted.mail's ESMTPClient drives a whole transaction by callbacks and hides the
per-recipient replies and the extension list that a relay needs to make its own
decisions (opportunistic STARTTLS, PIPELINING, SIZE, per-recipient status), so the relay
uses this instead.  Every input is bounded: reply line length, lines per reply, and a
timeout for every reply awaited (RFC 5321 4.5.3.2).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import basic, policies
from twisted.python.failure import Failure

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\b")


class SMTPClientError(Exception):
    """The connection cannot go on: protocol violation, timeout or connection lost."""


@dataclass(frozen=True)
class ServerReply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply's text, lines joined (for logs and DSN diagnostics)."""
        return " / ".join(line for line in self.lines if line) if len(self.lines) > 1 \
            else (self.lines[0] if self.lines else "")

    @property
    def enhanced(self) -> str:
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        return m.group(0) if m else ""

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


def parse_extensions(reply: ServerReply) -> dict[str, str]:
    """EHLO keywords (upper case) -> parameters (RFC 5321 4.1.1.1)."""
    ext: dict[str, str] = {}
    for line in reply.lines[1:64]:
        keyword, _, params = line.strip().partition(" ")
        if keyword and keyword.replace("-", "").isalnum():
            ext[keyword.upper()] = params.strip()
    return ext


class DotStuffer:
    """Dot-stuffing (RFC 5321 4.5.2) over a stream of chunks of a CRLF message."""

    def __init__(self) -> None:
        self.at_line_start = True
        self._held = b""

    def __call__(self, chunk: bytes) -> bytes:
        data = self._held + chunk
        # A CR at the end may be the first half of a CRLF that the next chunk completes.
        if data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        else:
            self._held = b""
        if not data:
            return b""
        out = data.replace(b"\r\n.", b"\r\n..")
        if self.at_line_start and out[:1] == b".":
            out = b"." + out
        self.at_line_start = data.endswith(b"\r\n")
        return out

    def end(self) -> bytes:
        """What completes the message: a final CRLF if missing, then the end marker."""
        tail = self._held
        self._held = b""
        if tail or not self.at_line_start:
            return tail + b"\r\n.\r\n"
        return b".\r\n"


FINAL_REPLY_TIMEOUT = 600.0


class SMTPClientProtocol(protocol.Protocol, policies.TimeoutMixin):
    MAX_LENGTH = 4096        # RFC 5321 4.5.3.1.5 says 512; some servers send longer text
    MAX_REPLY_LINES = 200    # an EHLO reply is a few dozen lines at most

    def __init__(self, timeout: float, clock: IReactorTime | None = None) -> None:
        self.reply_timeout = timeout
        if clock is not None:
            self.callLater = clock.callLater  # type: ignore[assignment]
        self._waiting: deque[defer.Deferred[ServerReply]] = deque()
        self._buffer = b""       # what was read and is not yet a whole line
        self._more_read = False  # the line being handled has more read behind it
        self._lines: list[str] = []
        self._code = 0
        self._failed: Failure | None = None
        # The whole message and its end marker are sent: what is left is the reply that
        # says whether it was taken (a connection dropped now may mean a duplicate).
        self.ending = False
        self.greeting: defer.Deferred[ServerReply] = self._expect()

    # -- connection --------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.setTimeout(self.reply_timeout)

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        self._fail(SMTPClientError(f"connection lost: {reason.getErrorMessage()}"))

    def timeoutConnection(self) -> None:
        self._fail(SMTPClientError("timeout waiting for a reply"))
        self.abort()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(SMTPClientError("reply line too long"))
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def _fail(self, exc: Exception) -> None:
        if self._failed is None:
            self._failed = Failure(exc)
        while self._waiting:
            self._waiting.popleft().errback(self._failed)

    # -- replies -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        lines = (self._buffer + data if self._buffer else data).split(b"\n")
        self._buffer = lines.pop()   # the start of a line still to come
        last = len(lines) - 1
        for k, line in enumerate(lines):
            if self._failed is not None:
                return
            if len(line) > self.MAX_LENGTH:
                self.lineLengthExceeded(line)
                return
            # Whether the peer sent more after this line (start_tls asks).
            self._more_read = k < last or bool(self._buffer)
            self.lineReceived(line)
        self._more_read = False
        if self._failed is None and len(self._buffer) > self.MAX_LENGTH:
            self.lineLengthExceeded(self._buffer)

    def start_tls(self, creator: Any) -> None:
        """TLS from here (RFC 3207), once the 220 to STARTTLS is read.  Anything the peer
        sent after that reply came before the handshake, unprotected: were it read on
        as replies, whoever is on the path could answer the EHLO, MAIL and RCPT meant
        for the TLS session (and make mail bounce) without any certificate.  So it is
        a protocol violation, and the connection ends (as Postfix ends it)."""
        if self._more_read or self._buffer:
            self._fail(SMTPClientError("data after the reply to STARTTLS, before TLS"))
            self.abort()
            return
        self.transport.startTLS(creator)

    def lineReceived(self, line: bytes) -> None:
        m = _REPLY_LINE.fullmatch(line.rstrip(b"\r"))
        if m is None or len(self._lines) >= self.MAX_REPLY_LINES:
            self._fail(SMTPClientError(f"malformed reply {line[:80]!r}"))
            self.abort()
            return
        code = int(m.group(1))
        if self._lines and code != self._code:
            # RFC 5321 4.2.1: every line of a reply has the same code; "550-no" then
            # "250 ok" after DATA is no delivery.
            self._fail(SMTPClientError(f"reply lines with different codes: {self._code}, "
                                       f"{code}"))
            self.abort()
            return
        self._code = code
        self._lines.append(m.group(3).decode("utf-8", "replace").strip())
        if m.group(2) == b"-":
            return   # the whole reply within the timeout, not each line (a slow drip)
        reply = ServerReply(code, tuple(self._lines))
        self._lines = []
        if not self._waiting:
            # A reply nobody asked for (an unsolicited 421 before closing, say): ignore.
            return
        d = self._waiting.popleft()
        self.setTimeout(self.reply_timeout if self._waiting else None)
        d.callback(reply)

    def _expect(self) -> defer.Deferred[ServerReply]:
        d: defer.Deferred[ServerReply] = defer.Deferred()
        if self._failed is not None:
            d.errback(self._failed)
            return d
        self._waiting.append(d)
        if self.transport is not None:
            self.setTimeout(self.reply_timeout)
        return d

    # -- commands ----------------------------------------------------------------------

    def command(self, line: str | bytes) -> defer.Deferred[ServerReply]:
        return self.pipeline([line])[0]

    def pipeline(self, lines: list[str | bytes]) -> list[defer.Deferred[ServerReply]]:
        """Send the commands in one write (RFC 2920); one Deferred per reply, in order."""
        raw = [ln.encode("ascii") if isinstance(ln, str) else ln for ln in lines]
        ds = [self._expect() for _ in raw]
        if self._failed is None:
            self.transport.write(b"".join(r + b"\r\n" for r in raw))
        return ds

    def send_message(self, prefix: bytes, path: Path) -> defer.Deferred[ServerReply]:
        """After a 354: the message (prefix, then the file) dot-stuffed, then the end
        marker; fires with the final reply.  The file is read in chunks as the transport
        asks for more, so a large message never sits in memory."""
        stuffer = DotStuffer()
        head = stuffer(prefix) if prefix else b""
        if head:
            self.transport.write(head)
        f = open(path, "rb")
        sender = basic.FileSender()
        sender.CHUNK_SIZE = 64 * 1024
        self.setTimeout(self.reply_timeout)  # a stalled peer is caught while sending too

        def transform(chunk: bytes) -> bytes:
            self.resetTimeout()
            return stuffer(chunk)

        sent = sender.beginFileTransfer(f, self.transport, transform)

        def finished(_: Any) -> defer.Deferred[ServerReply]:
            f.close()
            reply = self._expect()
            if self._failed is None:
                self.transport.write(stuffer.end())
                self.ending = True
                # RFC 5321 4.5.3.2.6: the reply to the final "." may take 10 minutes (the
                # receiver filters the message then); giving up sooner means a duplicate.
                self.setTimeout(max(self.reply_timeout, FINAL_REPLY_TIMEOUT))
            return reply

        def broken(failure: Failure) -> Failure:
            f.close()
            return failure

        return sent.addCallbacks(finished, broken)

    # No resetTimeout() on data received: a peer sending one byte a second would keep a
    # reply, and a delivery slot, for ever (RFC 5321 4.5.3.2: a timeout per command).
