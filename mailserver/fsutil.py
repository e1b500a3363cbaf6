"""The few file-system steps every durable write here is made of (Maildir delivery,
folder edits, the uid list, the outbound queue, keys and certificates): write everything,
fsync the directory that got a new name, replace a small file so that a crash leaves the
old or the new one, and remove a leftover without failing the operation.

Disk-side code: it imports nothing from Twisted (its warnings go to the standard
library's `logging`, which the server forwards to its own log)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

log = logging.getLogger(__name__)


def _find_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs(2), where it reports write-back errors (Linux 5.8 and later)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
        if (major, minor) < (5, 8):
            return None
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (ValueError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # a ctypes call: the GIL is released while it runs


_syncfs = _find_syncfs()


def can_sync_filesystem() -> bool:
    return _syncfs is not None


def sync_filesystem(fd: int) -> None:
    """syncfs(2) on the file system of `fd`: every dirty file and directory of it reaches
    the disk, with one cache flush of the device, where an fsync each would flush once
    per file.  OSError if the system has none or write-back failed."""
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


T = TypeVar("T")


def sync_by_filesystem(items: Sequence[T], device: Callable[[T], int],
                       handle: Callable[[T], int | str | os.PathLike[str]]
                       ) -> dict[T, OSError]:
    """Sync each file system the items lie on once (`sync_filesystem`); the error of every
    item whose file system failed to sync or whose device could not be read.

    `device(item)` is its st_dev; `handle(item)` an open descriptor on it, or a directory
    path to open for the sync.
    """
    errors: dict[T, OSError] = {}
    by_fs: dict[int, list[T]] = {}
    for item in items:
        try:
            by_fs.setdefault(device(item), []).append(item)
        except OSError as e:
            errors[item] = e
    for members in by_fs.values():
        try:
            target = handle(members[0])
            if isinstance(target, int):
                sync_filesystem(target)
            else:
                fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    sync_filesystem(fd)
                finally:
                    os.close(fd)
        except OSError as e:
            errors.update((item, e) for item in members)
    return errors


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


def stat_by_open(path: Path | str) -> os.stat_result | None:
    """fstat() of the file opened: on NFS an open revalidates the cached attributes
    (close-to-open consistency), a stat() may not.  None when there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path | str) -> None:
    """Remove a file that may already be gone; other errors are logged, not raised."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def write_durably(path: Path, data: bytes, *, mode: int = 0o600, tmp: Path | None = None,
                  keep_existing: bool = False, mtime: float | None = None) -> bool:
    """Put `data` at `path` so that a crash at any moment leaves the old file or the new
    one, never a part: a temporary file beside it (or `tmp`), written, fsynced, renamed
    over `path`, and the directory fsynced.

    `keep_existing`: link instead of rename, so that an existing file is never replaced
    (a published key stays valid); returns False, writing nothing, when `path` exists.
    The temporary file is gone afterwards whatever happens."""
    if tmp is None:
        # (the name cut short: a long one and the suffix could pass NAME_MAX together)
        tmp = path.with_name(f".{path.name[:128]}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, _CREATE, mode)
    placed = False
    try:
        try:
            write_all(fd, data)
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep_existing:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.rename(tmp, path)
            placed = True
        fsync_directory(path.parent)
        return True
    finally:
        if not placed:
            unlink_quietly(tmp)


def lock_held(path: Path | str) -> bool:
    """Whether some process holds an flock on `path` now (the running server holds its
    queue lock for its whole life); False when the file does not exist."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
