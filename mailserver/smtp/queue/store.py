"""The outbound queue on disk, under state_dir/queue.  Blocking: call it from a thread.

Layout:

    msg/<ID>        the message as it is relayed (no Return-Path), written before the envelope
    env/<ID>.json   its envelope; a message is queued exactly while this file exists
    tmp/            files being written (removed at start-up: never complete)
    control/        requests from `mailserver-admin queue` to the running server
    lock            flock()ed by the running server for its whole life

Every file is written under tmp/, fsynced, renamed into place, and the directory fsynced,
so a crash (kill -9, power loss) leaves either the old or the new state, never a torn
file.  The message goes first and the envelope last: an envelope never points at a
missing message, and a message without an envelope is an interrupted accept that was
never acknowledged (removed at start-up).

The admin tool reads the same files.  Changes go through the server while it runs (a
file in control/, handled within a second) so that the queue has one writer; when no
server holds the lock, the admin tool changes the files itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

from twisted.logger import Logger

from mailserver.fsutil import fsync_directory, lock_held, unlink_quietly, write_all, write_durably
from mailserver.smtp.queue.envelope import ID_RE, Envelope, EnvelopeError

log = Logger()

FLUSH_THRESHOLD = 64 * 1024
_COPY_CHUNK = 256 * 1024
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
_CONTROL_RE = re.compile(r"(flush|delete)(?:\.([0-9A-Za-z]{1,64}))?")


class QueueLocked(Exception):
    """Another process (a running server) holds the queue lock."""



def check_id(queue_id: str) -> str:
    if not isinstance(queue_id, str) or not ID_RE.fullmatch(queue_id):
        raise ValueError(f"not a queue id: {queue_id!r}")
    return queue_id


class SpoolFile:
    """A message streaming into tmp/ from the reactor thread (buffered small writes).

    A disk error does not raise from `write` (the SMTP session is mid-DATA); it is kept and
    raised by `finish_sync`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self.eight_bit = False
        self.synced = False
        self._buffer = bytearray()
        self._error: OSError | None = None
        self._fd = os.open(path, _OPEN_NEW, 0o600)

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            raise RuntimeError("spool file is closed")
        self.size += len(data)
        if not self.eight_bit and _EIGHT_BIT.search(data):
            self.eight_bit = True
        if self._error is not None:
            return
        self._buffer += data
        if len(self._buffer) >= FLUSH_THRESHOLD:
            try:
                write_all(self._fd, self._buffer)
            except OSError as e:
                self._error = e
            self._buffer = bytearray()

    def finish_sync(self, fsync: bool = True) -> None:
        """Flush, fsync (unless told not to), close; raises the first write error.
        Called again on a finished file, it only adds the fsync if that is still owed."""
        if self._fd < 0:
            if self._error is not None:
                raise self._error
            if fsync and not self.synced:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self.synced = True
            return
        try:
            if self._error is None:
                write_all(self._fd, self._buffer)
                if fsync:
                    os.fsync(self._fd)
                    self.synced = True
        except OSError as e:
            self._error = e
        finally:
            self._buffer = bytearray()
            self._close()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Drop the file (idempotent)."""
        self._buffer = bytearray()
        self._close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warn("cannot remove {path}: {error}", path=str(self.path), error=e)

    def _close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


class QueueStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.msg_dir = self.root / "msg"
        self.env_dir = self.root / "env"
        self.tmp_dir = self.root / "tmp"
        self.control_dir = self.root / "control"
        self.lock_path = self.root / "lock"
        self._lock_fd = -1

    def ensure(self) -> None:
        for d in (self.root, self.msg_dir, self.env_dir, self.tmp_dir, self.control_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def message_path(self, queue_id: str) -> Path:
        return self.msg_dir / check_id(queue_id)

    def envelope_path(self, queue_id: str) -> Path:
        return self.env_dir / f"{check_id(queue_id)}.json"

    # -- writing -----------------------------------------------------------------------

    def open_spool(self, queue_id: str) -> SpoolFile:
        """A new message file in tmp/ (reactor thread: one open())."""
        return SpoolFile(self.tmp_dir / f"{check_id(queue_id)}.msg")

    def copy_to_spool(self, queue_id: str, source: Path, drop_leading: tuple[str, ...]) -> SpoolFile:
        """A spool file holding `source` without the header fields named in `drop_leading`
        at its very top (Return-Path, Delivered-To of a Maildir copy); fsynced, closed."""
        spool = self.open_spool(queue_id)
        try:
            with open(source, "rb") as f:
                wanted = tuple(name.lower().encode() + b":" for name in drop_leading)
                while True:
                    line = f.readline(65536)
                    if not line or not line.lower().startswith(wanted):
                        spool.write(line)
                        break
                while chunk := f.read(_COPY_CHUNK):
                    spool.write(chunk)
            spool.finish_sync()
        except BaseException:
            spool.abort()
            raise
        return spool

    def commit(self, spool: SpoolFile, envelope: Envelope) -> None:
        """Move a finished spool file into msg/ and write its envelope: now it is queued."""
        os.rename(spool.path, self.message_path(envelope.id))
        fsync_directory(self.msg_dir)
        self.save(envelope)

    def save(self, envelope: Envelope) -> None:
        """Write the envelope atomically and durably."""
        write_durably(self.envelope_path(envelope.id), envelope.to_json(),
                      tmp=self.tmp_dir / f"{envelope.id}.json.{time.monotonic_ns()}")

    def remove(self, queue_id: str) -> bool:
        """Take a message out of the queue (envelope first); False if it was not there."""
        try:
            os.unlink(self.envelope_path(queue_id))
        except FileNotFoundError:
            return False
        fsync_directory(self.env_dir)
        unlink_quietly(self.message_path(queue_id))
        return True

    # -- reading -----------------------------------------------------------------------

    def read(self, queue_id: str) -> Envelope:
        path = self.envelope_path(queue_id)
        with open(path, "rb") as f:
            env = Envelope.from_json(f.read(4 * 1024 * 1024 + 1))
        if env.id != queue_id:
            raise EnvelopeError(f"{path.name} holds id {env.id}")
        return env

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.env_dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and ID_RE.fullmatch(n[:-5]))

    def load(self, unreadable: Callable[[str, Exception], None] | None = None
             ) -> Iterator[Envelope]:
        """Every readable envelope; unreadable ones are logged (or handed to
        `unreadable`, for a tool whose user reads no log) and skipped."""
        for queue_id in self.ids():
            try:
                env = self.read(queue_id)
            except FileNotFoundError:
                continue
            except (OSError, EnvelopeError) as e:
                if unreadable is not None:
                    unreadable(queue_id, e)
                else:
                    log.error("queue: envelope {id} unreadable, left alone: {error}",
                              id=queue_id, error=e)
                continue
            if not self.message_path(queue_id).exists():
                log.error("queue: message file of {id} missing; dropping the envelope",
                          id=queue_id)
                unlink_quietly(self.envelope_path(queue_id))
                continue
            yield env

    def recover(self) -> list[Envelope]:
        """At server start-up, with the lock held: clear tmp/ and messages without an
        envelope (accepts interrupted before their 250), then load the envelopes."""
        self.clean_interrupted()
        return list(self.load())

    def clean_interrupted(self) -> None:
        """Remove what interrupted accepts left: every file in tmp/, and messages without
        an envelope.  Only before the server accepts connections (it would race them)."""
        self.ensure()
        removed = 0
        for name in os.listdir(self.tmp_dir):
            unlink_quietly(self.tmp_dir / name)
            removed += 1
        envelopes = {n[:-5] for n in os.listdir(self.env_dir) if n.endswith(".json")}
        for name in os.listdir(self.msg_dir):
            if name not in envelopes:
                unlink_quietly(self.msg_dir / name)
                removed += 1
        if removed:
            log.info("queue: removed {count} files of interrupted accepts", count=removed)

    # -- the server lock and admin requests --------------------------------------------

    def lock(self) -> None:
        """Take the queue for this process, for as long as it lives; QueueLocked if taken."""
        self.ensure()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise QueueLocked(str(self.lock_path)) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def server_running(self) -> bool:
        """True if some process (the server) holds the lock now."""
        return lock_held(self.lock_path)

    def request(self, action: str, queue_id: str = "") -> Path:
        """Leave a request for the running server: 'flush', or 'delete' with an id."""
        name = action + (f".{check_id(queue_id)}" if queue_id else "")
        if not _CONTROL_RE.fullmatch(name):
            raise ValueError(f"bad queue request {name!r}")
        self.ensure()
        path = self.control_dir / name
        tmp = self.tmp_dir / f"control.{name}.{os.getpid()}"
        tmp.write_bytes(b"")
        os.rename(tmp, path)
        return path

    def requests(self) -> list[tuple[str, str, Path]]:
        """Pending admin requests: (action, id or '', path)."""
        try:
            names = sorted(os.listdir(self.control_dir))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = _CONTROL_RE.fullmatch(name)
            if m is None:
                unlink_quietly(self.control_dir / name)
                continue
            out.append((m.group(1), m.group(2) or "", self.control_dir / name))
        return out
