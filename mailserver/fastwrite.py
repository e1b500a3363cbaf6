"""Send a short reply, and close a connection, at once instead of on the reactor's next turn.

Twisted's `transport.write` queues the data and registers the socket for writability,
then unregisters it once the data went out: two epoll_ctl calls and a reactor turn for
every reply of a command/response protocol, about a fifth of the kernel time of an SMTP
transaction.  When nothing is queued on a plain TCP connection, the reply is sent
directly; whatever the socket does not take goes through `transport.write` as before,
so order and flow control are unchanged.  TLS connections always use `transport.write`.

Closing is the same story: `loseConnection` registers the socket for writability, is
called back with nothing to write, sends nothing, unregisters it and only then closes
(three epoll/send calls and a reactor turn at the end of every connection).  With nothing
queued, `close_now` closes at once, as Twisted's own `loseConnection` does once the write
side is shut.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import main, tcp
from twisted.python.failure import Failure


def write_now(transport: Any, data: bytes) -> bool:
    """Send `data`; True if it all went out at once, False if (some of) it waits in the
    transport's buffer."""
    if type(transport) is tcp.Server and _idle(transport):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # the reactor sees the broken connection on its next turn
        if sent == len(data):
            return True
        data = data[sent:]
    transport.write(data)
    return False


def close_now(transport: Any) -> None:
    """`transport.loseConnection()`, done at once when nothing is left to send; the
    protocol's connectionLost runs before this returns."""
    if type(transport) is tcp.Server and _idle(transport) and transport.producer is None:
        transport.stopReading()
        transport.stopWriting()
        transport.connectionLost(Failure(main.CONNECTION_DONE))
        return
    transport.loseConnection()


def _idle(transport: Any) -> bool:
    """Connected, not closing, and nothing queued (else a direct send would jump ahead)."""
    try:
        return (transport.connected and not transport.disconnecting
                and not transport.TLS  # after STARTTLS, writes go through the TLS layer
                and not transport._tempDataLen
                and transport.offset == len(transport.dataBuffer))
    except AttributeError:  # a Twisted whose FileDescriptor keeps its buffer differently
        return False
