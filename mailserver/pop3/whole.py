"""RETR of a message that fits in one read: read whole, answered with one write.

Streamed (wire.message_chunks through a ChunkProducer), every RETR costs a Python file
object, a generator of chunks, a write per chunk and a read that only finds the end of
the file.  A message of at most one chunk (nearly every one) is read here by name with
open, fstat, read and close, converted and dot-stuffed whole, and written behind its
"+OK" line in one transport.write.  Anything out of the ordinary (a larger file, one
renamed or removed meanwhile, an error) takes the streaming path, which handles it.

The file is read in the reactor, as the streaming path reads each of its chunks: a chunk
of a file that is nearly always in the page cache.

Memory stays bounded under pipelining (RFC 2449 6.6): what the socket does not take at
once waits in the transport, and the session answers its next command only once that
has gone out (`send_now`'s Deferred, from a pull producer the transport asks for more
once its buffer is empty), so at most one message waits in memory.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred

from mailserver.pop3.wire import CHUNK
from mailserver.streaming import drained

WHOLE_MAX = CHUNK  # bytes: a file up to this size is read and sent whole
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC


def read_whole(mbox: Any, e: Any, limit: int = WHOLE_MAX) -> bytes | None:
    """The bytes of the message of snapshot entry `e` (mailbox.py) when its file holds at
    most `limit`; None for a larger one, and whenever the file is not where the folder
    says (`POP3Mailbox.open` then finds it or reports it gone)."""
    if e.gone:
        return None
    folder = mbox.folder
    info = folder.by_uid(e.uid)
    if info is None or info.basename != e.base:
        return None
    try:
        fd = os.open(f"{folder.path}/{info.subdir}/{info.filename}", _READ_FLAGS)
    except OSError:
        return None
    try:
        # One read of one byte more than allowed tells a larger file without an fstat.
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None


def response(head: bytes, data: bytes, crlf_size: int) -> bytes:
    """`head` and the multi-line response for a whole message (RFC 1939 3).

    `crlf_size` is the size of the message's CRLF form as the listing gives it (the file
    name's, the index's or measured, mailbox.py): a file of exactly that size has no bare
    LF to convert, and is not searched for one.
    """
    parts = multiline(data, len(data) == crlf_size)
    parts.insert(0, head)
    return b"".join(parts)


def multiline(data: bytes, crlf: bool = False) -> list[bytes]:
    """A whole message as a multi-line response body (RFC 1939 3), in parts to be joined:
    CRLF line ends, a "." doubled at the start of a line, then the terminating line; the
    bytes `wire.message_chunks` yields for it.  `crlf`: the caller knows it has no bare LF.

    The lines that start with "." (many messages have a few) are found with `find` and
    the message is cut there: bytes.replace searches a two-byte pattern whose first byte
    ends every line several times slower, and copies the message once more before the
    final join.
    """
    if not crlf and data.count(b"\n") != data.count(b"\r\n"):  # a file from elsewhere
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    parts = [b"."] if data[:1] == b"." else []
    start = 0
    at = data.find(b"\n.")
    while at >= 0:
        parts += (data[start:at + 1], b".")
        start = at + 1
        at = data.find(b"\n.", at + 2)
    parts.append(data[start:] if start else data)
    parts.append(b".\r\n" if not data or data[-1:] == b"\n" else b"\r\n.\r\n")
    return parts


def send_now(transport: Any, data: bytes) -> Deferred[bool] | None:
    """Write `data`; a Deferred that fires once the transport's buffer has drained (or
    the connection is gone), None on TLS, whose layer takes it whole, as the streaming
    path does."""
    transport.write(data)
    if getattr(transport, "TLS", True):
        return None
    return drained(transport)


