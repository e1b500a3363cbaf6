"""Message bytes as POP3 sends them: CRLF line ends, dot-stuffed, streamed in chunks.

Maildir files written by this server already have CRLF line ends; files from other
programs (Dovecot with `mail_save_crlf = no`, procmail, getmail) may have bare LF.  POP3
counts and sends the CRLF form (RFC 1939 3, 5), so both the size and the bytes come from
one conversion, done with bytes methods on whole chunks rather than per line in Python.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Iterator

CHUNK = 64 * 1024


class CRLFNormalizer:
    """Turns a byte stream with LF or CRLF line ends into CRLF, chunk by chunk.

    A CR at the end of a chunk is held back until the next one shows whether an LF
    follows, so a CRLF split across two reads is never doubled.  Bare CRs stay as they are.
    """

    def __init__(self) -> None:
        self._cr = False

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        if data.count(b"\n") != data.count(b"\r\n"):
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return data

    def finish(self) -> bytes:
        if self._cr:
            self._cr = False
            return b"\r"
        return b""


def crlf_size(f: BinaryIO) -> int:
    """Octets of the CRLF form of a whole file (blocking: call it in a thread)."""
    norm = CRLFNormalizer()
    total = 0
    while True:
        data = f.read(CHUNK)
        if not data:
            break
        total += len(norm.feed(data))
    return total + len(norm.finish())


def crlf_size_of_path(path: str | os.PathLike[str]) -> int:
    with open(path, "rb") as f:
        return crlf_size(f)


class DotStuffer:
    """Byte-stuffs CRLF text for a multi-line response (RFC 1939 3): a line that starts
    with "." gets one more."""

    def __init__(self) -> None:
        self._line_start = True
        self.last = b"\n"  # last byte sent; decides whether the end needs a CRLF first

    def feed(self, data: bytes) -> bytes:
        if not data:
            return data
        data = data.replace(b"\n.", b"\n..")
        if self._line_start and data[:1] == b".":
            data = b"." + data
        self._line_start = data[-1:] == b"\n"
        self.last = data[-1:]
        return data

    def terminator(self) -> bytes:
        """What ends the response: ".\\r\\n", after a CRLF if the text did not end a line."""
        return b".\r\n" if self.last == b"\n" else b"\r\n.\r\n"


class TopLimiter:
    """Passes the header section, the blank line and then `lines` body lines (RFC 1939 7
    TOP), on CRLF text; `done` once nothing more is wanted."""

    def __init__(self, lines: int) -> None:
        self.lines_left = lines
        self.in_header = True
        self.done = False
        self._tail = b"\r\n"  # as if a line had just ended: an empty first line ends headers

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        start = 0
        if self.in_header:
            joined = self._tail + data
            end = joined.find(b"\r\n\r\n")
            if end < 0:
                self._tail = joined[-3:]
                return data
            self.in_header = False
            start = end + 4 - len(self._tail)  # offset in data just past the blank line
        pos = start
        while self.lines_left > 0:
            nl = data.find(b"\n", pos)
            if nl < 0:
                return data
            pos = nl + 1
            self.lines_left -= 1
        self.done = True
        return data[:pos]


def message_chunks(f: BinaryIO, top_lines: int | None = None,
                   chunk_size: int = CHUNK) -> Iterator[bytes]:
    """The multi-line response body for a message file: CRLF, dot-stuffed, terminated.

    Reads one chunk per step, so a large message never sits whole in memory.  With
    `top_lines`, only the headers and that many body lines (TOP).
    """
    norm = CRLFNormalizer()
    stuff = DotStuffer()
    top = TopLimiter(top_lines) if top_lines is not None else None
    try:
        eof = False
        while not eof:
            raw = f.read(chunk_size)
            eof = not raw
            data = norm.feed(raw) if raw else norm.finish()
            if top is not None:
                data = top.feed(data)
                eof = eof or top.done
            out = stuff.feed(data)
            if out:
                yield out
        yield stuff.terminator()
    finally:
        f.close()
