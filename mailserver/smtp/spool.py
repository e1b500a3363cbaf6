"""A message held whole before it is delivered: in memory when small, else a spool file.

The MX's inbound checks and Sieve both need the entire message before it goes anywhere
(DKIM body hashes, the spam filter, Sieve's body tests and its decision per recipient).
The message streams in from the session as it arrives: up to `memory_limit` bytes it
stays in memory (never on disk before its delivery), a larger one goes to a file in the
spool directory.  Its header section is kept apart as well (up to `max_header` bytes), for
the readers that need only that.  The file is removed by `discard`; one left by a crash
is removed at start-up (`clean_spool`).  No Twisted: writes happen in the reactor as data
arrives (buffered by the file object), copies are iterated chunk by chunk by the caller.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

MAX_HEADER = 256 * 1024
MEMORY_SPOOL = 64 * 1024
COPY_CHUNK = 256 * 1024


def clean_spool(spool_dir: Path) -> int:
    """Remove spool files a crash left behind (at start-up, before anything listens)."""
    removed = 0
    try:
        names = os.listdir(spool_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        try:
            os.unlink(spool_dir / name)
            removed += 1
        except OSError:
            pass
    return removed


def _spool_file(spool_dir: Path, name: str) -> Any:
    return tempfile.NamedTemporaryFile(dir=spool_dir, prefix=name + ".", delete=False)


class MessageSpool:
    """One message as the session writes it (dot-unstuffed, CRLF), without what the
    server puts in front of it."""

    def __init__(self, spool_dir: Path, name: str, *, max_header: int = MAX_HEADER,
                 memory_limit: int = MEMORY_SPOOL) -> None:
        self.spool_dir = spool_dir if isinstance(spool_dir, Path) else Path(spool_dir)
        self.name = name
        self.max_header = max_header
        self.memory_limit = memory_limit
        self.size = 0
        self.header_too_big = False   # no end of the header section within max_header
        self._head = bytearray()
        self._header_end = -1         # offset where the blank line (or body) starts
        self._memory: bytearray | None = bytearray()
        self._file: Any = None
        self.path: Path | None = None
        self._closed = False

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._header_end < 0:
            start = max(0, len(self._head) - 3)
            self._head += data
            if self._head[:2] == b"\r\n":
                self._header_end = 0
            else:
                end = self._head.find(b"\r\n\r\n", start)
                if end >= 0:
                    self._header_end = end + 2
            if self._header_end > self.max_header or (self._header_end < 0
                                                      and len(self._head) > self.max_header):
                self.header_too_big = True
                self._header_end = 0
            if self._header_end >= 0:
                del self._head[self._header_end:]
        self.size += len(data)
        if self._memory is not None:
            self._memory += data
            if self.size <= self.memory_limit:
                return
            data, self._memory = bytes(self._memory), None
            self._open_file()
        self._file.write(data)

    def _open_file(self) -> None:
        try:
            self._file = _spool_file(self.spool_dir, self.name)
        except FileNotFoundError:  # removed while running: make it again
            self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._file = _spool_file(self.spool_dir, self.name)
        self.path = Path(self._file.name)

    def finish(self) -> None:
        """The whole message is in: flush the file (OSError when the disk refused)."""
        if self._file is not None:
            self._file.flush()
        if self._header_end < 0:  # the message was all header (no blank line)
            self._header_end = len(self._head)

    # -- reading -------------------------------------------------------------------------

    @property
    def header(self) -> bytes:
        """The header section (its fields with their CRLFs, without the blank line)."""
        return bytes(self._head)

    @property
    def header_end(self) -> int:
        """Where the body part (the blank line, then the body) starts in the message."""
        return self._header_end if self._header_end >= 0 else len(self._head)

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    @property
    def source(self) -> Path | bytes:
        """The whole message: its bytes, or the spool file's path."""
        if self._memory is not None:
            return bytes(self._memory)
        assert self.path is not None
        return self.path

    def rest(self) -> bytes:
        """The blank line and the body of a message held in memory."""
        assert self._memory is not None
        return bytes(self._memory[self.header_end:])

    def rest_chunks(self) -> Iterator[bytes]:
        """The blank line and the body, chunk by chunk (from the file when there is one:
        blocking reads of COPY_CHUNK bytes, for a cooperator or a thread)."""
        if self._memory is not None:
            yield self.rest()
            return
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(self.header_end)
            while chunk := f.read(COPY_CHUNK):
                yield chunk

    # -- the end -------------------------------------------------------------------------

    def discard(self) -> None:
        """Drop the message and remove its file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._memory = None
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError:
            pass
        try:
            os.unlink(self._file.name)
        except OSError:
            pass
