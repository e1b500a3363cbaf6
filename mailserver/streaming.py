"""Writing a long response (POP3 RETR/TOP/LIST/UIDL, IMAP FETCH) as fast as the client reads.

A pull producer: the transport asks for more only when its buffer has drained, so a
50 MB message to a slow client never piles up in memory, and one large download does not
keep the reactor from serving other sessions.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IPullProducer)
class ChunkProducer:
    """Writes an iterator of byte chunks to a transport; `start()` fires when all is sent
    (or the connection went away)."""

    BURST = 256 * 1024  # bytes handed to the transport per request

    def __init__(self, transport: Any, chunks: Iterator[bytes],
                 progress: Callable[[], None] | None = None) -> None:
        self.transport = transport
        self.chunks = chunks
        self.progress = progress
        self.done: defer.Deferred[None] = defer.Deferred()

    def start(self) -> defer.Deferred[None]:
        self.transport.registerProducer(self, False)
        return self.done

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        if self.progress is not None:
            self.progress()  # the client is reading: not idle
        sent = 0
        try:
            while sent < self.BURST:
                chunk = next(self.chunks)
                self.transport.write(chunk)
                sent += len(chunk)
        except StopIteration:
            self._finish(None)
        except Exception:
            self._finish(Failure())

    def stopProducing(self) -> None:
        """The connection is gone: close the file behind the iterator."""
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()
        self._finish(None)

    def _finish(self, result: Failure | None) -> None:
        if self.done.called:
            return
        self.transport.unregisterProducer()
        if result is None:
            self.done.callback(None)
        else:
            close = getattr(self.chunks, "close", None)
            if close is not None:
                close()
            self.done.errback(result)
