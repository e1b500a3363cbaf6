"""Writing a long response (POP3 RETR/TOP/LIST/UIDL, IMAP FETCH) as fast as the client reads.

A pull producer: the transport asks for more only when its buffer has drained, so a
50 MB message to a slow client never piles up in memory, and one large download does not
keep the reactor from serving other sessions.  And the same wait for short answers:
`OutputPacer` holds a session's input while its client leaves many of them untaken.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer
from twisted.python.failure import Failure
from zope.interface import implementer

OUTPUT_BURST = 64 * 1024   # octets of answers a client may leave untaken before input waits
CLOSE_GRACE = 30.0         # seconds a closing connection may take to drain, then aborted


@implementer(IPullProducer)
class ChunkProducer:
    """Writes an iterator of byte chunks to a transport; `start()` fires when all is sent
    (or the connection went away)."""

    BURST = 256 * 1024  # bytes handed to the transport per request

    def __init__(self, transport: Any, chunks: Iterator[bytes],
                 progress: Callable[[], None] | None = None,
                 stopped: Callable[[], None] | None = None) -> None:
        self.transport = transport
        self.chunks = chunks
        self.progress = progress
        self.stopped = stopped   # told when the connection goes (before `done` fires)
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
        if self.stopped is not None and not self.done.called:
            self.stopped()
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


def close_gracefully(transport: Any, call_later: Callable[..., Any]) -> Any:
    """transport.loseConnection(), and abortConnection CLOSE_GRACE seconds later unless
    the caller cancels the returned call first (in its connectionLost).  A close waits
    for the output to drain, and a client that reads nothing would otherwise keep the
    connection (a POP3 session's mailbox lock with it) for ever."""
    transport.loseConnection()
    return call_later(CLOSE_GRACE, transport.abortConnection)


def drained(transport: Any) -> defer.Deferred[bool]:
    """Fires once the transport has taken what was written to it (True): its buffer
    empty (on TLS, the connection below no longer full); or with False when the
    connection goes.  How pipelined commands answered at once wait for a client that
    reads their answers slowly, or never."""
    waiter = _Drained(transport)
    transport.registerProducer(waiter, False)
    waiter.registered = True
    return waiter.done


@implementer(IPullProducer)
class _Drained:
    """A pull producer with nothing to produce: the transport asks it for more once its
    buffer is empty, which is the moment it waits for."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.registered = False  # registerProducer asks at once: not yet drained
        self.done: defer.Deferred[bool] = defer.Deferred()

    def resumeProducing(self) -> None:
        if self.registered:
            self._finish(True)

    def stopProducing(self) -> None:
        self._finish(False)

    def _finish(self, drained: bool) -> None:
        if not self.done.called:
            self.transport.unregisterProducer()
            self.done.callback(drained)


class OutputPacer:
    """When a session answering pipelined commands at once should wait for its client.

    A client that sends commands and never reads their answers (18 MB of NOOPs, each
    answer longer than the command) would have them pile up in the transport without
    bound.  The session counts what it writes; past OUTPUT_BURST octets since the client
    was last seen to take everything, it handles no more input until the transport's
    buffer has drained (`drained`).  It waits only in a turn in which it wrote: the
    transport still holds that, so the wait ends when the client reads it (a wait on an
    empty buffer would never end).
    """

    __slots__ = ("pending", "turn")

    def __init__(self) -> None:
        self.pending = 0   # octets written since the client last took everything
        self.turn = 0      # ... of them in this turn

    def wrote(self, size: int) -> None:
        self.pending += size
        self.turn += size

    def new_turn(self) -> None:
        self.turn = 0

    @property
    def due(self) -> bool:
        return self.pending > OUTPUT_BURST and self.turn > 0

    def wait(self, transport: Any) -> defer.Deferred[bool]:
        """drained(transport), the count started afresh.  No time limit: a client that
        never reads is ended by the session's idle timer, which no input resets while
        the session waits (input is held, then the transport stops reading)."""
        self.pending = self.turn = 0
        return drained(transport)
