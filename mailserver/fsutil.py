"""The few file-system steps every durable write here is made of (Maildir delivery,
folder edits, the uid list, the outbound queue): write everything, fsync the directory
that got a new name, and remove a leftover without failing the operation."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.logger import Logger

log = Logger()


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_directory(path: Path | str) -> None:
    """Make a directory's entries (a new link or rename) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path | str) -> None:
    """Remove a file that may already be gone; other errors are logged, not raised."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("cannot remove {path}: {error}", path=str(path), error=e)
